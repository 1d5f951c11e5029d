"""End-to-end on the real embedded model (SmolLM2-135M-Instruct). Slow: marked, still run in CI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from corral.config import SFTConfig
    from corral.recipes import sft

    out = tmp_path_factory.mktemp("smollm2-lora")
    cfg = SFTConfig(
        model="smollm2-135m", template="chatml", method="lora", output_dir=str(out),
        data={"path": "builtin:corral_identity"},
        train={"max_steps": 8, "batch_size": 2, "max_len": 256, "lr": 1e-3, "warmup_ratio": 0, "resume": "never"},
    )  # fmt: skip
    return sft.run(cfg)


def test_quickstart_recipe_loss_goes_down(lora_run):
    rows = [json.loads(line) for line in Path(lora_run.summary["metrics"]).read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_merged_model_loads_with_plain_transformers_and_generates(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corral.models.adapters import merge_adapter

    merged_dir = merge_adapter(lora_run.model_dir, tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who are you?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = merged.generate(**prompt, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert reply.strip()
    # The merged model is the adapter model: same greedy tokens.
    from corral.models.load import resolve_model

    # The adapter names its base by the hub id; Corral's loader maps it to the local conversion.
    base = json.loads((lora_run.model_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    base_path = resolve_model(base).path
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), lora_run.model_dir).eval()
    with torch.no_grad():
        again = adapted.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, again)


def test_gguf_conversion_race_never_exposes_a_half_written_folder(tmp_path):
    """Two processes convert the embedded GGUF into a fresh cache at once; both load a complete folder."""
    code = (
        "from corral.models.load import load_model, resolve_model; import os, json;"
        "p = resolve_model('smollm2-135m').path; m = load_model('smollm2-135m', device='cpu');"
        "print(json.dumps({'path': p, 'files': sorted(os.listdir(p)), 'params': sum(x.numel() for x in m.parameters())}))"
    )
    env = {**__import__("os").environ, "CORRAL_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0] == results[1]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(results[0]["files"])
    assert results[0]["params"] > 100_000_000
    leftovers = [p.name for p in (tmp_path / "cache" / "models").iterdir() if ".tmp-" in p.name]
    assert not leftovers
