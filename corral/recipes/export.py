"""`corral export gguf`: a model folder or LoRA adapter as one GGUF file (llama.cpp, Ollama), with an
Ollama Modelfile beside it.

An adapter is merged into its base in memory (no merged copy on disk). The GGUF carries the chat
template the model was trained with (the saved tokenizer's, or the one named) and its end-of-turn
token, so llama.cpp and Ollama format prompts as training did. K-quants go through llama.cpp's own
quantizer (optional extra `gguf_quant`) from an intermediate bf16 file that is removed afterwards.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

from corral.config import ExportGGUFConfig
from corral.export import K_QUANTS, ExportError

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    path: Path
    modelfile: Path | None
    seconds: float
    size_bytes: int
    peak_rss_mib: float


def default_output(model: str, outtype: str) -> Path:
    """NAME-OUTTYPE.gguf in the current folder; NAME is the model folder's name (its parent's for `.../model`)."""
    path = Path(model)
    name = path.parent.name if path.name == "model" and path.parent.name else path.name
    return Path(f"{name or 'model'}-{outtype}.gguf")


def bound_template(name: str, tokenizer):
    """(the template bound to the tokenizer, the Jinja the GGUF carries). A named template must bind; with `auto`
    the tokenizer's own Jinja goes into the file as it is even when Corral cannot segment it (no template then:
    the Modelfile passes prompts through), and a tokenizer without one gives (None, None)."""
    from corral.chat.templates import TemplateError, get_template

    if name != "auto":
        template = get_template(name, tokenizer)
        return template, template.chat_template_jinja
    if not tokenizer.chat_template:
        return None, None
    try:
        return get_template("auto", tokenizer), tokenizer.chat_template
    except TemplateError as e:
        log.warning("the tokenizer's chat_template is written to the GGUF, but the Modelfile cannot follow it: %s", e)
        return None, tokenizer.chat_template


def end_of_turn_id(template, tokenizer) -> int | None:
    """The token a reply ends with in this template (llama.cpp's tokenizer.ggml.eot_token_id), if it is one."""
    for stop in template.stop_strings if template is not None else []:
        ids = tokenizer(stop, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return ids[0]
    return None


def load_for_export(name: str, dtype: str):
    """The causal LM `name` on CPU with an adapter merged in (no copy on disk), and its tokenizer. Configs are
    checked first: nothing is loaded for a model or adapter that cannot be exported."""
    from transformers import AutoConfig

    from corral.export.gguf import check_exportable
    from corral.models.adapters import is_adapter
    from corral.models.load import load_model, load_tokenizer, resolve_model

    resolved = resolve_model(name)
    if resolved.adapter:
        from peft import PeftConfig

        adapter = PeftConfig.from_pretrained(resolved.adapter)
        if adapter.is_prompt_learning:
            raise ExportError(f"{name} is a {adapter.peft_type.value} adapter: it trains virtual tokens, not weights, "
                              "and llama.cpp has no equivalent; export a LoRA adapter or a full model")
        if adapter.task_type not in (None, "CAUSAL_LM"):
            raise ExportError(f"{name} is a {adapter.task_type} adapter, not a causal LM (CAUSAL_LM) one")
    check_exportable(AutoConfig.from_pretrained(resolved.path), f"{resolved.path}/config.json")
    model = load_model(name, dtype=dtype, device="cpu")
    if is_adapter(model):
        model = model.merge_and_unload()  # LoRA (QLoRA too: the base is loaded unquantized) folded in memory
    return model, load_tokenizer(name)


def gguf(cfg: ExportGGUFConfig) -> ExportResult:
    from corral.atomic import atomic_write_text
    from corral.export.gguf import llama_cpp_quantizer, quantize_with_llama_cpp, write_gguf
    from corral.export.modelfile import modelfile_text

    started = time.perf_counter()
    output = Path(cfg.output) if cfg.output else default_output(cfg.model, cfg.outtype)
    if output.suffix != ".gguf":
        raise ExportError(f"output {output}: a GGUF file's name ends in .gguf")
    if cfg.outtype in K_QUANTS:
        llama_cpp_quantizer(cfg.outtype)  # a missing extra fails now, not after loading and writing
    model, tokenizer = load_for_export(cfg.model, cfg.dtype)
    template, chat_template = bound_template(cfg.template, tokenizer)
    write = dict(name=output.stem, chat_template=chat_template, eot_id=end_of_turn_id(template, tokenizer))
    if cfg.outtype in K_QUANTS:
        source = output.with_name(f"{output.stem}.bf16-{os.getpid()}.gguf")
        try:
            summary = write_gguf(model, tokenizer, source, "bf16", **write)
            del model  # llama.cpp's quantizer reads the file; the weights are not needed any more
            quantize_with_llama_cpp(source, output, cfg.outtype)
        finally:
            source.unlink(missing_ok=True)
    else:
        summary = write_gguf(model, tokenizer, output, cfg.outtype, **write)
    modelfile = None
    if cfg.modelfile:
        text = modelfile_text(output.name, template, tokenizer, summary.add_bos, cfg.temperature, cfg.top_p)
        modelfile = atomic_write_text(output.with_name("Modelfile"), text)
    seconds = time.perf_counter() - started
    size = output.stat().st_size
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    tied = ", output head tied to the embedding" if summary.tied_output else ""
    print(f"wrote {output} ({cfg.outtype}, {size / 2**20:,.1f} MiB, {summary.tensors} tensors{tied}; tokenizer "
          f"{summary.vocab_model}/{summary.pre}) in {seconds:.1f} s, peak RSS {peak:,.0f} MiB")
    if modelfile is not None:
        print(f"wrote {modelfile}: ollama create NAME -f {modelfile}")
    print(f"llama.cpp: llama-cli -m {output}")
    return ExportResult(output, modelfile, seconds, size, peak)
