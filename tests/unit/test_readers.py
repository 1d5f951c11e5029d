"""Readers on awkward files: compressed, with a byte-order mark, not UTF-8, duplicate keys, deep nesting, lone
surrogates; prompt readers for Alpaca inputs and self-instruct seed tasks; unused fields reported; and every
malformed file through the command line: exit status 1, the file and line named, no traceback."""

import bz2
import gzip
import json
import lzma

import pytest

from corral.chat.templates import get_template
from corral.cli import main
from corral.data.clean import conversations_to_samples
from corral.data.formats import DataError, read_conversations
from corral.data.preference import read_preferences

GOOD = json.dumps({"id": "g", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]})
DEEP = '{"conversations": [{"from": "human", "value": ' + "[" * 50_000 + "]" * 50_000 + "}]}"


def zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


@pytest.mark.parametrize("suffix, compress", [(".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress),
                                              (".zst", zstd)])  # fmt: skip
def test_compressed_jsonl_and_json_read_transparently(tmp_path, suffix, compress):
    (tmp_path / f"d.jsonl{suffix}").write_bytes(compress(f"{GOOD}\n{GOOD}\n".encode()))
    (tmp_path / f"d.json{suffix}").write_bytes(compress(f"[{GOOD}]".encode()))
    convs, report = read_conversations(tmp_path / f"d.jsonl{suffix}")
    assert report.kept == 2 and convs[1].source.endswith(f"d.jsonl{suffix}:2")
    assert read_conversations(tmp_path / f"d.json{suffix}")[0][0].messages[1].content == "Hello"
    pairs = json.dumps({"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"})
    (tmp_path / f"p.jsonl{suffix}").write_bytes(compress(f"{pairs}\n".encode()))
    assert read_preferences(tmp_path / f"p.jsonl{suffix}")[0][0].chosen == "Hello"


def test_byte_order_mark_is_accepted(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + f"{GOOD}\n{GOOD}\n".encode())
    (tmp_path / "d.json").write_bytes(b"\xef\xbb\xbf" + f"[{GOOD}]".encode())
    assert read_conversations(tmp_path / "d.jsonl")[1].kept == 2
    assert read_conversations(tmp_path / "d.json")[1].kept == 1


# (file name, bytes, what the message says after the file name): every malformed case, read and through the CLI.
MALFORMED = [
    ("latin1.jsonl", (GOOD + "\n" + GOOD.replace("Hello", "H\xe9llo") + "\n").encode("latin-1"),
     ":2: not UTF-8: byte 0xe9 at byte offset 191"),
    ("latin1.json", ("[" + GOOD + ",\n" + GOOD.replace("Hi", "H\xefi") + "]").encode("latin-1"),
     ":2: not UTF-8: byte 0xef at byte offset 161"),
    ("dupkey.jsonl", f'{GOOD}\n{{"conversations": [{{"from": "human", "from": "gpt", "value": "x"}}]}}\n'.encode(),
     ":2: duplicate key 'from'"),
    ("dupkey.json", f'[{GOOD}, {GOOD}, {{"id": 1, "id": 2}}]'.encode(), ":record 2: duplicate key 'id'"),
    ("deep.jsonl", f"{GOOD}\n{DEEP}\n".encode(), ":2: field 'conversations[0].value': nested too deeply"),
    ("deep.json", f"[{GOOD}, {DEEP}]".encode(), ":record 1: field 'conversations[0].value': nested too deeply"),
    ("surrogate.jsonl", (GOOD + "\n" + GOOD.replace("Hello", "Hel\\ud800lo") + "\n").encode(),
     ":2: field 'conversations[1].value': lone surrogate U+D800 at character 3"),
    ("badjson.jsonl.gz", gzip.compress(f'{GOOD}\n{{"conversations": [\n'.encode()), ":2: invalid JSON"),
    ("badrole.jsonl", f'{GOOD}\n{{"conversations": [{{"from": "robot", "value": "x"}}]}}\n'.encode(),
     ":2: field 'conversations[0].from': unknown role 'robot'"),
]  # fmt: skip


@pytest.mark.parametrize("name, data, message", MALFORMED, ids=[case[0] for case in MALFORMED])
def test_malformed_file_errors_name_the_place(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError) as err:
        read_conversations(path)
    assert str(err.value).startswith(f"{path}{message}")


@pytest.mark.parametrize("name, data, message", MALFORMED, ids=[case[0] for case in MALFORMED])
def test_malformed_file_through_the_cli_exits_1_naming_file_and_line(tmp_path, tiny_model_dir, capsys, name, data,
                                                                     message):
    path = tmp_path / name
    path.write_bytes(data)
    status = main(["data", "inspect", str(path), f"model={tiny_model_dir}"])
    err = capsys.readouterr().err
    assert status == 1
    assert f"corral data inspect: error: {path}{message}" in err
    assert "Traceback" not in err


def test_skip_invalid_counts_unreadable_lines_too(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(f"{GOOD}\n{{broken\n".encode() + "H\xe9\n".encode("latin-1") + f"{GOOD}\n".encode())
    convs, report = read_conversations(path, skip_invalid=True)
    assert len(convs) == 2 and report.total == 4 and report.skipped == {"invalid JSON": 1, "not UTF-8": 1}


def test_zero_samples_left_says_why_instead_of_dividing_by_zero(tiny_tokenizer, tmp_path):
    fmt = get_template("chatml", tiny_tokenizer)
    path = tmp_path / "long_prompts.jsonl"
    record = {"conversations": [{"from": "human", "value": "word " * 200}, {"from": "gpt", "value": "ok"}]}
    path.write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n")
    convs, _ = read_conversations(path)
    with pytest.raises(DataError, match=r"0 samples left: 2 dropped because no trained token was left within "
                                        r"max_len=32 tokens .* e\.g\. .*long_prompts\.jsonl:1"):
        conversations_to_samples(convs, fmt, 32)


def test_alpaca_prompts_keep_their_input_as_sft_does(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text(json.dumps({"instruction": "Translate to French.", "input": "Good morning"}) + "\n")
    (prompt,), _ = read_conversations(path, need_reply=False)
    assert prompt.messages[0].content == "Translate to French.\n\nGood morning"
    path.write_text(json.dumps({"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}))
    (sft,), _ = read_conversations(path)
    assert sft.messages[0] == prompt.messages[0]  # one builder for both


def test_self_instruct_seed_tasks_read_with_their_inputs(tmp_path):
    seed_task = {"id": "seed_task_0", "name": "breakfast_suggestion", "is_classification": False,
                 "instruction": "Is there anything I can eat for a breakfast that doesn't include eggs?",
                 "instances": [{"input": "", "output": "Yes, oatmeal."}, {"input": "I am vegan.", "output": "Tofu."}]}
    path = tmp_path / "seed_tasks.jsonl"
    path.write_text(json.dumps(seed_task) + "\n")
    prompts, report = read_conversations(path, need_reply=False)
    assert [p.messages[0].content for p in prompts] == [seed_task["instruction"],
                                                         seed_task["instruction"] + "\n\nI am vegan."]
    assert prompts[1].source == f"{path}:1 (instance 1)" and report.kept == 1
    convs, _ = read_conversations(path)
    assert [c.messages[1].content for c in convs] == ["Yes, oatmeal.", "Tofu."]
    assert report.unused == {"name": 1, "is_classification": 1}


def test_fields_a_reader_does_not_use_are_reported_once_with_a_count(tmp_path):
    record = {"id": "x", "model": "gpt-4", "conversations": [{"from": "human", "value": "Hi", "markdown": "Hi"},
                                                             {"from": "gpt", "value": "Hello"}]}  # fmt: skip
    path = tmp_path / "d.jsonl"
    path.write_text((json.dumps(record) + "\n") * 3)
    _, report = read_conversations(path)
    assert report.summary().endswith("fields not used: 'conversations[].markdown' (3x), 'model' (3x)")
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi", "chosen": "a", "rejected": "b", "judge": "me"}) + "\n")
    assert "fields not used: 'judge' (1x)" in read_preferences(pairs)[1].summary()
