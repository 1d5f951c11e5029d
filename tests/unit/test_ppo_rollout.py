"""Rollouts come from the live actor through the generation engine, and the log-probs computed for the
update are those of exactly the sampled tokens."""

from __future__ import annotations

import torch

from corral.chat.conversation import Conversation
from corral.chat.templates import get_template
from corral.generate.engine import TransformersEngine
from corral.generate.sampling import SamplingParams
from corral.models.load import load_model, load_tokenizer
from corral.train.ppo.rollout import batch_tensors, reply_logprobs, sample_replies


def test_rollout_logprobs_match_a_plain_forward(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    template = get_template("auto", tokenizer)
    model = load_model(str(tiny_model_dir))
    model.train()
    engine = TransformersEngine(model, tokenizer)
    prompts = [Conversation.from_pairs(("user", "Who are you?")), Conversation.from_pairs(("user", "Hi"))]
    samples = sample_replies(engine, template, prompts, SamplingParams(max_new_tokens=6, temperature=1.0, seed=3), k=3)
    assert model.training  # the rollout gave the model back in train mode
    assert len(samples) == 6 and samples.prompt_ids[0] == samples.prompt_ids[2] == template.render(prompts[0])
    assert all(1 <= len(r) <= 6 for r in samples.reply_ids)

    model.eval()
    ids, attention, reply_mask, start = batch_tensors(samples.prompt_ids, samples.reply_ids, engine.pad_id)
    with torch.no_grad():
        logp, entropy = reply_logprobs(model, ids, attention, reply_mask, start, with_entropy=True)
        for b in range(len(samples)):
            full = torch.tensor([samples.prompt_ids[b] + samples.reply_ids[b]])
            all_logp = model(full).logits[0].float().log_softmax(-1)
            n, p = len(samples.reply_ids[b]), len(samples.prompt_ids[b])
            expected = torch.stack([all_logp[p + t - 1, samples.reply_ids[b][t]] for t in range(n)])
            torch.testing.assert_close(logp[b, :n], expected, atol=1e-4, rtol=1e-4)
            assert torch.all(logp[b, n:] == 0) and torch.all(entropy[b, n:] == 0)
            assert torch.all(entropy[b, :n] > 0)

    greedy = sample_replies(engine, template, prompts[:1], SamplingParams(max_new_tokens=5), k=1)
    ids, attention, reply_mask, start = batch_tensors(greedy.prompt_ids, greedy.reply_ids, engine.pad_id)
    with torch.no_grad():
        full = model(ids).logits[0].float().log_softmax(-1)
    p = len(greedy.prompt_ids[0])
    assert [int(full[p + t - 1].argmax()) for t in range(len(greedy.reply_ids[0]))] == greedy.reply_ids[0]
