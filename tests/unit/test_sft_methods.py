"""`corral sft` with every method on a tiny model; outputs load with plain transformers/peft."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corral.chat.templates import get_template
from corral.config import SFTConfig
from corral.recipes import sft


def run_sft(model_dir, out, method, steps=4, **train):
    cfg = SFTConfig(
        model=str(model_dir), template="chatml", method=method, output_dir=str(out),
        data={"path": "builtin:corral_identity", "eval_fraction": 0.05},
        train={"max_steps": steps, "batch_size": 4, "max_len": 128, "lr": 5e-3, "resume": "never", **train},
        prefix={"num_virtual_tokens": 4},
    )  # fmt: skip
    return sft.run(cfg)


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_lora_learns_saves_peft_folder_and_its_template(tiny_model_dir, tmp_path):
    result = run_sft(tiny_model_dir, tmp_path / "lora", "lora", steps=12)
    curve = losses(tmp_path / "lora")
    assert curve[-1] < curve[0]
    assert result.train.eval_loss is not None
    from peft import PeftModel

    assert (result.model_dir / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, result.model_dir)  # plain peft, no Corral
    assert any(n for n, p in model.named_parameters() if "lora_B" in n and p.abs().sum() > 0)
    # The saved tokenizer carries the chat template the model was trained with.
    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    assert tokenizer.chat_template == get_template("chatml", tokenizer).chat_template_jinja
    for name in ("config.yaml", "metrics.jsonl", "loss.png"):
        assert (tmp_path / "lora" / name).is_file(), name


def test_full_finetune_writes_plain_hf_folder(tiny_model_dir, tmp_path):
    result = run_sft(tiny_model_dir, tmp_path / "full", "full", steps=3)
    loaded = AutoModelForCausalLM.from_pretrained(result.model_dir)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [not torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), original.state_dict().values())]
    assert any(changed)
    assert list(result.model_dir.glob("*.safetensors"))


def test_prefix_tuning_trains_without_packing(tiny_model_dir, tmp_path, capsys):
    run_sft(tiny_model_dir, tmp_path / "prefix", "prefix", steps=6)
    out = capsys.readouterr().out
    assert "packing is off for prefix tuning" in out and "one sample each" in out
    curve = losses(tmp_path / "prefix")
    assert curve[-1] < curve[0]
    config = json.loads((tmp_path / "prefix" / "model" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING"


def test_qlora_trains_on_a_4bit_base(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
    from corral.models.load import load_model

    q = load_model(str(tiny_model_dir), quant_bits=4, device="cpu")
    assert type(q.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    result = run_sft(tiny_model_dir, tmp_path / "qlora", "qlora", steps=8)
    curve = losses(tmp_path / "qlora")
    assert curve[-1] < curve[0]
    assert (result.model_dir / "adapter_model.safetensors").is_file()


def test_merge_folds_adapter_into_identical_plain_model(tiny_model_dir, tmp_path):
    from peft import PeftModel

    from corral.cli import main

    result = run_sft(tiny_model_dir, tmp_path / "lora", "lora", steps=3)
    assert main(["merge", str(result.model_dir), "--output_dir", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.model_dir).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft_model(ids).logits, atol=1e-4)
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_gives_the_same_losses(tiny_model_dir, tmp_path, method):
    plain = losses_of(run_sft(tiny_model_dir, tmp_path / "plain", method, steps=3, gradient_checkpointing=False))
    ckpt = losses_of(run_sft(tiny_model_dir, tmp_path / "ckpt", method, steps=3, gradient_checkpointing=True))
    assert ckpt == pytest.approx(plain, abs=1e-5)
    assert len(plain) == 3


def losses_of(result):
    return [r["loss"] for r in map(json.loads, result.train.metrics_path.read_text().splitlines()) if "loss" in r]
