"""`corral sft` with every method on a tiny model; outputs load with plain transformers/peft."""

import json
from pathlib import Path

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


def recipe_rows(model_dir, method):
    """run_sft's training rows, the rows of its first step and its held-out rows, built as `sft.run` builds them
    (5% held out with the default seed 42, packed unless prefix tuning)."""
    from corral.data.clean import conversations_to_samples
    from corral.data.formats import read_conversations
    from corral.data.pack import pack_rows, single_rows
    from corral.recipes.runs import split_eval
    from corral.train.loop import StepPlan

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fmt = get_template("chatml", tokenizer)
    train_convs, eval_convs = split_eval(read_conversations("builtin:corral_identity")[0], 0.05, 42)
    samples, _ = conversations_to_samples(train_convs, fmt, 128)
    rows = single_rows(samples) if method == "prefix" else pack_rows(samples, 128)
    first = [rows[i] for i in StepPlan(len(rows), 4, 1, 1, 42).step_rows(0)]
    return first, single_rows(conversations_to_samples(eval_convs, fmt, 128)[0]), tokenizer.pad_token_id


@torch.no_grad()
def mean_loss(model, rows, pad_id) -> float:
    """Mean next-token loss per trained token of `rows` (one batch, eval mode)."""
    from corral.data.pack import collate
    from corral.recipes.sft import sft_loss

    total, count = sft_loss(model.eval(), collate(rows, pad_id))
    return total.item() / count.item()


def test_lora_learns_saves_peft_folder_and_its_template(tiny_model_dir, tmp_path):
    result = run_sft(tiny_model_dir, tmp_path / "lora", "lora", steps=12)
    curve = losses(tmp_path / "lora")
    from peft import PeftModel
    from safetensors.torch import load_file

    assert (result.model_dir / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    first, held_out, pad = recipe_rows(tiny_model_dir, "lora")
    base_first, base_held_out = mean_loss(base, first, pad), mean_loss(base, held_out, pad)
    # LoRA's B starts at zero: step 1 is the base model's loss on step 1's rows.
    assert curve[0] == pytest.approx(base_first, rel=1e-6)
    model = PeftModel.from_pretrained(base, result.model_dir)  # plain peft, no Corral
    # The reported held-out loss is the saved adapter's, and it learned: lower on those very rows, and on
    # step 1's rows, than the base model.
    assert result.summary["eval_loss"] == pytest.approx(mean_loss(model, held_out, pad), rel=1e-5)
    assert result.summary["eval_loss"] < base_held_out - 0.05
    assert mean_loss(model, first, pad) < base_first - 0.05
    # Only the adapter is trained and saved: A and B of every linear layer (all-linear: 7 per layer), and
    # every B moved off its zero start.
    saved = load_file(result.model_dir / "adapter_model.safetensors")
    assert len(saved) == 2 * 7 * base.config.num_hidden_layers
    assert all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert all(v.abs().sum() > 0 for k, v in saved.items() if ".lora_B." in k)
    # The saved tokenizer carries the chat template the model was trained with.
    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    assert tokenizer.chat_template == get_template("chatml", tokenizer).chat_template_jinja
    for name in ("config.yaml", "metrics.jsonl", "loss.png"):
        assert (tmp_path / "lora" / name).is_file(), name


def test_full_finetune_writes_plain_hf_folder(tiny_model_dir, tmp_path):
    result = run_sft(tiny_model_dir, tmp_path / "full", "full", steps=3)
    loaded = AutoModelForCausalLM.from_pretrained(result.model_dir)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert loaded.state_dict().keys() == original.state_dict().keys()
    unchanged = [k for k, v in original.state_dict().items() if torch.equal(v, loaded.state_dict()[k])]
    assert unchanged == []  # full fine-tuning: every weight is trained
    assert list(result.model_dir.glob("*.safetensors"))


def test_prefix_tuning_trains_without_packing(tiny_model_dir, tmp_path, capsys):
    run_sft(tiny_model_dir, tmp_path / "prefix", "prefix", steps=6)
    out = capsys.readouterr().out
    assert "packing is off for prefix tuning" in out and "one sample each" in out
    curve = losses(tmp_path / "prefix")
    config = json.loads((tmp_path / "prefix" / "model" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING"
    from safetensors.torch import load_file

    from corral.models.load import load_model

    # Only the prefix is trained and saved: 4 virtual tokens, a key and a value per layer.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config
    kv_dim = base.num_key_value_heads * (base.hidden_size // base.num_attention_heads)
    saved = load_file(tmp_path / "prefix" / "model" / "adapter_model.safetensors")
    shapes = {k: tuple(v.shape) for k, v in saved.items()}
    assert shapes == {"prompt_embeddings": (4, 2 * base.num_hidden_layers * kv_dim)}
    # On the very rows of step 1 (logged with the starting prefix), the trained prefix does better.
    first, _, pad = recipe_rows(tiny_model_dir, "prefix")
    assert mean_loss(load_model(str(tmp_path / "prefix" / "model")), first, pad) < curve[0] - 1e-3


def test_qlora_trains_on_a_4bit_base(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
    from corral.models.load import load_model

    q = load_model(str(tiny_model_dir), quant_bits=4, device="cpu")
    assert type(q.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    result = run_sft(tiny_model_dir, tmp_path / "qlora", "qlora", steps=8)
    curve = losses(tmp_path / "qlora")
    first, _, pad = recipe_rows(tiny_model_dir, "qlora")
    # B starts at zero: step 1 is the 4-bit base's own loss on step 1's rows; the trained adapter on that base
    # does better on them.
    assert curve[0] == pytest.approx(mean_loss(q, first, pad), rel=1e-5)
    trained = load_model(str(result.model_dir), quant_bits=4, device="cpu")
    assert mean_loss(trained, first, pad) < curve[0] - 0.05
    from safetensors.torch import load_file

    saved = load_file(result.model_dir / "adapter_model.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert all(v.abs().sum() > 0 for k, v in saved.items() if ".lora_B." in k)


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
    merged_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert merged_tokenizer.chat_template == get_template("chatml", merged_tokenizer).chat_template_jinja


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_gives_the_same_losses(tiny_model_dir, tmp_path, method):
    plain = losses_of(run_sft(tiny_model_dir, tmp_path / "plain", method, steps=3, gradient_checkpointing=False))
    ckpt = losses_of(run_sft(tiny_model_dir, tmp_path / "ckpt", method, steps=3, gradient_checkpointing=True))
    assert ckpt == pytest.approx(plain, abs=1e-5)
    assert len(plain) == 3


def losses_of(result):
    return [r["loss"] for r in map(json.loads, Path(result.summary["metrics"]).read_text().splitlines()) if "loss" in r]
