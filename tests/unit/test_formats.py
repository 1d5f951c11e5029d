"""Readers: ShareGPT, OpenAI messages, Alpaca from .jsonl/.json/.parquet/datasets folders; errors name file:line:field."""

import json

import pytest

from corral.data.formats import DataError, read_conversations

SHAREGPT = {"id": "a", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                                         {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Ciao"}]}  # fmt: skip
OPENAI = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello"}]}  # fmt: skip
ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_reads_all_three_formats_from_jsonl(tmp_path):
    convs, report = read_conversations(write_jsonl(tmp_path / "d.jsonl", [SHAREGPT, OPENAI, ALPACA]))
    assert report.kept == 3 and report.total == 3
    assert [m.role for m in convs[0].messages] == ["user", "assistant", "user", "assistant"]
    assert convs[0].id == "a" and convs[0].source == f"{tmp_path / 'd.jsonl'}:1"
    assert convs[1].system == "Be brief."
    assert convs[2].messages[0].content == "Add the numbers.\n\n2 and 3" and convs[2].messages[1].content == "5"


def test_reads_json_parquet_and_datasets_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    (tmp_path / "d.json").write_text(json.dumps([SHAREGPT, SHAREGPT]))
    assert read_conversations(tmp_path / "d.json")[1].kept == 2
    pq.write_table(pa.Table.from_pylist([OPENAI, OPENAI, OPENAI]), tmp_path / "d.parquet")
    convs, report = read_conversations(tmp_path / "d.parquet", data_format="openai")
    assert report.kept == 3 and convs[0].messages[1].content == "Hi"
    Dataset.from_list([ALPACA]).save_to_disk(str(tmp_path / "ds"))
    assert read_conversations(tmp_path / "ds")[0][0].messages[1].content == "5"


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"conversations": [{"from": "human", "value": "Hi"}', "d.jsonl:2: invalid JSON"),
        ('{"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "x"}]}',
         "d.jsonl:2: field 'conversations[1].from': unknown role 'robot'"),
        ('{"conversations": [{"from": "human", "value": "Hi"}, {"from": "human", "value": "x"}]}',
         "d.jsonl:2: field 'conversations[1].from': roles must alternate"),
        ('{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "  "}]}',
         "d.jsonl:2: field 'conversations[1].value': empty"),
        ('{"conversations": [{"from": "human"}]}', "d.jsonl:2: field 'conversations[0].value': missing"),
        ('{"messages": [{"role": "user", "content": "Hi"}]}', "d.jsonl:2: the conversation ends with a user message"),
        ('{"instruction": "Do it"}', "d.jsonl:2: field 'output': missing"),
        ('{"text": "hello"}', "d.jsonl:2: cannot tell the format"),
    ],
)  # fmt: skip
def test_errors_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(SHAREGPT) + "\n" + line + "\n")
    with pytest.raises(DataError) as err:
        read_conversations(path)
    assert message in str(err.value)
    assert str(err.value).startswith(str(tmp_path))


def test_skip_invalid_drops_counts_and_reports_reasons(tmp_path):
    bad_role = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "x"}]}
    empty = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]}
    path = write_jsonl(tmp_path / "d.jsonl", [SHAREGPT, bad_role, empty, empty, OPENAI])
    convs, report = read_conversations(path, skip_invalid=True)
    assert len(convs) == 2 and report.total == 5 and report.kept == 2
    assert sum(report.skipped.values()) == 3
    summary = report.summary()
    assert "skipped 3" in summary and "d.jsonl:2" in summary and "d.jsonl:3" in summary


def test_missing_file_and_builtin_data(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_conversations(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="builtin:nope: nothing built in is named 'nope'"):
        read_conversations("builtin:nope")
    convs, report = read_conversations("builtin:corral_identity")
    # Counted from the shipped file itself: every record kept, each conversation with all its turns.
    from tests.conftest import IDENTITY

    records = [json.loads(line) for line in IDENTITY.read_text().splitlines()]
    assert report.kept == report.total == len(records) == 258
    assert [len(c.turns) for c in convs] == [len(r["conversations"]) for r in records]
    assert sum(len(r["conversations"]) > 2 for r in records) == 61  # multi-turn conversations are in it
