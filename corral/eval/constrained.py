"""Constrained verdicts (`constrained=true`): the judge request carries a JSON schema in OpenAI's
structured-outputs form, `response_format={"type": "json_schema", "json_schema": {"name", "schema",
"strict": true}}`, so a judge that supports it (OpenAI, vLLM, `corral serve`) can only write a
verdict of the asked-for shape, and the reply is read as JSON against that same schema.

The schemas keep to the subset every structured-outputs implementation takes (OpenAI's strict mode
included): every property required, `additionalProperties: false`, an optional value written as
nullable, and ranges as `enum`s rather than `minimum`/`maximum`. The reason comes first, as the
prompts ask for the explanation before the verdict:

- single:   {"reason": string | null, "score": integer, one of the prompt's scale (1..10)}
- pairwise: {"reason": string | null, "verdict": "A" | "B" | "C"} (C: a tie)
- relative: {"reason": string | null, "score_1": integer, "score_2": integer} (assistant 1, then 2)

A reply that is not JSON, or JSON that breaks the schema, is unparseable: the record says why.
"""

from __future__ import annotations

import json
import re

from corral.eval.parsing import DEFAULT_SCALE, Scale

VERDICTS = {"A": "A", "B": "B", "C": "tie"}
SCHEMA_NAMES = {"single": "judge_score", "pairwise": "judge_verdict", "relative": "judge_scores"}

# Appended to the judge's user message: the prompts ask for `[[8]]`, which the schema does not allow.
INSTRUCTIONS = {
    "single": 'Write your verdict as a JSON object instead of the [[rating]] form: {{"reason": "<one or two '
              'sentences>", "score": <an integer from {low} to {high}>}}.',
    "pairwise": 'Write your verdict as a JSON object instead of the [[A]] form: {{"reason": "<one or two '
                'sentences>", "verdict": "A", "B" or "C" (C for a tie)}}.',
    "relative": 'Write your verdict as a JSON object instead of the [[rating_a,rating_b]] form: {{"reason": "<one '
                'or two sentences>", "score_1": <assistant 1, {low} to {high}>, "score_2": <assistant 2, {low} to {high}>}}.',
}  # fmt: skip


def _score_schema(scale: Scale) -> dict:
    if not scale.integer:
        raise ValueError("constrained=true needs an integer score scale")
    return {"type": "integer", "enum": list(range(scale.low, scale.high + 1))}


def verdict_schema(mode: str, scale: Scale = DEFAULT_SCALE, reason_chars: int | None = None) -> dict:
    """The JSON schema of a verdict for `mode` (single / pairwise / relative). `reason_chars` caps the
    reason's length (`maxLength`: outside the portable subset, but a small local judge that rambles
    would otherwise run into max_tokens before its verdict)."""
    reason = {"type": ["string", "null"], "description": "One or two sentences on why."}
    if reason_chars:
        reason["maxLength"] = reason_chars
    if mode == "single":
        fields = {"reason": reason, "score": _score_schema(scale)}
    elif mode == "pairwise":
        fields = {"reason": reason, "verdict": {"type": "string", "enum": list(VERDICTS)}}
    elif mode == "relative":
        fields = {"reason": reason, "score_1": _score_schema(scale), "score_2": _score_schema(scale)}
    else:
        raise ValueError(f"mode={mode}: no verdict schema")
    return {"type": "object", "properties": fields, "required": list(fields), "additionalProperties": False}


def response_format(mode: str, scale: Scale = DEFAULT_SCALE, reason_chars: int | None = None) -> dict:
    """The `response_format` request field (OpenAI's structured outputs, strict)."""
    schema = verdict_schema(mode, scale, reason_chars)
    return {"type": "json_schema", "json_schema": {"name": SCHEMA_NAMES[mode], "schema": schema, "strict": True}}


def instruction(mode: str, scale: Scale = DEFAULT_SCALE) -> str:
    return INSTRUCTIONS[mode].format(low=scale.low, high=scale.high)


def _check(value, schema: dict, name: str) -> str | None:
    """Why `value` breaks `schema` (the subset verdict_schema writes), or None."""
    types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    kinds = {"string": str, "null": type(None), "integer": int}
    if isinstance(value, bool) or not any(isinstance(value, kinds[t]) for t in types):
        return f"field '{name}': expected {' or '.join(types)}, got {json.dumps(value)}"
    if "enum" in schema and value not in schema["enum"]:
        shown = ", ".join(json.dumps(v) for v in schema["enum"])
        return f"field '{name}': expected one of {shown}, got {json.dumps(value)}"
    return None


def parse_json_verdict(reply: str, mode: str, scale: Scale = DEFAULT_SCALE) -> tuple[object | None, str | None]:
    """(verdict, None) for a reply that is a JSON object following `verdict_schema(mode, scale)`:
    the score (a float, as the text parsers give), `A` / `B` / `tie`, or (score_1, score_2);
    (None, why) otherwise. Nothing is read around the JSON: a fenced or prefixed object breaks the schema."""
    schema = verdict_schema(mode, scale)
    try:
        data = json.loads(reply)
    except json.JSONDecodeError as e:
        return None, f"not JSON: {e.msg} (character {e.pos})"
    if not isinstance(data, dict):
        return None, f"expected a JSON object, got {type(data).__name__}"
    for name in data:
        if name not in schema["properties"]:
            return None, f"field '{name}': not in the schema (fields: {', '.join(schema['properties'])})"
    for name, field_schema in schema["properties"].items():
        if name not in data:
            return None, f"field '{name}': missing"
        error = _check(data[name], field_schema, name)
        if error:
            return None, error
    if mode == "single":
        return float(data["score"]), None
    if mode == "pairwise":
        return VERDICTS[data["verdict"]], None
    return (float(data["score_1"]), float(data["score_2"])), None


def json_value_span(reply: str, field: str) -> tuple[int, int] | None:
    """(start, end) of the value of top-level `field` in a JSON reply (the digits of a score, the letter
    of a verdict string), or None. The caller checks it reads as the parsed value."""
    m = re.search(rf'"{re.escape(field)}"\s*:\s*("?)([^",}}\s]*)', reply)
    return (m.start(2), m.end(2)) if m else None
