"""The tool-use worked example: the generated data sets, `corral eval tools`'s metrics, and the command end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from corral.chat.conversation import Conversation, Message, ToolCall
from corral.chat.tools import check_tools, parse_tool_calls
from corral.data.formats import read_conversations
from corral.eval.tools import mentions, normalise, record, result_marker, score, summarise, turn_cases

ROOT = Path(__file__).resolve().parents[2]
BUILTIN = ROOT / "corral" / "data" / "builtin"


def _generator():
    spec = importlib.util.spec_from_file_location("make_tool_data", ROOT / "scripts" / "make_tool_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _generator()


def _call(name: str, **arguments) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def _conv(cid: str, *messages: Message) -> Conversation:
    return Conversation(list(messages), id=cid, tools=[gen.TOOLS[n] for n in gen.TOOLS])


def _result(cid: str, name: str, args: dict) -> Message:
    return Message("tool", gen.run_tool(name, args), tool_call_id=cid, name=name)


def test_metrics_count_hand_made_replies_exactly():
    weather = _conv("w", Message("user", "Weather in Lisbon?"),
                    Message("assistant", "", tool_calls=[ToolCall("c1", "get_weather", {"city": "Lisbon"})]),
                    _result("c1", "get_weather", {"city": "Lisbon"}), Message("assistant", "It is 18 °C in Lisbon, cloudy."))
    both = _conv("p", Message("user", "Weather in Paris and Rome?"),
                 Message("assistant", "", tool_calls=[ToolCall("a", "get_weather", {"city": "Paris"}),
                                                      ToolCall("b", "get_weather", {"city": "Rome"})]),
                 _result("a", "get_weather", {"city": "Paris"}), _result("b", "get_weather", {"city": "Rome"}),
                 Message("assistant", "Paris: 14 °C. Rome: 19 °C."))
    chat = _conv("s", Message("user", "Hi!"), Message("assistant", "Hello! How can I help?"))
    convert = _conv("k", Message("user", "5 km in miles?"), Message("assistant", "", tool_calls=[
        ToolCall("d", "convert_units", {"value": 5, "from_unit": "km", "to_unit": "mi"})]),
        _result("d", "convert_units", {"value": 5, "from_unit": "km", "to_unit": "mi"}), Message("assistant", "3.11 miles."))
    broken = _conv("b", Message("user", "Weather in Oslo?"),
                   Message("assistant", "", tool_calls=[ToolCall("e", "get_weather", {"city": "Oslo"})]))
    cases = turn_cases([weather, both, chat, convert, broken])
    assert [(c.conversation, c.kind) for c in cases] == [
        ("w", "call"), ("w", "answer"), ("p", "call"), ("p", "answer"), ("s", "no_tool"), ("k", "call"),
        ("k", "answer"), ("b", "call")]
    assert cases[3].keys == [14, 19] and cases[6].keys == [3.11]
    replies = [
        _call("get_weather", city="lisbon"),  # right call (city case does not matter)
        "It's 18 degrees and cloudy.",  # mentions the key value 18
        _call("get_weather", city="Rome") + "\n" + _call("get_weather", city="Madrid"),  # right function, one wrong city
        "Paris is 14 °C.",  # Rome's 19 is missing
        _call("get_weather", city="Hi"),  # a call where none is needed
        'Sure. <tool_call>\n{"name": "convert_units", "arguments": {"value": "5.0", "from_unit": "KM", "to_unit": "mi"}}'
        "\n</tool_call>",  # numbers by value, units without case
        "That's 3.11 miles.",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',  # not JSON: no call
    ]
    records = []
    for case, reply in zip(cases, replies):
        parsed = parse_tool_calls("chatml", reply)
        records.append(record(case, reply, parsed.content, parsed.calls))
    m = summarise(records)
    assert m["turns"] == {"call": 4, "no_tool": 1, "answer": 3} and m["conversations"] == 5
    assert (m["well_formed"]["count"], m["correct_function"]["count"], m["exact_arguments"]["count"]) == (3, 3, 2)
    assert m["well_formed"]["rate"] == 0.75 and m["exact_arguments"]["rate"] == 0.5
    assert (m["no_tool"]["count"], m["no_tool"]["of"]) == (0, 1)
    assert (m["answer_uses_result"]["count"], m["answer_uses_result"]["of"]) == (2, 3)
    assert [r["verdicts"] for r in records[:2]] == [
        {"well_formed": True, "correct_function": True, "exact_arguments": True}, {"answer_uses_result": True}]
    assert records[5]["parsed"]["content"] == "Sure."
    echo = "<tool_response>\n" + cases[1].results[0] + "\n</tool_response>"  # a copy of the result is no answer
    assert score(cases[1], echo, []) == {"answer_uses_result": False}
    invented = "<tool_response>\nIt is 18 °C.\n</tool_response>"  # result markup written by the model
    assert score(cases[1], invented, [], result_marker("chatml")) == {"answer_uses_result": False}
    assert score(cases[1], invented, []) == {"answer_uses_result": True} and result_marker("chatml") == "<tool_response>"


def test_argument_normalisation_and_mentions():
    assert normalise({"value": "5", "unit": " KM "}) == normalise({"value": 5.0, "unit": "km"})
    assert normalise("12*7") == normalise("12 * 7") and normalise("New York") == normalise("new york")
    assert normalise(5) != normalise(5.01) and normalise("C") != normalise("F")
    assert mentions("It is -4 °C.", -4) and not mentions("It is 4 °C.", -4)
    assert mentions("That is 1,234.5 km", 1234.5) and mentions("64.40 °F", 64.4) and not mentions("64 °F", 64.4)
    assert mentions("Tokyo is on utc+09:00.", "UTC+09:00") and not mentions("Tokyo is on UTC+9.", "UTC+09:00")


def test_calculator_is_safe_arithmetic():
    assert gen.calculator("(12 + 7) * 3") == {"result": 57}
    assert gen.calculator("10 / 4") == {"result": 2.5}
    assert gen.calculator("1 / 0") == {"error": "division by zero"}
    assert "error" in gen.calculator("__import__('os').system('true')")
    assert "error" in gen.calculator("9 ** 9 ** 9")
    assert gen.convert_units(18, "C", "F") == {"result": 64.4, "unit": "F"}
    assert gen.convert_units(5, "km", "mi") == {"result": 3.11, "unit": "mi"}
    assert "error" in gen.convert_units(5, "km", "kg")


def _user_texts(convs):
    return {m.content for c in convs for m in c.messages if m.role == "user"}


def test_builtin_tool_data_is_valid_and_held_out():
    train, _ = read_conversations("builtin:tools_train")
    test, _ = read_conversations("builtin:tools_test")
    assert len(train) >= 150 and len(test) >= 40
    for conv in train + test:
        check_tools(conv, where=conv.source)
        offered = {t["function"]["name"] for t in conv.tools}
        calls = {c.id: c for m in conv.messages for c in m.tool_calls}
        assert offered and {c.name for c in calls.values()} <= offered
        for m in conv.messages:
            if m.role == "tool":  # every result is what the tool function returns for its call
                call = calls[m.tool_call_id]
                assert m.content == gen.run_tool(call.name, call.arguments), conv.source
    for split in (train, test):
        kinds = {c.kind for c in turn_cases(split)}
        assert kinds == {"call", "no_tool", "answer"}
        assert any(len(m.tool_calls) == 2 for c in split for m in c.messages)  # parallel calls
        assert any(sum(bool(m.tool_calls) for m in c.messages) == 2 and
                   sum(m.role == "user" for m in c.messages) == 1 for c in split)  # two calls in sequence
        assert len({len(c.tools) for c in split}) > 1  # the offered tools vary
    # held out: no test user message occurs in training, nor any test city
    assert not _user_texts(test) & _user_texts(train)
    train_text = "\n".join(m.content for c in train for m in c.messages)
    assert not [city for city in gen.TEST_CITIES if city in train_text]
    for kind, phrases in gen.PHRASES.items():
        assert not set(phrases["train"]) & set(phrases["test"]), kind


def test_generator_is_deterministic_and_wrote_the_shipped_files():
    small = gen.to_jsonl(gen.make_records("train", 12, seed=3))
    assert small == gen.to_jsonl(gen.make_records("train", 12, seed=3))
    assert small != gen.to_jsonl(gen.make_records("train", 12, seed=4))
    assert len(small.splitlines()) == 12
    assert (BUILTIN / "tools_test.jsonl").read_text() == gen.to_jsonl(gen.make_records("test", 48, seed=0))


def test_eval_tools_command_end_to_end(tiny_model_dir, tmp_path):
    """Three held-out conversations (each offering only the tools it uses, to fit the tiny model's context)
    through `corral eval tools`: one record per assistant turn, and the counts add up."""
    from corral.cli import main

    records = [json.loads(line) for line in (BUILTIN / "tools_test.jsonl").read_text().splitlines()]
    picked = [next(r for r in records if len(r["messages"]) == 2)]  # no tool needed
    picked += [r for r in records if any(len(m.get("tool_calls", [])) == 2 for m in r["messages"])][:1]  # parallel
    picked += [r for r in records if len(r["messages"]) == 4][:1]  # one call
    for r in picked:
        used = {c["function"]["name"] for m in r["messages"] for c in m.get("tool_calls", [])} or {"calculator"}
        r["tools"] = [t for t in r["tools"] if t["function"]["name"] in used] or [gen.TOOLS["calculator"]]
    data = tmp_path / "three.jsonl"
    data.write_text(gen.to_jsonl(picked))
    out = tmp_path / "eval"
    assert main(["eval", "tools", "--model", str(tiny_model_dir), "--data", str(data), "template=chatml",
                 f"output_dir={out}", "max_tokens=6"]) in (0, None)
    report = json.loads((out / "tool_eval.json").read_text())
    assistant_turns = sum(m["role"] == "assistant" for r in picked for m in r["messages"])
    assert len(report["turns"]) == assistant_turns == 5
    metrics = report["metrics"]
    assert metrics["turns"] == {"call": 2, "no_tool": 1, "answer": 2} and metrics["conversations"] == 3
    for name in ("well_formed", "correct_function", "exact_arguments", "no_tool", "answer_uses_result"):
        assert 0 <= metrics[name]["count"] <= metrics[name]["of"]
    assert metrics["exact_arguments"]["count"] <= metrics["correct_function"]["count"] <= metrics["well_formed"]["count"]
    assert {t["kind"] for t in report["turns"]} == {"call", "no_tool", "answer"}
    assert "| well-formed call rate | 2 |" in (out / "tool_eval.md").read_text()


def test_shipped_sft_tools_config_trains_the_embedded_model_on_the_tool_data():
    from corral.config import SFTConfig, load_config, shipped_config

    cfg = load_config(SFTConfig, shipped_config("sft_tools.yaml"))
    assert (cfg.model, cfg.template, cfg.data.path, cfg.output_dir) == (
        "smollm2-135m", "chatml", "builtin:tools_train", "runs/sft-tools")
    assert cfg.train.max_len >= 1024  # the longest training conversation (~820 tokens) is never cut
