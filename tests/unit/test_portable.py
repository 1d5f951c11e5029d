"""Saved folders travel: adapters and merged models of the embedded model name it by its hub id, which Corral's
loader maps back to the local conversion; every folder has a model card; merge takes QLoRA adapters and refuses
prompt-learning ones with the reason."""

import dataclasses
import json
import shutil

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from corral.chat.templates import get_template
from corral.models import embedded, load
from corral.models.adapters import add_lora, add_prefix, merge_adapter
from corral.models.load import base_license, load_model, load_tokenizer, resolve_model, running_command, save_model

HUB_ID = "corral-test/Tiny-Embedded"
IDS = torch.tensor([[5, 17, 42, 99, 3, 250]])


@pytest.fixture
def fake_embedded(monkeypatch, corral_cache, tmp_path, tiny_model_dir):
    """The tiny model as an installed embedded model (`tiny-embedded`, hub id HUB_ID), converted already."""
    fake = embedded.EmbeddedModel(name="tiny-embedded", package="json", pip_name="tiny-embedded",
                                  gguf_file="tiny.gguf", hub_id=HUB_ID, license="mit")  # fmt: skip
    monkeypatch.setitem(embedded.EMBEDDED, fake.name, fake)  # `json` is installed: so is the fake package
    folder = embedded.embedded_folder(fake.name)
    shutil.copytree(tiny_model_dir, folder)
    monkeypatch.setattr(load, "embedded_gguf", lambda name: tmp_path / fake.gguf_file)  # converted: never read
    return folder


def lora_of(model, quantized=False):
    torch.manual_seed(0)
    model = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], quantized=quantized)
    with torch.no_grad():  # B starts at zero; a trained adapter's is not
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model.eval()


def front_matter(folder):
    return yaml.safe_load((folder / "README.md").read_text().split("---")[1])


def mentions(folder, text: str) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.is_file() and p.suffix in (".json", ".md", ".jinja")
            and text in p.read_text()]  # fmt: skip


def test_adapter_of_the_embedded_model_names_its_hub_id_and_loads_back(fake_embedded, tmp_path, monkeypatch):
    model = lora_of(load_model("tiny-embedded", device="cpu"))
    tokenizer = load_tokenizer("tiny-embedded")
    card = {"title": "Corral SFT (lora) of tiny-embedded", "method": "lora", "data": "builtin:corral_identity",
            "metrics": {"eval_loss": 1.25}}  # fmt: skip
    with running_command(["corral", "sft", "--model", "tiny-embedded"]):
        save_model(model, tokenizer, get_template("chatml", tokenizer), tmp_path / "adapter", card=card)
    adapter = tmp_path / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    assert mentions(adapter, str(fake_embedded)) == []  # no path of this machine's cache in any file
    meta = front_matter(adapter)
    assert (meta["base_model"], meta["library_name"], meta["license"]) == (HUB_ID, "peft", "mit")
    text = (adapter / "README.md").read_text()
    for line in ("- method: lora", "- data: builtin:corral_identity", "| eval_loss | 1.25 |",
                 "- made by: `corral sft --model tiny-embedded`", "- chat template: `chatml`"):
        assert line in text, line
    # Here the hub id is the local conversion (offline: HF_HUB_OFFLINE is set for the tests), so it loads back.
    assert resolve_model(HUB_ID).path == str(fake_embedded)
    again = load_model(str(adapter), device="cpu")
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)
    # Without the package the hub id is the hub's model.
    monkeypatch.setitem(embedded.EMBEDDED, "tiny-embedded",
                        dataclasses.replace(embedded.EMBEDDED["tiny-embedded"], package="corral_no_such_package"))
    assert resolve_model(HUB_ID).path == HUB_ID


def test_merged_model_of_the_embedded_model_is_portable(fake_embedded, tmp_path):
    model = lora_of(load_model("tiny-embedded", device="cpu"))
    save_model(model, load_tokenizer("tiny-embedded"), None, tmp_path / "adapter")
    merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, model(IDS).logits, atol=1e-5, rtol=1e-5)
    assert mentions(tmp_path / "merged", str(fake_embedded)) == []
    meta = front_matter(tmp_path / "merged")
    assert (meta["base_model"], meta["library_name"], meta["license"]) == (HUB_ID, "transformers", "mit")


def test_qlora_adapter_merges_into_the_unquantized_base_in_the_dtype_asked(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
    from peft import PeftModel
    from safetensors.torch import load_file

    quantized = lora_of(load_model(str(tiny_model_dir), quant_bits=4, device="cpu"), quantized=True)
    assert type(quantized.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    save_model(quantized, load_tokenizer(str(tiny_model_dir)), None, tmp_path / "qlora")
    merge_adapter(tmp_path / "qlora", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    unquantized = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = PeftModel.from_pretrained(unquantized, tmp_path / "qlora").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, reference(IDS).logits, atol=1e-5, rtol=1e-5)
    merge_adapter(tmp_path / "qlora", tmp_path / "merged-bf16", dtype="bfloat16")
    assert {t.dtype for t in load_file(tmp_path / "merged-bf16" / "model.safetensors").values()} == {torch.bfloat16}
    assert "merged into its unquantized base (bfloat16)" in (tmp_path / "merged-bf16" / "README.md").read_text()


def test_prefix_adapter_is_refused_with_the_reason(tiny_model_dir, tmp_path):
    add_prefix(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 4).save_pretrained(tmp_path / "prefix")
    with pytest.raises(ValueError, match="prefix-tuning adapter: it trains virtual tokens .* nothing to fold"):
        merge_adapter(tmp_path / "prefix", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_license_comes_from_the_base_card_when_it_has_one(tiny_model_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "README.md").write_text("---\nlicense: llama2\nlanguage: en\n---\n# A base\n")
    assert base_license(str(base)) == "llama2"
    assert base_license(str(tiny_model_dir)) is None and base_license("corral-test/not-cached") is None
    save_model(load_model(str(base), device="cpu"), load_tokenizer(str(base)), None, tmp_path / "full")
    assert front_matter(tmp_path / "full")["license"] == "llama2"
