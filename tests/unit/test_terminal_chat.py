"""`corral chat` driven through a real pseudo-terminal (pexpect), locally and against a running server."""

from __future__ import annotations

import json
import sys

import httpx
import pexpect
import pytest

from tests.conftest import ServerProcess

PROMPT = ">>> "


def spawn(args: list[str], tmp_path) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, ["-m", "corral.cli", "chat", *args], encoding="utf-8", timeout=120,
                          cwd=str(tmp_path), dimensions=(40, 200))
    child.expect_exact(PROMPT)
    return child


def send(child: pexpect.spawn, line: str) -> str:
    """Send a line, return what was printed before the next prompt (the echo of the line removed)."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    printed = child.before.replace("\r\n", "\n")
    return printed.split("\n", 1)[1] if "\n" in printed else ""


def test_local_chat_history_commands_and_save(tiny_lora_dir, tmp_path):
    child = spawn([str(tiny_lora_dir), "--max_tokens", "8", "--temperature", "0"], tmp_path)
    first = send(child, "hello there")
    assert first.strip()  # a streamed reply was printed
    send(child, "and again")
    assert "saved 4 messages" in send(child, "/save chat.json")
    (record,) = json.loads((tmp_path / "chat.json").read_text())
    turns = record["conversations"]
    assert [t["from"] for t in turns] == ["human", "gpt", "human", "gpt"]
    assert turns[0]["value"] == "hello there" and turns[1]["value"] == first.strip()

    assert "cleared" in send(child, "/reset")
    assert "system prompt set" in send(child, "/system You are terse.")
    send(child, "hi")
    send(child, "/save two.json")
    (record,) = json.loads((tmp_path / "two.json").read_text())
    assert [t["from"] for t in record["conversations"]] == ["system", "human", "gpt"]
    assert record["conversations"][0]["value"] == "You are terse."
    assert "unknown command" in send(child, "/frobnicate")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_against_an_openai_compatible_server(tiny_lora_dir, tmp_path):
    server = ServerProcess(["--model", f"tiny={tiny_lora_dir}"])
    try:
        child = spawn(["tiny", "--api", server.url + "/v1", "--max_tokens", "10", "--temperature", "0"], tmp_path)
        shown = send(child, "Who are you?").strip()
        expected = httpx.post(server.url + "/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "Who are you?"}], "temperature": 0,
            "max_tokens": 10, "top_p": 0.9}).json()["choices"][0]["message"]["content"]  # fmt: skip
        assert shown and shown == expected.strip()
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        server.stop()


@pytest.mark.parametrize("bad", [["--temperature", "9"], ["--api"]])
def test_bad_flags_fail_cleanly(bad, tmp_path):
    child = pexpect.spawn(sys.executable, ["-m", "corral.cli", "chat", *bad], encoding="utf-8", timeout=60)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2
