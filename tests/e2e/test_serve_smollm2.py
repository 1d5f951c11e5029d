"""`corral serve` with no --model serves the embedded SmolLM2 out of the box; it answers sensibly."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import ServerProcess

pytestmark = pytest.mark.slow


def test_default_serve_answers_with_the_embedded_model():
    server = ServerProcess([], timeout=300)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list()] == ["smollm2-135m"]
        reply = client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0, max_tokens=24, extra_body={"repetition_penalty": 1.2},
        )  # fmt: skip
        text = reply.choices[0].message.content
        assert "Paris" in text
        assert "<|im_end|>" not in text and "<|im_start|>" not in text  # the template's end-of-turn stopped it
        structured_replies_validate(client)
    finally:
        server.stop()


SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["city", "country", "population", "facts"],
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population": {"type": "object", "additionalProperties": False, "required": ["millions", "estimate"],
                       "properties": {"millions": {"type": "number"}, "estimate": {"enum": ["low", "high"]}}},
        "facts": {"type": "array", "items": {"type": "string", "maxLength": 60}, "minItems": 1, "maxItems": 2},
    },
}  # fmt: skip


def structured_replies_validate(client):
    """The official client's `response_format` on the embedded model: every reply parses and validates,
    nested object, enum and array included; the schema-free json_object form gives an object."""
    import json

    import jsonschema

    question = [{"role": "user", "content": "Describe Paris as JSON: city, country, population, facts."}]
    for seed in range(3):
        reply = client.chat.completions.create(
            model="smollm2-135m", messages=question, temperature=0.7, seed=seed, max_tokens=200,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}},
        )  # fmt: skip
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    short = [{"role": "user", "content": "Give a JSON object whose key capital names the capital of France."}]
    reply = client.chat.completions.create(model="smollm2-135m", messages=short, temperature=0, max_tokens=100,
                                           response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "stop" and isinstance(json.loads(reply.choices[0].message.content), dict)
