"""`corral eval tools`: does a model call tools as its held-out conversations do?

Every assistant turn of the data is a test case: the gold history before it (the tools rendered in the
prompt, the earlier calls and their results as the data has them) is the prompt, the model replies
greedily through Corral's engine, and the reply is read with the template's tool-call parser
(`corral.chat.tools.parse_tool_calls`, which never raises). A turn is one of three kinds:

- `call`: the gold reply calls tools. Counted: well formed (the reply parses into at least one call),
  correct function (the same function names, as a multiset: order does not matter for parallel calls),
  exact arguments (the same calls with equal arguments after `normalise`).
- `no_tool`: the gold reply is text after a user message (greetings, general knowledge, a tool that is
  not offered). Counted: the reply makes no call.
- `answer`: the gold reply is text after tool results. Counted: the reply makes no call and mentions
  the key value of every result it answers from (`key_value`, `mentions`), and writes no result
  itself: neither a result's whole text nor the template's result markup (`<tool_response>` in
  chatml), which a base model echoes or invents instead of answering.

The rates divide each count by the number of turns of its kind. `tool_eval.json` holds the metrics and
every turn's record (prompt's last message, reply, parsed calls, gold, verdicts); `tool_eval.md` the table.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.chat.conversation import Conversation, Message

KINDS = ("call", "no_tool", "answer")
# metric -> (kind of turn it is counted over, what the table calls it)
METRICS = {
    "well_formed": ("call", "well-formed call rate"),
    "correct_function": ("call", "correct function rate"),
    "exact_arguments": ("call", "exact-argument rate"),
    "no_tool": ("no_tool", "no-tool rate when none is needed"),
    "answer_uses_result": ("answer", "final answer mentions the result"),
}
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_NUMERIC_TEXT = re.compile(r"\s*-?\d+(?:\.\d+)?\s*")


@dataclass
class TurnCase:
    """One assistant turn to reproduce: the conversation before it, the gold reply, and its kind."""

    conversation: str  # the conversation's id (or where it was read)
    turn: int  # index of the gold message in the conversation's messages
    kind: str  # one of KINDS
    prompt: Conversation
    gold: Message
    keys: list = field(default_factory=list)  # `answer` turns: the results' key values
    results: list = field(default_factory=list)  # `answer` turns: the results' texts


def turn_cases(conversations: list[Conversation]) -> list[TurnCase]:
    cases = []
    for conv in conversations:
        for i, message in enumerate(conv.messages):
            if message.role != "assistant":
                continue
            previous = conv.messages[i - 1] if i else None
            kind = "call" if message.tool_calls else "answer" if previous and previous.role == "tool" else "no_tool"
            results = []
            if kind == "answer":
                j = i - 1
                while j >= 0 and conv.messages[j].role == "tool":
                    j -= 1
                results = [m.content for m in conv.messages[j + 1 : i]]
            prompt = Conversation(list(conv.messages[:i]), source=conv.source, id=conv.id, tools=conv.tools)
            cases.append(TurnCase(conv.id or conv.source, i, kind, prompt, message,
                                  [key_value(r) for r in results], results))
    return cases


def key_value(result: str) -> Any:
    """The value a final answer has to mention from one tool result: the first field of a JSON object
    (the data puts the figure asked for first: `temperature_c`, `result`, `utc_offset`), otherwise the
    whole result text."""
    try:
        parsed = json.loads(result)
    except ValueError:
        return result.strip()
    if isinstance(parsed, dict) and parsed:
        return next(iter(parsed.values()))
    return parsed if isinstance(parsed, (int, float, str)) else result.strip()


def mentions(text: str, value: Any) -> bool:
    """A number is mentioned when a number in the text equals it to 2 decimals (`64.4` for 64.4, `18` for
    18.0; thousands separators ignored); any other value when its text appears, ignoring case and spacing."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        found = _NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3})", "", text))
        return any(round(float(n), 2) == round(float(value), 2) for n in found)
    return bool(_squash(value)) and _squash(value) in _squash(text)


def _squash(text: Any) -> str:
    return re.sub(r"\s+", "", str(text)).casefold()


def normalise(value: Any) -> Any:
    """Arguments as they are compared: numbers by value (1 == 1.0 == "1"), rounded to 6 decimals; strings
    without case or whitespace ("New York" == "new york", "C" == "c", "12*7" == "12 * 7"); lists and
    objects element by element (object keys as given)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return round(float(value), 6)
    if isinstance(value, str):
        if _NUMERIC_TEXT.fullmatch(value):
            return round(float(value), 6)
        return re.sub(r"\s+", "", value).casefold()
    if isinstance(value, (list, tuple)):
        return [normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    return value


def _signature(call, with_arguments: bool) -> str:
    if not with_arguments:
        return call.name
    return json.dumps([call.name, normalise(call.arguments)], sort_keys=True)


def same_calls(made: list, gold: list, with_arguments: bool) -> bool:
    """The same calls as a multiset: parallel calls may come in any order."""
    return Counter(_signature(c, with_arguments) for c in made) == Counter(_signature(c, with_arguments) for c in gold)


def result_marker(template) -> str:
    """The text that opens a tool result in `template`'s rendering (`<tool_response>` for chatml): the
    last line before a probe result's text, so a tokenizer's own tool template (`auto`) has one too; ""
    when the template renders no tools. A template name (no tokenizer) is looked up in its ToolFormat."""
    from corral.chat.conversation import ToolCall
    from corral.chat.tools import TOOL_FORMATS, tool_style

    if isinstance(template, str):
        style = TOOL_FORMATS.get(tool_style(template) or "")
        return style.result.split("{content}")[0].strip() if style else ""
    probe = Conversation([Message("user", "probe"), Message("assistant", "", [ToolCall("call_probe", "probe", {})]),
                          Message("tool", "corral-probe-result", tool_call_id="call_probe")],
                         tools=[{"type": "function", "function": {"name": "probe", "parameters": {"type": "object"}}}])
    try:
        before = template.render_text(probe).split("corral-probe-result")[0]
    except Exception:  # a template without tools: there is no result markup to look for
        return ""
    lines = [line.strip() for line in before.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def score(case: TurnCase, content: str, calls: list, marker: str = "") -> dict:
    """The verdicts on one reply (its text outside the calls and the calls parsed from it); `marker` is
    the template's result opening (`result_marker`)."""
    if case.kind == "call":
        return {"well_formed": bool(calls), "correct_function": same_calls(calls, case.gold.tool_calls, False),
                "exact_arguments": same_calls(calls, case.gold.tool_calls, True)}
    if case.kind == "no_tool":
        return {"no_tool": not calls}
    echoed = bool(marker) and marker in content or any(_squash(r) in _squash(content) for r in case.results)
    return {"answer_uses_result": not calls and not echoed and all(mentions(content, key) for key in case.keys)}


def summarise(records: list[dict]) -> dict:
    """Counts per kind and metric, and each metric's rate over its kind's turns (None when there are none)."""
    turns = Counter(r["kind"] for r in records)
    metrics: dict = {"turns": {kind: turns.get(kind, 0) for kind in KINDS}, "conversations": len(
        {r["conversation"] for r in records})}
    for name, (kind, _) in METRICS.items():
        hits = sum(1 for r in records if r["kind"] == kind and r["verdicts"][name])
        metrics[name] = {"count": hits, "of": turns.get(kind, 0),
                         "rate": round(hits / turns[kind], 4) if turns.get(kind) else None}
    return metrics


def _call_record(call) -> dict:
    return {"name": call.name, "arguments": call.arguments}


def record(case: TurnCase, reply: str, content: str, calls: list, marker: str = "") -> dict:
    return {"conversation": case.conversation, "turn": case.turn, "kind": case.kind,
            "last_message": case.prompt.messages[-1].to_openai(), "reply": reply,
            "parsed": {"content": content, "calls": [_call_record(c) for c in calls]},
            "gold": {"content": case.gold.content, "calls": [_call_record(c) for c in case.gold.tool_calls]},
            **({"keys": case.keys} if case.kind == "answer" else {}), "verdicts": score(case, content, calls, marker)}


def evaluate(engine, template, conversations: list[Conversation], params, adapter: str | None = None) -> tuple[dict, list[dict]]:
    """Generate every turn's reply in one continuous batch, parse and score it: (metrics, records)."""
    from corral.chat.tools import parse_tool_calls
    from corral.generate.chat import with_template_stops

    cases = turn_cases(conversations)
    prompts = [template.render(case.prompt) for case in cases]
    results = engine.generate(prompts, with_template_stops(params, template), adapter=adapter)
    marker = result_marker(template)
    records = []
    for case, choices in zip(cases, results):
        reply = choices[0].text.strip()
        parsed = parse_tool_calls(template, reply)
        records.append(record(case, reply, parsed.content, parsed.calls, marker))
    return summarise(records), records


def format_table(metrics: dict) -> str:
    lines = ["| metric | turns | count | rate |", "|---|---:|---:|---:|"]
    for name, (_, label) in METRICS.items():
        m = metrics[name]
        rate = "n/a" if m["rate"] is None else f"{m['rate']:.1%}"
        lines.append(f"| {label} | {m['of']} | {m['count']} | {rate} |")
    return "\n".join(lines)


def write_results(out: Path, metrics: dict, records: list[dict], info: dict) -> tuple[Path, Path]:
    from corral.atomic import atomic_write_text

    report = {**info, "metrics": metrics, "turns": records}
    json_path = atomic_write_text(out / "tool_eval.json", json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    turns = metrics["turns"]
    summary = [f"# Tool-use evaluation: {info['model']}", "",
               f"{metrics['conversations']} conversations from {info['data']}, template {info['template']}: "
               f"{turns['call']} call turns, {turns['no_tool']} no-tool turns, {turns['answer']} answer turns; "
               f"greedy, at most {info['max_tokens']} new tokens, {info['seconds']} s.", "", format_table(metrics), ""]
    md_path = atomic_write_text(out / "tool_eval.md", "\n".join(summary))
    return json_path, md_path


def load_eval_conversations(path: str, limit: int = 0) -> list[Conversation]:
    """The held-out conversations (the first `limit` when set); each must carry tools its calls use."""
    from corral.chat.tools import check_tools
    from corral.data.formats import DataError, read_conversations

    conversations = read_conversations(path)[0]
    conversations = conversations[:limit] if limit else conversations
    for conv in conversations:
        try:
            check_tools(conv, where=conv.source)
        except ValueError as e:  # ToolError: reported as a data error, naming the line and field
            raise DataError(str(e)) from None
    if not any(m.role == "assistant" for conv in conversations for m in conv.messages):
        raise DataError(f"{path}: no assistant turns to evaluate")
    return conversations


def run(cfg) -> dict:
    from corral.generate.sampling import SamplingParams
    from corral.serve.models import close_all, load_served_models

    conversations = load_eval_conversations(cfg.data, cfg.limit)
    print(f"loading {cfg.model} ...", flush=True)
    served = load_served_models([f"model={cfg.model}"], template=cfg.template, dtype=cfg.dtype, max_batch=cfg.max_batch)
    model = served["model"]
    params = SamplingParams(max_new_tokens=cfg.max_tokens, temperature=0.0, repetition_penalty=cfg.repetition_penalty)
    started = time.perf_counter()
    try:
        metrics, records = evaluate(model.engine, model.template, conversations, params, adapter=model.adapter)
    finally:
        close_all(served)
    info = {"model": cfg.model, "data": cfg.data, "template": cfg.template, "max_tokens": cfg.max_tokens,
            "repetition_penalty": cfg.repetition_penalty, "seconds": round(time.perf_counter() - started, 1)}
    json_path, md_path = write_results(Path(cfg.output_dir), metrics, records, info)
    print(format_table(metrics))
    print(f"per-turn records: {json_path}\nsummary: {md_path}")
    return metrics
