"""`corral chat` driven through a real pseudo-terminal (pexpect), locally and against a running server."""

from __future__ import annotations

import json
import sys

import httpx
import pexpect
import pytest

from tests.conftest import ServerProcess, app_in_thread

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


# ---------------------------------------------------------------------------------------------- Markdown, tool calls
MARKDOWN_REPLY = "Use **this**:\n\n```python\nprint('hi')\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"


@pytest.fixture(scope="module")
def markdown_server(tiny_tokenizer):
    """A real server whose scripted engine answers MARKDOWN_REPLY to every request."""
    from corral.chat.templates import get_template
    from corral.serve.api import build_app
    from corral.serve.models import ServedModel
    from tests.unit.test_serve_tools import ScriptedEngine

    class Always(ScriptedEngine):
        def submit(self, prompt_ids, params, adapter=None, loop=None):
            self.replies.append(MARKDOWN_REPLY)
            return super().submit(prompt_ids, params, adapter, loop)

    app = build_app({"md": ServedModel("md", Always(tiny_tokenizer), get_template("chatml", tiny_tokenizer), None, 0)})
    with app_in_thread(app) as url:
        yield f"{url}/v1"


def test_a_markdown_reply_is_redrawn_rendered_on_a_terminal(markdown_server, tmp_path):
    child = spawn(["md", "--api", markdown_server], tmp_path)
    shown = send(child, "format something")
    # Streamed raw, then erased (cursor up, clear to the end of the screen) and drawn by rich.
    raw_end = shown.index("| 1 | 2 |")
    assert shown[:raw_end].startswith("Use **this**:")  # first the raw text, as it streamed
    assert shown[raw_end:].startswith("| 1 | 2 |\n\r\x1b[9A\x1b[J")  # then up over the reply's ten rows, cleared
    drawn = shown.split("\x1b[J", 1)[1]
    assert "\x1b[1mthis\x1b[0m" in drawn and "**" not in drawn  # bold, without its asterisks
    assert "```" not in drawn and "print" in drawn  # the code block without its fence
    assert "──" in drawn and "| 1 |" not in drawn  # the table drawn with box lines, not pipes
    assert "saved 2 messages" in send(child, "/save md.json")
    (record,) = json.loads((tmp_path / "md.json").read_text())
    assert record["conversations"][1]["value"] == MARKDOWN_REPLY.strip()  # what is kept is the reply's text
    child.sendeof()
    child.expect(pexpect.EOF)


def test_output_that_is_not_a_terminal_gets_the_plain_text(markdown_server, tmp_path):
    import subprocess

    done = subprocess.run([sys.executable, "-m", "corral.cli", "chat", "md", "--api", markdown_server],
                          input="format something\n", capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert MARKDOWN_REPLY in done.stdout and "\x1b[" not in done.stdout


def test_tool_calls_in_a_reply_are_shown_not_run(tiny_tokenizer):
    import io

    from corral.chat.templates import get_template
    from corral.serve.terminal import reply_calls, show_reply

    class Local:  # what reply_calls reads of a LocalBackend: its template
        template = get_template("chatml", tiny_tokenizer)

    reply = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = reply_calls(Local(), reply)
    assert content == "Checking." and [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert reply_calls(object(), reply) == (reply, [])  # a server's replies: no template here, no calls read

    plain = io.StringIO()
    show_reply(plain, reply, calls, content)
    assert plain.getvalue() == '\n[tool call] get_weather {"city": "Paris"}\n(the chat does not run tools)'

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    show_reply(terminal, reply, calls, content)
    drawn = terminal.getvalue()
    assert drawn.startswith("\r\x1b[3A\x1b[J")  # the four streamed rows cleared
    assert "tool call: get_weather" in drawn and "Paris" in drawn and "not run" in drawn
