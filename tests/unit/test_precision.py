"""Precision that fits the CPU: what `auto` picks (`cpu_bf16_native`, `auto_mixed_precision`, `frozen_dtype`), and a
tiny SFT run under bf16 autocast against the same run in fp32.

tests/conftest.py sets CORRAL_CPU_BF16=0 for the whole suite (the pinned figures are fp32 on every machine); these
tests set it both ways themselves, and fake the flags and the probe where they test the detection."""

from __future__ import annotations

import json

import pytest
import torch

from corral.atomic import read_jsonl
from corral.models import load
from corral.models.load import cpu_bf16_native, frozen_dtype
from corral.train.harness import auto_mixed_precision


@pytest.fixture
def detection(monkeypatch):
    """Detection with faked flags and probe: set(flags, speedup) -> cpu_bf16_native() with the variable unset."""
    monkeypatch.delenv("CORRAL_CPU_BF16", raising=False)
    calls = []

    def set_(flags: set[str], speedup: float) -> bool:
        monkeypatch.setattr(load, "cpu_flags", lambda: flags)
        monkeypatch.setattr(load, "cpu_bf16_speedup", lambda: calls.append(1) or speedup)
        load._cpu_bf16_detected.cache_clear()
        return cpu_bf16_native()

    set_.calls = calls
    yield set_
    load._cpu_bf16_detected.cache_clear()  # the next caller detects the real machine again


def test_detection_needs_a_bf16_flag_and_a_probe_that_finds_bf16_faster(detection):
    assert detection({"avx512_bf16", "avx512f"}, 2.2) is True  # Zen 4: 2.1-2.7x measured
    assert detection({"amx_bf16", "amx_tile"}, 4.3) is True  # Sapphire Rapids
    assert detection({"avx512_bf16"}, 0.9) is False  # flag, but the kernels are not there: slower
    assert detection({"avx512_bf16"}, 1.1) is False  # within noise of fp32: not worth bf16's rounding
    calls = len(detection.calls)
    assert detection({"avx512f", "avx2"}, 9.0) is False  # no bf16 instructions: the probe is not even run
    assert len(detection.calls) == calls
    detection({"avx512_bf16"}, 2.0)
    cpu_bf16_native(), cpu_bf16_native()
    assert len(detection.calls) == calls + 1  # probed once per process, not per call


def test_the_variable_forces_it_both_ways_and_rejects_other_values(detection, monkeypatch):
    detection({"avx512_bf16"}, 2.0)
    monkeypatch.setenv("CORRAL_CPU_BF16", "0")
    assert cpu_bf16_native() is False
    detection({"avx2"}, 0.5)
    monkeypatch.setenv("CORRAL_CPU_BF16", "1")
    assert cpu_bf16_native() is True
    monkeypatch.setenv("CORRAL_CPU_BF16", "maybe")
    with pytest.raises(ValueError, match="CORRAL_CPU_BF16='maybe': expected 1 or 0"):
        cpu_bf16_native()


def test_the_real_probe_is_a_cached_positive_ratio():
    first = load.cpu_bf16_speedup()
    assert first > 0 and load.cpu_bf16_speedup() == first


def test_the_probe_multiplies_on_one_thread_and_restores_the_thread_count(monkeypatch):
    """A multi-threaded probe in the server's main thread would leave a second OpenMP team beside the engine
    thread's, which halved batch-1 decoding (see cpu_bf16_speedup)."""
    seen, randn = [], torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: seen.append(torch.get_num_threads()) or randn(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert load.cpu_bf16_speedup.__wrapped__() > 0
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_auto_mixed_precision_on_a_cpu_only_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CORRAL_CPU_BF16", "1")
    dtypes = ("auto", "float32", "bfloat16", "float16")
    assert [auto_mixed_precision(d) for d in dtypes] == ["bf16", "bf16", "bf16", "no"]
    monkeypatch.setenv("CORRAL_CPU_BF16", "0")
    assert [auto_mixed_precision(d) for d in dtypes] == ["no"] * 4


def test_frozen_weights_are_bf16_only_for_auto_on_cpu_under_bf16_autocast():
    assert frozen_dtype("auto", "bf16", "cpu") == "bfloat16"
    assert frozen_dtype("auto", "no", "cpu") == "auto"  # fp32 activations would meet bf16 weights
    assert frozen_dtype("float32", "bf16", "cpu") == "float32"  # asked for: kept
    assert frozen_dtype("auto", "bf16", "cuda") == "auto"  # resolve_dtype's bf16 / fp16 already


def _sft(model_dir, out, method: str, steps: int = 4) -> list[dict]:
    from corral.config import SFTConfig
    from corral.recipes import sft

    sft.run(SFTConfig(model=str(model_dir), template="chatml", method=method, output_dir=str(out),
                      data={"path": "builtin:corral_identity"}, lora={"r": 4, "alpha": 8, "dropout": 0.0},
                      train={"max_steps": steps, "batch_size": 2, "max_len": 96, "lr": 1e-3, "warmup_ratio": 0.0,
                             "resume": "never"}))  # fmt: skip
    return [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]


def test_lora_sft_under_auto_on_a_bf16_cpu_matches_fp32_and_records_its_precision(tiny_model_dir, tmp_path,
                                                                                    monkeypatch, capsys):
    """The same run twice, `auto` on a CPU faked without and with native bf16.

    Tolerance: a token's loss moves by at most twice the largest change of its logits, and bf16 keeps 8 bits of
    mantissa (a relative rounding of 2^-9 per operand). The tiny model's logits are about 0.1 (weights of std
    0.02 over 64 dims), each through a few rounded matmuls: a few x 2^-9 x 0.1, about 1e-3 at most over four
    steps; measured here 1e-4 to 2.3e-4. And not 0: a loss equal to fp32's would mean bf16 never ran."""
    monkeypatch.setenv("CORRAL_CPU_BF16", "0")
    fp32 = _sft(tiny_model_dir, tmp_path / "fp32", "lora")
    monkeypatch.setenv("CORRAL_CPU_BF16", "1")
    capsys.readouterr()
    bf16 = _sft(tiny_model_dir, tmp_path / "bf16", "lora")
    line = "precision: bf16 autocast; trained weights float32, frozen bfloat16 (CPU computes bf16 natively"
    assert line in capsys.readouterr().out
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(fp32, bf16)]
    assert len(diffs) == 4 and 0 < max(diffs) < 1e-3, diffs
    want = {"mixed_precision": "bf16", "device": "cpu", "trained_weights": "float32", "frozen_weights": "bfloat16",
            "cpu_bf16_native": True}
    assert bf16[0]["precision"] == want and all("precision" not in r for r in bf16[1:])
    assert json.loads((tmp_path / "bf16" / "summary.json").read_text())["precision"] == want
    assert fp32[0]["precision"] == {**want, "mixed_precision": "no", "frozen_weights": "float32",
                                    "cpu_bf16_native": False}


def test_under_auto_and_native_bf16_a_lora_base_is_bf16_its_adapter_and_full_weights_fp32(tiny_model_dir,
                                                                                          monkeypatch):
    from corral.config import SFTConfig
    from corral.recipes.sft import prepare_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CORRAL_CPU_BF16", "1")
    mixed = auto_mixed_precision("auto")
    cfg = SFTConfig(model=str(tiny_model_dir), template="chatml", method="lora", data={"path": "x.jsonl"})
    lora = prepare_model(cfg, "cpu", mixed)
    dtypes = {(p.requires_grad, p.dtype) for p in lora.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}  # peft keeps the adapter in fp32
    full = prepare_model(cfg.model_copy(update={"method": "full"}), "cpu", mixed)
    assert {p.dtype for p in full.parameters()} == {torch.float32}  # master weights; autocast computes in bf16


def test_a_lora_reward_model_over_a_bf16_base_trains_its_score_head_in_fp32(tiny_model_dir):
    from corral.config import RewardConfig
    from corral.recipes.reward import prepare_model

    cfg = RewardConfig(model=str(tiny_model_dir), template="chatml", method="lora", data={"path": "x.jsonl"})
    model = prepare_model(cfg, 1, "cpu", "bf16")
    trained = {name.split(".modules_to_save")[0].split(".")[-1]: p.dtype for name, p in model.named_parameters()
               if p.requires_grad and "modules_to_save" in name}
    assert trained == {"score": torch.float32}  # peft would copy it in bf16, where AdamW drops small updates
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
