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


# ---------------------------------------------------------------------------------------------------------
# template=auto: one rendering per conversation, the same segments as rendering every prefix

LOCAL_TEMPLATES = {
    "tiny (default system prompt)": None,  # the test tokenizer's own, SmolLM2's shape
    "llama3-like (trim, bos)": (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
        "m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "header in the reply's turn (no generation prompt)": (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'assistant: ' + m['content'] + eos_token }}"
        "{% else %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"),
}  # fmt: skip


def auto_format(tiny_tokenizer, template):
    from transformers import PreTrainedTokenizerFast

    from corral.chat.templates import get_template

    if template is None:
        return get_template("auto", tiny_tokenizer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>",
                                  additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    tok.chat_template = template
    return get_template("auto", tok)


def random_conversation(rng):
    from corral.chat.conversation import Conversation

    words = ["hi", "assistant", "user", " spaced ", "two\n\nlines", "{braces}", "</s>", "<|eot_id|>", "ok", ""]
    pairs = []
    for _ in range(rng.randint(1, 7)):
        pairs += [("user", " ".join(rng.choice(words) for _ in range(rng.randint(1, 4))).strip() or "q"),
                  ("assistant", " ".join(rng.choice(words) for _ in range(rng.randint(0, 5))))]
    return Conversation.from_pairs(*pairs, system=rng.choice([None, None, "Be brief.", ""]))


@pytest.mark.parametrize("name", list(LOCAL_TEMPLATES))
def test_auto_segments_from_one_rendering_equal_the_prefix_renderings(tiny_tokenizer, name):
    import copy
    import random

    fmt = auto_format(tiny_tokenizer, LOCAL_TEMPLATES[name])
    assert fmt._turn_model is not None  # these templates render each message on its own
    by_prefixes = copy.copy(fmt)
    by_prefixes._turn_model = None
    calls = []
    apply = fmt._apply
    fmt._apply = lambda messages, add_generation_prompt: calls.append(len(messages)) or apply(messages,
                                                                                             add_generation_prompt)
    rng, fast, total = random.Random(name), 0, 0
    for _ in range(60):
        conv = random_conversation(rng)
        for generation in (False, True):
            messages = conv.messages if not generation else conv.messages[:-1]
            if not any(m.role == "user" for m in messages):
                continue
            probe = type(conv)(messages)
            calls.clear()
            assert fmt.segments(probe, generation) == by_prefixes.segments(probe, generation)
            fast += calls == [len(messages)]  # one rendering, of the whole conversation
            total += 1
        assert fmt.render_with_masks(conv) == by_prefixes.render_with_masks(conv)
    if "trim" in name:  # a reply with spaces at its ends renders trimmed: not the blocks' sum, so by prefixes
        assert 0 < fast < total
    else:
        assert fast == total


def test_auto_keeps_refusing_templates_that_are_not_per_message(tiny_tokenizer):
    from corral.chat.conversation import Conversation
    from corral.chat.templates import TemplateError

    # Like templates that drop earlier reasoning: an earlier reply renders otherwise once a later turn exists.
    drops_history = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[old]{% else %}"
                     "<{{ m['role'] }}>{{ m['content'] }}</s>{% endif %}{% endfor %}"
                     "{% if add_generation_prompt %}<assistant>{% endif %}")  # fmt: skip
    fmt = auto_format(tiny_tokenizer, drops_history)
    assert fmt._turn_model is None  # no per-message blocks: every prefix is rendered, as before
    with pytest.raises(TemplateError, match="not a prefix|prefix-consistent"):
        fmt.render_with_masks(Conversation.from_pairs(("user", "a"), ("assistant", "b"), ("user", "c"),
                                                      ("assistant", "d")))  # fmt: skip
