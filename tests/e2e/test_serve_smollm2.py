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
    finally:
        server.stop()
