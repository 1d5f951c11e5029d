"""`corral delta make` / `apply` on the tiny model: the round trip within the storage dtype's bound (the module
docstring's), a grown vocabulary restored, bounded shards, and mismatches, a wrong base and damage named."""

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from corral.cli import main
from corral.models.delta import MANIFEST, DeltaError, apply_delta, make_delta, tensor_table
from tests.conftest import build_model


def fine_tune(base_dir, out, new_tokens=0, seed=1):
    """A stand-in for a fine-tune of `base_dir`: every weight moved by about 2% of itself (plus 2e-4, so weights
    near zero move by more than their size, as some do in a fine-tune), and `new_tokens` tokens added."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p * 0.02 * torch.randn(p.shape, generator=gen) + 2e-4 * torch.randn(p.shape, generator=gen))
    if new_tokens:
        tokenizer.add_tokens([f"<tool_{i}>" for i in range(new_tokens)])
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            model.get_input_embeddings().weight[-new_tokens:] = torch.randn(new_tokens, model.config.hidden_size,
                                                                            generator=gen)  # fmt: skip
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def target_dir(tiny_model_dir, tmp_path_factory):
    return fine_tune(tiny_model_dir, tmp_path_factory.mktemp("target"))


def weights(folder):
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def spacing(t: torch.Tensor) -> torch.Tensor:
    """One ulp of each weight (the spacing above |t|, the larger at a power of two), in float64."""
    return (torch.nextafter(t.abs(), torch.tensor(math.inf)) - t.abs()).double()


def ulps(restored: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (restored.double() - target.double()).abs() / spacing(target)


def within_bound(restored, target, base, unit_roundoff: float, absolute: float = 0.0) -> bool:
    """The module docstring's bound: |restored - t| <= |t - b| * u + ulp(t) (+ `absolute`, float16's subnormals)."""
    change = (target.double() - base.double()).abs()
    error = (restored.double() - target.double()).abs()
    return bool((error <= change * unit_roundoff + absolute + spacing(target)).all())


def test_float32_round_trip_within_one_ulp_same_generation_plain_transformers(tiny_model_dir, target_dir, tmp_path,
                                                                              capsys):
    delta, out = tmp_path / "delta", tmp_path / "restored"
    assert main(["delta", "make", "--base", str(tiny_model_dir), "--target", str(target_dir), "--output", str(delta),
                 "dtype=float32"]) == 0  # fmt: skip
    assert "peak RSS" in capsys.readouterr().out
    # Not loadable as a model by mistake: the weights are delta*.safetensors, beside the target's config and tokenizer.
    assert not (delta / "model.safetensors").exists() and (delta / "delta.safetensors").is_file()
    assert {"config.json", "tokenizer.json", MANIFEST, "README.md"} <= {p.name for p in delta.iterdir()}
    assert main(["delta", "apply", "--base", str(tiny_model_dir), "--delta", str(delta), "--output", str(out)]) == 0

    base, target, restored = weights(tiny_model_dir), weights(target_dir), weights(out)
    assert restored.keys() == target.keys()
    for name, t in target.items():
        assert within_bound(restored[name], t, base[name], 2**-24), name
        moved_less_than_itself = (t.double() - base[name].double()).abs() <= t.double().abs()
        assert ulps(restored[name], t)[moved_less_than_itself].max() <= 1, name
    same = sum((restored[k] == target[k]).sum().item() for k in target) / sum(v.numel() for v in target.values())
    assert same > 0.99, same

    model = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers
    original = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    greedy = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 1}
    assert torch.equal(model.generate(ids, **greedy), original.generate(ids, **greedy))
    assert len(AutoTokenizer.from_pretrained(out)) == len(AutoTokenizer.from_pretrained(target_dir))
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == str(tiny_model_dir) and front["library_name"] == "transformers"
    assert f"made by: `corral delta apply --base {tiny_model_dir}" in card


def test_float16_deltas_within_the_float16_rounding_of_the_change(tiny_model_dir, target_dir, tmp_path):
    make_delta(tiny_model_dir, target_dir, tmp_path / "d16", stored="float16")
    make_delta(tiny_model_dir, target_dir, tmp_path / "d32", stored="float32")
    sizes = [(tmp_path / d / "delta.safetensors").stat().st_size for d in ("d16", "d32")]
    assert sizes[0] < 0.55 * sizes[1]
    apply_delta(tiny_model_dir, tmp_path / "d16", tmp_path / "out")
    base, target, restored = weights(tiny_model_dir), weights(target_dir), weights(tmp_path / "out")
    for name, t in target.items():
        assert within_bound(restored[name], t, base[name], 2**-11, absolute=2**-25), name
        assert restored[name].dtype == torch.float32  # the target's dtype, not the storage dtype


def test_grown_vocabulary_rows_are_stored_whole_and_restored(tiny_model_dir, tmp_path):
    target = fine_tune(tiny_model_dir, tmp_path / "target", new_tokens=5)
    make_delta(tiny_model_dir, target, tmp_path / "delta", stored="float32")
    entry = json.loads((tmp_path / "delta" / MANIFEST).read_text())["tensors"]["model.embed_tokens.weight"]
    n = entry["base_rows"]
    assert entry["shape"][0] == n + 5
    # The new rows are the target's own values, not a difference.
    stored = load_file(tmp_path / "delta" / "delta.safetensors")["model.embed_tokens.weight"]
    want = load_file(target / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(stored[n:], want[n:])
    apply_delta(tiny_model_dir, tmp_path / "delta", tmp_path / "out")
    restored = load_file(tmp_path / "out" / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(restored[n:], want[n:])
    base = load_file(tiny_model_dir / "model.safetensors")["model.embed_tokens.weight"]
    assert within_bound(restored[:n], want[:n], base, 2**-24)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")  # the target's, with its new tokens
    assert tokenizer.convert_tokens_to_ids("<tool_4>") == n + 4
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.vocab_size == n + 5


def test_shards_stay_bounded_and_load(tiny_model_dir, target_dir, tmp_path):
    bound = 120_000
    result = make_delta(tiny_model_dir, target_dir, tmp_path / "delta", max_shard_bytes=bound)
    assert len(result.files) > 2 and all(f.startswith("delta-") for f in result.files)
    applied = apply_delta(tiny_model_dir, tmp_path / "delta", tmp_path / "out", max_shard_bytes=bound)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == applied.files
    for file in applied.files:  # a file over the bound holds a single tensor larger than it
        tensors = load_file(tmp_path / "out" / file)
        assert sum(t.nbytes for t in tensors.values()) <= bound or len(tensors) == 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.state_dict().keys() == AutoModelForCausalLM.from_pretrained(target_dir).state_dict().keys()


def test_mismatched_names_and_shapes_are_named(tiny_model_dir, tiny_tokenizer, tmp_path):
    deeper = tmp_path / "deeper"
    build_model(len(tiny_tokenizer), layers=3).save_pretrained(deeper)
    with pytest.raises(DeltaError, match=r"only in the target: 'model\.layers\.2\."):
        make_delta(tiny_model_dir, deeper, tmp_path / "d1")
    wider = tmp_path / "wider"
    build_model(len(tiny_tokenizer), hidden=32).save_pretrained(wider)
    with pytest.raises(DeltaError, match=r"'model\.norm\.weight': shape \[64\] in the base .*\[32\] in the target"):
        make_delta(tiny_model_dir, wider, tmp_path / "d2")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(DeltaError, match="pytorch_model.bin: re-save it"):
        tensor_table(tmp_path / "bin")
    assert not (tmp_path / "d1").exists() and not (tmp_path / "d2").exists()


def test_wrong_base_or_damaged_delta_is_a_named_error_without_traceback(tiny_model_dir, tiny_tokenizer, target_dir,
                                                                        tmp_path, capsys):
    delta = tmp_path / "delta"
    make_delta(tiny_model_dir, target_dir, delta)
    other = tmp_path / "other-base"  # same names and shapes, other weights
    build_model(len(tiny_tokenizer), seed=7).save_pretrained(other)
    assert main(["delta", "apply", "--base", str(other), "--delta", str(delta), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "corral delta apply: error: base tensor '" in err and "is not the one the delta was made from" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()

    half = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(half)
    with pytest.raises(DeltaError, match=r"is bfloat16, the delta's base float32"):
        apply_delta(half, delta, tmp_path / "o")

    manifest = json.loads((delta / MANIFEST).read_text())
    manifest["tensors"]["model.norm.weight"]["delta_sha256"] = "0" * 64
    (delta / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DeltaError, match=r"delta\.safetensors: tensor 'model\.norm\.weight' is damaged"):
        apply_delta(tiny_model_dir, delta, tmp_path / "o")
    with pytest.raises(DeltaError, match="not a delta folder: no delta.json"):
        apply_delta(tiny_model_dir, target_dir, tmp_path / "o")
