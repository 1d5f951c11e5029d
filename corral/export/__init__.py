"""A trained model in other runtimes' formats: GGUF for llama.cpp and Ollama (`gguf.py`, with the
tokenizer as GGUF metadata in `vocab.py`) and the Ollama Modelfile beside it (`modelfile.py`).

Components only: they take a loaded model, tokenizer and template and write files; the recipe
(`corral/recipes/export.py`) reads the config, loads and merges, and reports. This module stays
free of heavy imports: the config's list of output types comes from here.
"""

# Written by Corral's own writer (`gguf.py`), on the `gguf` package alone.
WRITTEN_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp's K-quant mixtures, made by its quantizer (llama-cpp-python, the `gguf_quant` extra).
K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")


class ExportError(ValueError):
    """The model, its tokenizer or the requested output cannot be exported; the message names what and why."""
