"""`corral export gguf`: files transformers' GGUF reader loads back as the same model and tokenizer.

The round trip is the proof of the layout: q/k rows are written interleaved for llama.cpp's Llama graph
and transformers un-interleaves them on load, so equal logits mean both sides agree on the order (a
wrong order gives different attention, not an error). f32 must give the source's logits; f16 and bf16
the logits of the source with its matrices rounded the same way (norms stay f32); q8_0 stays within a
stated tolerance. The Modelfile's Go template is checked against Corral's own rendering.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from corral.chat.templates import TEMPLATES, get_template
from corral.config import ExportGGUFConfig
from corral.export import K_QUANTS, WRITTEN_OUTTYPES, ExportError
from corral.export.gguf import OUTTYPES, interleave_rope_rows
from corral.export.modelfile import (go_template, modelfile_text, rendered_transitions, reproduces,
                                     sample_conversations, spec_transitions)
from corral.recipes.export import gguf as export_gguf
from tests.conftest import IDENTITY, build_model

TEXTS = [
    "Hello world, I'm Corral's assistant.",
    "¡Hola! ¿Qué tal? Grüße aus Köln. Привет, мир. こんにちは世界。 مرحبا",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # comment\n\tif x != 0: pass",
    "emoji: 🦙🐑 👩‍💻 ✨ and numbers 1234567 3.14159",
    "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n",
    "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello </s>",
    "  leading spaces, trailing  \n\n\nnewlines",
]


def export(model_dir, folder: Path, outtype: str, **cfg) -> Path:
    out = folder / f"model-{outtype}.gguf"
    export_gguf(ExportGGUFConfig(model=str(model_dir), outtype=outtype, output=str(out), **cfg))
    return out


def load_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def load_source(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def rounded(model, dtype):
    """The model with its matrices rounded to `dtype` and back, as the file stores them (norms stay f32)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(p.to(dtype).float())
    return model


@torch.no_grad()
def greedy(model, ids: list[int], steps: int = 12) -> list[int]:
    """Greedy continuation with a KV cache, no stop token (the GGUF's config and the source's may name
    different eos ids; the weights are what is compared)."""
    ids, past, step = list(ids), None, list(ids)
    for _ in range(steps):
        out = model(torch.tensor([step]), past_key_values=past, use_cache=True)
        past, step = out.past_key_values, [int(out.logits[0, -1].argmax())]
        ids += step
    return ids


@torch.no_grad()
def logits(model, ids):
    return model(torch.tensor([ids])).logits[0]


def assert_same_ids(path: Path, tokenizer) -> None:
    """The tokenizer transformers reads from the GGUF cuts every text into the source tokenizer's ids."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        for special in (False, True):
            assert loaded(text, add_special_tokens=special)["input_ids"] == \
                tokenizer(text, add_special_tokens=special)["input_ids"], (text, special)
    assert loaded.chat_template == tokenizer.chat_template


@pytest.fixture(scope="module")
def exports(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gguf")
    return {outtype: export(tiny_model_dir, folder, outtype) for outtype in WRITTEN_OUTTYPES}


@pytest.fixture(scope="module")
def prompt(tiny_tokenizer) -> list[int]:
    return tiny_tokenizer("<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]


def test_outtype_names_are_the_writers():
    assert tuple(OUTTYPES) == WRITTEN_OUTTYPES
    assert set(ExportGGUFConfig.model_fields["outtype"].annotation.__args__) == {*WRITTEN_OUTTYPES, *K_QUANTS}


def test_interleave_puts_each_heads_halves_in_adjacent_pairs():
    rows = torch.arange(8.0).reshape(8, 1)  # two heads of four rows: [0 1 | 2 3] [4 5 | 6 7]
    assert interleave_rope_rows(rows, heads=2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert interleave_rope_rows(torch.arange(8.0), heads=2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]  # a bias


def test_f32_round_trip_gives_the_same_logits_and_greedy_tokens(exports, tiny_model_dir, prompt):
    source, loaded = load_source(tiny_model_dir), load_gguf(exports["f32"])
    assert type(loaded).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(loaded, prompt), logits(source, prompt), rtol=0, atol=1e-5)
    assert greedy(loaded, prompt) == greedy(source, prompt)


@pytest.mark.parametrize("outtype, dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_round_trip_equals_the_source_rounded_the_same_way(exports, tiny_model_dir, prompt, outtype, dtype):
    reference, loaded = rounded(load_source(tiny_model_dir), dtype), load_gguf(exports[outtype])
    torch.testing.assert_close(logits(loaded, prompt), logits(reference, prompt), rtol=0, atol=1e-5)
    assert greedy(loaded, prompt) == greedy(reference, prompt)


def test_q8_0_logits_within_tolerance(exports, tiny_model_dir, prompt):
    # q8_0: one f16 scale per 32 values, 8-bit values: about 0.4% of a block's largest weight per weight.
    expected, got = logits(load_source(tiny_model_dir), prompt), logits(load_gguf(exports["q8_0"]), prompt)
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()
    assert (got - expected).abs().max() > 0  # it is quantized


def test_file_metadata_tokenizer_and_types(exports, tiny_tokenizer):
    reader = gguf.GGUFReader(exports["q8_0"])
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert field("llama.rope.freq_base") == 10000.0 and field("llama.rope.dimension_count") == 16
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    vocab = tiny_tokenizer.get_vocab()
    assert field("tokenizer.ggml.bos_token_id") == vocab["<s>"]
    assert field("tokenizer.ggml.eos_token_id") == vocab["</s>"]
    assert field("tokenizer.ggml.eot_token_id") == vocab["<|im_end|>"]  # the template's end of turn, not eos
    assert field("tokenizer.ggml.add_bos_token") is False
    types = field("tokenizer.ggml.token_type")
    assert types[vocab["<|im_start|>"]] == gguf.TokenType.CONTROL and types[vocab["Ġthe"]] == gguf.TokenType.NORMAL
    assert field("tokenizer.chat_template") == tiny_tokenizer.chat_template
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: no separate output head
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_q_and_k_rows_are_stored_interleaved(exports, tiny_model_dir):
    source = load_source(tiny_model_dir)
    tensors = {t.name: t for t in gguf.GGUFReader(exports["f32"]).tensors}
    attn = source.model.layers[0].self_attn
    for name, weight, heads in (("attn_q", attn.q_proj.weight, 4), ("attn_k", attn.k_proj.weight, 2)):
        stored = torch.from_numpy(np.array(tensors[f"blk.0.{name}.weight"].data)).reshape(weight.shape)
        assert torch.equal(stored, interleave_rope_rows(weight.detach(), heads)) and not torch.equal(stored, weight)
    stored_v = np.array(tensors["blk.0.attn_v.weight"].data).reshape(attn.v_proj.weight.shape)
    assert np.array_equal(stored_v, attn.v_proj.weight.detach().numpy())


def test_tokenizer_gives_the_same_ids(exports, tiny_tokenizer):
    assert_same_ids(exports["f16"], tiny_tokenizer)


def test_untied_output_head_is_written_and_loads(tmp_path, tiny_tokenizer, prompt):
    model = build_model(len(tiny_tokenizer), seed=1)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.02)
    model.save_pretrained(tmp_path / "untied")
    tiny_tokenizer.save_pretrained(tmp_path / "untied")
    path = export(tmp_path / "untied", tmp_path, "f32")
    assert "output.weight" in {t.name for t in gguf.GGUFReader(path).tensors}
    source = load_source(tmp_path / "untied")
    torch.testing.assert_close(logits(load_gguf(path), prompt), logits(source, prompt), rtol=0, atol=1e-5)


def test_adapter_exports_like_its_merged_model(tiny_lora_dir, tiny_model_dir, tmp_path, prompt):
    from peft import PeftModel

    path = export(tiny_lora_dir, tmp_path, "f32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", path.name]  # no merged copy on disk
    merged = PeftModel.from_pretrained(load_source(tiny_model_dir), tiny_lora_dir).merge_and_unload()
    torch.testing.assert_close(logits(load_gguf(path), prompt), logits(merged, prompt), rtol=0, atol=1e-5)
    assert not torch.allclose(logits(merged, prompt), logits(load_source(tiny_model_dir), prompt))


@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
def test_other_mapped_architectures_round_trip(model_type, tmp_path, tiny_tokenizer, prompt):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)  # 8 embedding rows past the tokenizer, as padded vocabularies have: written as [PADi]
    config = AutoConfig.for_model(model_type, vocab_size=len(tiny_tokenizer) + 8, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=1024, tie_word_embeddings=True, sliding_window=None)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / model_type)
    tiny_tokenizer.save_pretrained(tmp_path / model_type)
    path = export(tmp_path / model_type, tmp_path, "f32")
    source, loaded = load_source(tmp_path / model_type), load_gguf(path)
    if model_type == "qwen2":  # q/k/v biases, and no row reorder (llama.cpp runs Qwen2's rotary as HF does)
        assert source.model.layers[0].self_attn.q_proj.bias is not None
    torch.testing.assert_close(logits(loaded, prompt), logits(source, prompt), rtol=0, atol=1e-5)


def test_unmapped_architecture_is_refused_by_name(tmp_path, capsys):
    from transformers import GPT2Config

    from corral.cli import main

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    assert main(["export", "gguf", str(tmp_path / "gpt2"), "--output", str(tmp_path / "x.gguf")]) == 1
    err = capsys.readouterr().err
    assert "model_type 'gpt2' is not one the GGUF export maps (mapped: llama, mistral, qwen2)" in err
    assert str(tmp_path / "gpt2" / "config.json") in err
    assert not list(tmp_path.glob("x.gguf*"))


def test_the_documented_commands_write_what_ollama_and_llama_cpp_read(tiny_lora_dir, tmp_path, monkeypatch, capsys):
    """docs/export.md: `corral export gguf runs/sft-lora/model --outtype q8_0 --output mymodel.gguf`, then
    `ollama create mymodel -f Modelfile` and `llama-cli -m mymodel.gguf` read these two files."""
    from corral.cli import main

    shutil.copytree(tiny_lora_dir, tmp_path / "runs" / "sft-lora" / "model")
    monkeypatch.chdir(tmp_path)
    assert main(["export", "gguf", "runs/sft-lora/model", "--outtype", "q8_0", "--output", "mymodel.gguf"]) == 0
    text = capsys.readouterr().out
    assert "wrote mymodel.gguf (q8_0, " in text and " MiB, " in text and " s, peak RSS " in text  # time, size, RSS
    assert "ollama create NAME -f Modelfile" in text and "llama-cli -m mymodel.gguf" in text
    assert "FROM ./mymodel.gguf\n" in Path("Modelfile").read_text()
    assert gguf.GGUFReader("mymodel.gguf").fields["general.name"].contents() == "mymodel"
    assert main(["export", "gguf", "runs/sft-lora/model"]) == 0  # no --output: named after the run, f16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "mymodel.gguf", "runs", "sft-lora-f16.gguf"]


def test_rope_scaling_is_written(tmp_path, tiny_tokenizer):
    from corral.export.gguf import write_gguf

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    linear = {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}
    for rope_parameters, expect in ((rope, "rope_freqs"), (linear, "linear")):
        model = build_model(len(tiny_tokenizer))
        model.config.rope_parameters = rope_parameters
        model = type(model)(model.config)  # rebuilt so its rotary embedding takes the scaling
        path = write_gguf(model, tiny_tokenizer, tmp_path / f"{expect}.gguf", "f32", "t", None, None).path
        reader = gguf.GGUFReader(path)
        tensors = {t.name: t for t in reader.tensors}
        if expect == "rope_freqs":  # llama.cpp divides each default frequency by these
            default = 1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16))
            factors = torch.from_numpy(np.array(tensors["rope_freqs.weight"].data))
            torch.testing.assert_close(default / factors, model.model.rotary_emb.inv_freq)
            assert factors[0] == 1.0 and factors[-1] == pytest.approx(8.0)  # high frequencies kept, low ones scaled
        else:
            assert reader.fields["llama.rope.scaling.type"].contents() == "linear"
            assert reader.fields["llama.rope.scaling.factor"].contents() == 4.0


def build_spm_tokenizer():
    """A Llama-2-style tokenizer: SentencePiece BPE (▁ for spaces) with byte fallback, built here."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    texts = [turn["value"] for line in IDENTITY.read_text().splitlines() for turn in json.loads(line)["conversations"]]
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trained.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=500, show_progress=False))
    state = json.loads(trained.to_str())["model"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))])}
    for token in sorted(state["vocab"], key=state["vocab"].get):
        vocab.setdefault(token, len(vocab))
    tokenizer = LlamaTokenizer(vocab=vocab, merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                                    for m in state["merges"]])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def test_sentencepiece_tokenizer_exports_as_llama_with_scores(tmp_path):
    tokenizer = build_spm_tokenizer()
    build_model(len(tokenizer)).save_pretrained(tmp_path / "spm")
    tokenizer.save_pretrained(tmp_path / "spm")
    path = export(tmp_path / "spm", tmp_path, "f16", template="llama2")
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    vocab = tokenizer.get_vocab()
    assert types[vocab["<0x0A>"]] == gguf.TokenType.BYTE and types[vocab["<unk>"]] == gguf.TokenType.UNKNOWN
    assert types[vocab["<s>"]] == gguf.TokenType.CONTROL and types[vocab["<|im_end|>"]] == gguf.TokenType.CONTROL
    first_merge = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"][0]
    first_merge = "".join(first_merge) if isinstance(first_merge, list) else first_merge.replace(" ", "")
    assert scores[vocab[first_merge]] == 0.0 and max(scores) == 0.0  # the first merge joins first
    assert reader.fields["tokenizer.ggml.add_space_prefix"].contents() is True
    tokenizer.chat_template = get_template("llama2", tokenizer).chat_template_jinja  # the template named
    assert_same_ids(path, tokenizer)


CHATML_MODELFILE = '''# Ollama Modelfile for model-f16.gguf, written by `corral export gguf`.
# ollama create NAME -f Modelfile && ollama run NAME
# TEMPLATE: Corral's 'chatml' template, from its pieces (the text Corral trained with).
FROM ./model-f16.gguf
TEMPLATE """{{ $prev := "" }}{{ range .Messages }}{{ if eq $prev "" }}{{ if eq .Role "system" }}<|im_start|>system
{{ else }}<|im_start|>user
{{ end }}{{ else if eq .Role "user" }}{{ if eq $prev "system" }}<|im_end|>
<|im_start|>user
{{ else }}<|im_end|>
<|im_start|>user
{{ end }}{{ else if eq .Role "assistant" }}<|im_end|>
<|im_start|>assistant
{{ end }}{{ .Content }}{{ $prev = .Role }}{{ end }}{{ if eq $prev "assistant" }}<|im_end|>
{{ else }}<|im_end|>
<|im_start|>assistant
{{ end }}"""
PARAMETER stop "<|im_end|>"
PARAMETER temperature 0.7
PARAMETER top_p 0.9
'''


def test_modelfile_for_chatml(tiny_model_dir, tmp_path):
    path = export(tiny_model_dir, tmp_path, "f16", template="chatml")
    assert (tmp_path / "Modelfile").read_text() == CHATML_MODELFILE
    reader = gguf.GGUFReader(path)  # the GGUF carries the template named, as its Jinja
    assert "<|im_start|>" in reader.fields["tokenizer.chat_template"].contents()


@pytest.mark.parametrize("name", [*TEMPLATES, "auto"])
def test_transitions_reproduce_every_template(name, tiny_tokenizer):
    template = get_template(name, tiny_tokenizer)
    transitions = rendered_transitions(template)
    if name != "auto":  # from the declaration's pieces and from its renderings: the same text
        assert spec_transitions(template.spec) == transitions
    assert reproduces(transitions, template) == len(sample_conversations())


def test_auto_template_is_marked_best_effort_and_a_saved_registered_one_is_recognised(tiny_tokenizer):
    auto = get_template("auto", tiny_tokenizer)
    text = modelfile_text("m.gguf", auto, tiny_tokenizer, add_bos=False, temperature=0.2, top_p=1.0)
    assert "best effort" in text and "may need checking" in text and "PARAMETER temperature 0.2" in text
    saved = copy.deepcopy(tiny_tokenizer)
    saved.chat_template = get_template("vicuna_v1.1", tiny_tokenizer).chat_template_jinja  # as save_model saves it
    text = modelfile_text("m.gguf", get_template("auto", saved), saved, add_bos=True, temperature=0.7, top_p=0.9)
    assert "Corral's 'vicuna_v1.1' template" in text and "The leading <s> is left out" in text
    assert 'TEMPLATE """{{ $prev := "" }}{{ range .Messages }}{{ if eq $prev "" }}{{ if eq .Role "system" }}' \
           '{{ else }}A chat between' in text  # BOS dropped: the runtime adds it


@pytest.mark.skipif(shutil.which("go") is None, reason="Go is not installed: the TEMPLATE is checked in Python only")
def test_go_renders_the_template_as_corral_does(tiny_tokenizer, tmp_path):
    """Go's own text/template (Ollama's engine) renders every registered template as Corral does."""
    program = tmp_path / "render.go"
    program.write_text(GO_RENDERER)
    cases = []
    for name in [*TEMPLATES, "auto"]:
        template = get_template(name, tiny_tokenizer)
        for conv in sample_conversations():
            cases.append({"template": go_template(rendered_transitions(template)),
                          "messages": [{"Role": m.role, "Content": m.content} for m in conv.messages],
                          "expected": template.render_text(conv, conv.messages[-1].role == "user")})
    run = subprocess.run(["go", "run", str(program)], input=json.dumps(cases), capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"{len(cases)} rendered as expected"


GO_RENDERER = """package main

import ("encoding/json"; "fmt"; "os"; "strings"; "text/template")

type Message struct { Role string; Content string }
type Case struct { Template string; Messages []Message; Expected string }

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil { panic(err) }
	for i, c := range cases {
		var out strings.Builder
		t := template.Must(template.New("t").Parse(c.Template))
		if err := t.Execute(&out, map[string]any{"Messages": c.Messages}); err != nil { panic(err) }
		if out.String() != c.Expected { fmt.Printf("case %d: got %q want %q\\n", i, out.String(), c.Expected); os.Exit(1) }
	}
	fmt.Printf("%d rendered as expected\\n", len(cases))
}
"""


def test_k_quant_without_the_extra_names_it_before_loading(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    with pytest.raises(ExportError, match=r"pip install 'corral\[gguf_quant\]' \(llama-cpp-python\)"):
        export_gguf(ExportGGUFConfig(model=str(tmp_path / "not-even-there"), outtype="q4_k_m",
                                     output=str(tmp_path / "m.gguf")))


def test_k_quant_goes_through_llama_cpps_quantizer(monkeypatch, tiny_model_dir, tmp_path):
    """The call into llama-cpp-python, with a stand-in module: bf16 source, the ftype asked, atomic target."""
    import ctypes
    import types

    calls = []

    class Params(ctypes.Structure):
        _fields_ = [("ftype", ctypes.c_int), ("nthread", ctypes.c_int)]

    def quantize(source, target, params):
        calls.append((Path(source.decode()), Path(target.decode()), params._obj.ftype))
        shutil.copy(source.decode(), target.decode())
        return 0

    fake = types.SimpleNamespace(llama_model_quantize_default_params=Params, llama_model_quantize=quantize,
                                 LLAMA_FTYPE_MOSTLY_Q4_K_M=15)
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    path = export(tiny_model_dir, tmp_path, "q4_k_m")
    (source, target, ftype), = calls
    assert ftype == 15 and target.name.startswith(path.name + ".tmp-") and "bf16" in source.name
    assert gguf.GGUFReader(path).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_BF16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", path.name]  # the bf16 file removed


def test_real_k_quant_loads_back(tiny_model_dir, tmp_path, prompt):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the gguf_quant extra) is not installed")
    path = export(tiny_model_dir, tmp_path, "q4_k_m")
    expected, got = logits(load_source(tiny_model_dir), prompt), logits(load_gguf(path), prompt)
    assert (got - expected).abs().max() <= 0.2 * expected.abs().max()


@pytest.mark.slow
def test_embedded_model_f16_keeps_tokens_and_greedy_replies(tmp_path, monkeypatch):
    """The real SmolLM2 (the recipe's plumbing is the tiny tests'; this is the writer on a real model and vocab)."""
    import functools

    from corral.export.gguf import write_gguf
    from corral.models.load import load_tokenizer, resolve_model

    # transformers' GGUF loader rebuilds the same tensor-name map for each of the model's ~400 submodules (seconds
    # on 2 cores); a cache keeps this test under 30 s and changes no name.
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
    model, tokenizer = load_source(resolve_model("smollm2-135m").path), load_tokenizer("smollm2-135m")
    path = write_gguf(model, tokenizer, tmp_path / "smollm2-f16.gguf", "f16", "smollm2", tokenizer.chat_template,
                      tokenizer.convert_tokens_to_ids("<|im_end|>")).path
    assert_same_ids(path, tokenizer)
    ids = tokenizer("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    with torch.no_grad():  # the source rounded as the file stores it: matrices to f16 and back, norms as they are
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(p.half().float())
    assert greedy(load_gguf(path), ids, 6) == greedy(model, ids, 6)


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_llama_cpp_reads_the_file_as_corral_does(outtype, tiny_model_dir, tmp_path, tiny_tokenizer, prompt):
    """With llama-cpp-python installed: llama.cpp tokenizes the prompt to Corral's ids, continues it greedily with
    the same tokens as the source model (rounded as the file stores it), and carries the chat template Corral
    trained with. Skips without the package (CI does not build llama.cpp)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the gguf_quant extra) is not installed")
    path = export(tiny_model_dir, tmp_path, outtype, template="chatml")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False)
    text = tiny_tokenizer.decode(prompt)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt
    steps = 6
    theirs = []
    for token in llm.generate(prompt, temp=0.0):
        theirs.append(token)
        if len(theirs) == steps:
            break
    source = load_source(tiny_model_dir) if outtype == "f32" else rounded(load_source(tiny_model_dir), torch.float16)
    assert theirs == greedy(source, prompt, steps)[len(prompt):]
    from corral.chat.templates import get_template

    assert llm.metadata["tokenizer.chat_template"] == get_template("chatml", tiny_tokenizer).chat_template_jinja
