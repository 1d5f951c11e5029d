"""Preference readers (pairs, message lists, Anthropic HH, arena votes), mixtures and stage splits."""

from __future__ import annotations

import json

import pytest

from corral.data.formats import DataError
from corral.data.mix import Source, mix, stage_split
from corral.data.preference import read_preferences


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_all_formats_read_to_the_same_pair(tmp_path):
    records = [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "What is 2+2?"}],
         "chosen": "4", "rejected": "5"},
        {"chosen": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
         "rejected": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "5"}]},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: 4",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: 5"},
        {"prompt": "p", "chosen": "ra", "rejected": "rb", "models": {"chosen": "x", "rejected": "y"}, "vote": "a"},
    ]  # fmt: skip
    pairs, report = read_preferences(write_jsonl(tmp_path / "p.jsonl", records))
    assert report.kept == 5
    assert [(p.chosen, p.rejected) for p in pairs[:4]] == [("4", "5")] * 4
    assert pairs[1].prompt.system == "Be exact."
    hh = pairs[3].prompt
    assert [m.role for m in hh.messages] == ["user", "assistant", "user"] and hh.messages[1].content == "Hello!"
    assert pairs[3].source.endswith("p.jsonl:4")


def test_identical_pairs_and_arena_ties_are_dropped_and_counted(tmp_path):
    records = [
        {"prompt": "q", "chosen": "same", "rejected": "same "},
        {"prompt": "q", "chosen": None, "rejected": None, "vote": "tie", "replies": {"a": "x", "b": "y"}},
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
    ]
    pairs, report = read_preferences(write_jsonl(tmp_path / "p.jsonl", records))
    assert len(pairs) == 1 and report.total == 3
    assert report.skipped == {"chosen identical to rejected": 1, "no preference (tie or both bad)": 1}


def test_arena_votes_from_the_server_are_readable(tmp_path):
    from corral.serve.serving import vote_record
    from corral.serve.protocol import Vote

    votes = [Vote(prompt="hi", model_a="m1", model_b="m2", reply_a="A!", reply_b="B!", vote=v) for v in ("b", "both_bad")]
    pairs, report = read_preferences(write_jsonl(tmp_path / "votes.jsonl", [vote_record(v) for v in votes]))
    assert [(p.chosen, p.rejected) for p in pairs] == [("B!", "A!")]
    assert report.skipped == {"no preference (tie or both bad)": 1}


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "chosen": "a"}, "p.jsonl:1: field 'rejected': missing"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "p.jsonl:1: field 'chosen': expected a string"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]},
     "field 'rejected[0]': chosen and rejected must share"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: other\n\nAssistant: c"},
     "field 'rejected': its turns before the final Assistant reply differ"),
    ({"chosen": "\n\nHuman: a\n\nHuman: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
     "field 'chosen': turn 1 is Human, expected Assistant"),
    ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "field 'prompt[0].role'"),
])  # fmt: skip
def test_errors_name_file_line_and_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "p.jsonl", [record])
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_preferences(path)


def test_skip_invalid_counts_by_reason(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a"}, {"prompt": "q", "chosen": "a", "rejected": "b"}])
    pairs, report = read_preferences(path, skip_invalid=True)
    assert len(pairs) == 1 and sum(report.skipped.values()) == 1 and "p.jsonl:1" in report.summary()


def test_stage_split_is_disjoint_complete_and_reproducible():
    records = list(range(1000))
    parts = [stage_split(records, "2,4,4", stage, seed=7) for stage in range(3)]
    assert [len(p) for p in parts] == [200, 400, 400]
    assert sorted(sum(parts, [])) == records  # every record in exactly one part
    assert parts == [stage_split(records, "2,4,4", stage, seed=7) for stage in range(3)]
    assert parts[0] != stage_split(records, "2,4,4", 0, seed=8)
    with pytest.raises(ValueError, match="3 parts"):
        stage_split(records, "2,4,4", 3)


def test_mixture_takes_weights_and_counts_reproducibly():
    sources = [Source("big", list(range(100)), weight=0.5), Source("small", ["s1", "s2", "s3"], weight=2.0),
               Source("fixed", [f"f{i}" for i in range(50)], count=10)]  # fmt: skip
    mixed, report = mix(sources, seed=3)
    assert report.taken == {"big": (100, 50), "small": (3, 6), "fixed": (50, 10)}
    assert len(mixed) == 66 and sorted(x for x in mixed if isinstance(x, str) and x.startswith("s")) == ["s1", "s1", "s2", "s2", "s3", "s3"]
    assert len({x for x in mixed if isinstance(x, int)}) == 50  # a half, without repeats
    again, _ = mix(sources, seed=3)
    assert again == mixed and mix(sources, seed=4)[0] != mixed
    assert "big: 50 of 100" in report.summary()


def test_load_records_mixes_sources_then_takes_this_stages_part(tmp_path):
    from functools import partial

    from corral.config import SourceConfig
    from corral.data.mix import load_records

    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "chosen": "x", "rejected": "y"} for i in range(40)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "chosen": "x", "rejected": "y"} for i in range(10)])
    sources = [SourceConfig(path=str(a), name="A", weight=0.5), SourceConfig(path=str(b), name="B", count=20)]
    logged: list[str] = []
    stages = [load_records(partial(read_preferences), "", sources, 5, "2,4,4", stage, 9, logged.append)
              for stage in range(3)]
    prompts = [[p.prompt.messages[0].content for p in part] for part in stages]
    assert [len(p) for p in prompts] == [8, 16, 16]
    assert sum(1 for line in logged if "mixture of 40 records (A: 20 of 40; B: 20 of 10)" in line) == 3
    # Disjoint: A's records are drawn once each, so none may appear in two stages; all 40 are used.
    a_sets = [{p for p in part if p.startswith("a")} for part in prompts]
    assert sum(len(s) for s in a_sets) == len(set().union(*a_sets)) == 20
    assert sum(len(p) for p in prompts) == 40


def test_sft_recipe_reads_a_mixture(tmp_path, tiny_model_dir):
    from corral.config import SFTConfig
    from corral.recipes import sft

    cfg = SFTConfig(model=str(tiny_model_dir), template="chatml", method="full", output_dir=str(tmp_path / "run"),
                    data={"sources": [{"path": "builtin:corral_identity", "count": 12}], "split": "1,1", "split_stage": 1},
                    train={"max_steps": 1, "batch_size": 2, "max_len": 128, "resume": "never"})  # fmt: skip
    result = sft.run(cfg)
    assert result.summary["steps"] == 1


def test_hh_marker_that_lost_its_blank_line_is_repaired_and_real_errors_say_where():
    """HH-RLHF has transcripts where "Human:" follows a single newline: read as its own turn. A transcript that
    does not alternate even so is an error naming the field, the turn and its text."""
    from corral.data.formats import DataError
    from corral.data.preference import parse_preference

    lost = "\n\nHuman: hi\n\nAssistant: hello\nHuman: more?\n\nAssistant: "
    pair = parse_preference({"chosen": lost + "sure", "rejected": lost + "no"})
    assert [(m.role, m.content) for m in pair.prompt.messages] == [("user", "hi"), ("assistant", "hello"),
                                                                   ("user", "more?")]
    assert (pair.chosen, pair.rejected) == ("sure", "no")
    # A strict transcript with "\nHuman:" inside a reply's text is left as it is (only a failing one is repaired).
    quoted = "\n\nHuman: say it\n\nAssistant: He said\nHuman: stop."
    assert parse_preference({"chosen": quoted, "rejected": quoted + "!"}).chosen == "He said\nHuman: stop."
    twice = "\n\nHuman: hi\n\nHuman: again\n\nAssistant: x"
    with pytest.raises(DataError, match=r"field 'chosen': turn 1 is Human, expected Assistant .*'again'"):
        parse_preference({"chosen": twice, "rejected": twice + "y"})
