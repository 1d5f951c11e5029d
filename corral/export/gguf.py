"""A transformers causal LM as one GGUF file, for llama.cpp, Ollama and transformers' GGUF reader.

Written with the `gguf` package's writer and its tables (architecture names, tensor-name maps, keys),
tensor by tensor: each is converted (cast, or quantized to q8_0 by `gguf.quants`) just before it is
written and dropped after, so memory stays at the model plus one tensor. The file is written beside
its target and renamed, so a crash never leaves half a GGUF under the name a runtime would load.

What differs from the Hugging Face layout, and why:

- Names: `model.layers.3.self_attn.q_proj.weight` becomes `blk.3.attn_q.weight` (the architecture's
  map in `gguf.get_tensor_name_map`). A tied output head is not written: llama.cpp and transformers
  both read a file without `output.weight` as tied.
- Rotary embedding: llama.cpp's Llama graph rotates adjacent pairs of each head's dimensions, HF's
  rotates the first half against the second. The same model in llama.cpp needs q and k rows of each
  head reordered from [0..d/2 | d/2..d] to interleaved (0, d/2, 1, d/2+1, ...), as Meta's original
  checkpoints were; transformers' reader undoes it. Qwen2 runs the halves ("NeoX") form: no reorder.
- Types: 1-D tensors and norms stay float32 in every output type (llama.cpp's kernels expect that);
  for q8_0 a matrix whose rows are not whole 32-value blocks falls back to float16.
- K-quants (q4_k_m, ...) are llama.cpp's own mixtures; they are made by its quantizer from a bf16
  file this module writes (`quantize_with_llama_cpp`, the optional `gguf_quant` extra).
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from corral.atomic import atomic_file
from corral.export import K_QUANTS, ExportError
from corral.export.vocab import gguf_vocab, write_vocab

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class Architecture:
    arch: gguf.MODEL_ARCH
    interleave_rope: bool  # llama.cpp's graph for it rotates adjacent pairs (see the module docstring)


# HF config.model_type -> the llama.cpp architecture it runs as. Mistral is Llama to llama.cpp.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(gguf.MODEL_ARCH.LLAMA, interleave_rope=True),
    "mistral": Architecture(gguf.MODEL_ARCH.LLAMA, interleave_rope=True),
    "qwen2": Architecture(gguf.MODEL_ARCH.QWEN2, interleave_rope=False),
}

# WRITTEN_OUTTYPES, each as (the type of its matrices, the file type recorded in general.file_type).
OUTTYPES: dict[str, tuple[Q, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
ROPE_TYPES = ("default", "linear", "yarn", "llama3")


def check_exportable(config, where: str) -> Architecture:
    """The llama.cpp architecture of a model config, or an error naming what cannot be exported (before any
    weights are read)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ExportError(f"{where}: model_type '{model_type}' is not one the GGUF export maps "
                          f"(mapped: {', '.join(ARCHITECTURES)})")
    heads = [a for a in getattr(config, "architectures", None) or [] if not a.endswith("ForCausalLM")]
    if heads:
        raise ExportError(f"{where}: {heads[0]} is not a causal LM (a reward model or classifier has no "
                          "llama.cpp equivalent)")
    rope_type = rope_parameters(config).get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ExportError(f"{where}: rope type '{rope_type}' has no GGUF equivalent (supported: "
                          f"{', '.join(ROPE_TYPES)})")
    return ARCHITECTURES[model_type]


def rope_parameters(config) -> dict:
    """transformers 5 keeps theta and scaling in `rope_parameters`; older configs in rope_theta / rope_scaling."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows (or bias entries) from HF's halves layout to llama.cpp's interleaved pairs:
    row j of the first half goes to 2j, row j of the second half to 2j + 1."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


@dataclass
class PlannedTensor:
    name: str  # GGUF name
    source: torch.Tensor  # in HF layout; reordered when converted
    qtype: Q
    rope_heads: int = 0  # >0: interleave_rope_rows with this many heads

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return self.source.numel() // block * size


def tensor_type(name: str, shape: tuple[int, ...], outtype: str) -> Q:
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return Q.F32
    qtype = OUTTYPES[outtype][0]
    if qtype == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        log.warning("%s: rows of %d values are not whole q8_0 blocks; written as f16", name, shape[-1])
        return Q.F16
    return qtype


def plan_tensors(model, arch: Architecture, outtype: str) -> list[PlannedTensor]:
    """Every parameter under its GGUF name and type (a tied output head appears once, as the embedding)."""
    config = model.config
    names = gguf.get_tensor_name_map(arch.arch, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    planned = []
    for hf_name, param in model.named_parameters():  # named_parameters lists a tied weight once
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"tensor {hf_name} {tuple(param.shape)} has no GGUF name for "
                              f"{gguf.MODEL_ARCH_NAMES[arch.arch]}")
        rope_heads = 0
        if arch.interleave_rope and name.startswith("blk.") and name.split(".")[2] in ("attn_q", "attn_k"):
            rope_heads = heads if name.split(".")[2] == "attn_q" else kv_heads
        planned.append(PlannedTensor(name, param.detach(), tensor_type(name, tuple(param.shape), outtype), rope_heads))
    if (rope_freqs := llama3_rope_factors(model)) is not None:
        planned.append(PlannedTensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_freqs, Q.F32))
    return planned


def llama3_rope_factors(model) -> torch.Tensor | None:
    """Llama 3.1's scaled rotary frequencies as llama.cpp's `rope_freqs` tensor: the factor each default frequency
    is divided by. Taken from the model's own rotary embedding, so it is transformers' computation."""
    if rope_parameters(model.config)["rope_type"] != "llama3":
        return None
    rotary = next(m for m in model.modules()
                  if hasattr(m, "inv_freq") and hasattr(m, "compute_default_rope_parameters"))
    default, _ = type(rotary).compute_default_rope_parameters(model.config)
    return (default / rotary.inv_freq.float().cpu()).contiguous()


def encode(tensor: PlannedTensor) -> np.ndarray:
    """The bytes of one tensor as the file stores them."""
    data = tensor.source
    if tensor.rope_heads:
        data = interleave_rope_rows(data, tensor.rope_heads)
    if tensor.qtype == Q.F32:
        return data.to(torch.float32).contiguous().numpy()
    if tensor.qtype == Q.F16:
        return data.to(torch.float16).contiguous().numpy()
    if tensor.qtype == Q.BF16:  # numpy has no bfloat16: the same 2 bytes, viewed as int16
        return data.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    return gguf.quants.quantize(data.to(torch.float32).contiguous().numpy(), tensor.qtype)


def write_hyperparameters(writer, config, name: str, outtype: str) -> None:
    """general.* and the architecture's keys llama.cpp's graph is built from (and transformers' reader maps)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(OUTTYPES[outtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        original = rope.get("original_max_position_embeddings")
        if original:
            writer.add_rope_scaling_orig_ctx_len(int(original))
        for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
                         ("attention_factor", writer.add_rope_scaling_yarn_attn_factor)):  # fmt: skip
            if rope.get(key) is not None:
                add(float(rope[key]))


@dataclass
class GGUFSummary:
    path: Path
    outtype: str
    tensors: int
    tied_output: bool
    vocab_model: str
    pre: str
    add_bos: bool  # the runtime adds BOS itself (so the Modelfile's template must not)


def write_gguf(model, tokenizer, path: str | Path, outtype: str, name: str, chat_template: str | None,
               eot_id: int | None) -> GGUFSummary:
    """Write `model` (a loaded HF causal LM, adapters merged) and `tokenizer` as one GGUF file of `outtype`
    (f32, f16, bf16, q8_0), atomically. `chat_template` goes in as tokenizer.chat_template, `eot_id` as the
    end-of-turn token llama.cpp stops a reply at."""
    if outtype not in OUTTYPES:
        raise ExportError(f"outtype '{outtype}' is not one this writer makes ({', '.join(OUTTYPES)})")
    config = model.config
    arch = check_exportable(config, name)
    vocab = gguf_vocab(tokenizer, model.get_input_embeddings().weight.shape[0])
    planned = plan_tensors(model, arch, outtype)
    path = Path(path)
    with torch.no_grad(), atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch.arch])
        try:
            write_hyperparameters(writer, config, name, outtype)
            write_vocab(writer, vocab, tokenizer, eot_id, chat_template)
            for tensor in planned:  # float32 dtype: the shape given is in elements even for block types
                writer.add_tensor_info(tensor.name, tuple(tensor.source.shape), np.float32, tensor.nbytes, tensor.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for tensor in planned:
                writer.write_tensor_data(encode(tensor))
        finally:
            writer.close()
    names = {t.name for t in planned}
    return GGUFSummary(path, outtype, len(planned), "output.weight" not in names, vocab.model, vocab.pre, vocab.add_bos)


def llama_cpp_quantizer(outtype: str):
    """llama-cpp-python's module, for a K-quant `outtype`; a clear error naming the extra when it is missing."""
    if outtype not in K_QUANTS:
        raise ExportError(f"outtype '{outtype}' is not a K-quant ({', '.join(K_QUANTS)})")
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(
            f"outtype {outtype} is made by llama.cpp's quantizer, which needs the optional extra gguf_quant: "
            "pip install 'corral[gguf_quant]' (llama-cpp-python); f32, f16, bf16 and q8_0 need nothing more"
        ) from None
    return llama_cpp


def quantize_with_llama_cpp(source: Path, target: Path, outtype: str, threads: int | None = None) -> Path:
    """A K-quant (`outtype` in K_QUANTS) of the GGUF file `source`, by llama.cpp's own quantizer through
    llama-cpp-python, written atomically to `target`. Nothing is downloaded or built here."""
    llama_cpp = llama_cpp_quantizer(outtype)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{outtype.upper()}")
    params.nthread = threads or os.cpu_count() or 1
    with atomic_file(target) as tmp:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0 or not tmp.is_file():
            raise ExportError(f"llama.cpp's quantizer failed to make {outtype} from {source} (status {status})")
    return target
