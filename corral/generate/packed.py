"""Linear layers on CPU with their weights pre-packed for oneDNN, for the engine's eager forward passes.

torch's CPU linear layers take a plain (out, in) weight and rearrange it into the blocked layout of
oneDNN's (bf16) or MKL's (float32) kernels at every call: for the few rows of a decode step that
rearrangement costs about as much as the product. oneDNN can take the weight in its own layout once
(`torch.ops.mkldnn._reorder_linear_weight`, what inductor does to a frozen model's weights) and skip
it from then on. Measured on SmolLM2-135M's 210 layer matrices, 2 AMD EPYC Zen 4 cores (AVX512-BF16):

    rows            1        16       640 (a prefill)
    bf16 plain    22.8 ms  29.3 ms  384 ms
    bf16 packed   12.4 ms  16.3 ms  338 ms    bit-equal to plain (the same oneDNN kernel)
    fp32 plain    39.3 ms  63.3 ms  822 ms    (MKL)
    fp32 packed   24.3 ms  30.7 ms  671 ms    oneDNN: another summation order, within 2e-6

Inside `PackedLinear` (a context manager over a model), a linear layer with a CPU weight of a packed
dtype runs oneDNN's kernel on the packed copy, made when the engine starts (`pack_all`) and made
again if the weight changes (its version counter moves at every in-place update, e.g. an optimizer
step). The copies are extra memory, about the size of the linear weights (`packed_bytes`).
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F

PACKED_DTYPES = (torch.bfloat16, torch.float32)
_BATCH_HINT = 16  # the rows oneDNN's layout is chosen for; measured equal from 1 to 640 rows (bf16)


def packable(weight: torch.Tensor, dtypes: tuple[torch.dtype, ...] = PACKED_DTYPES) -> bool:
    return (weight.device.type == "cpu" and weight.dim() == 2 and weight.dtype in dtypes and weight.layout == torch.strided
            and not weight.is_quantized and type(weight) in (torch.Tensor, torch.nn.Parameter))


def packed_bytes(model: torch.nn.Module, dtypes: tuple[torch.dtype, ...] = PACKED_DTYPES) -> int:
    """The memory the packed copies of `model`'s linear weights take (about their own size)."""
    seen = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and isinstance(weight, torch.Tensor) and packable(weight, dtypes):
            seen[id(weight)] = weight.numel() * weight.element_size()
    return sum(seen.values())


class PackedLinear:
    """Inside (`with packed:`), the model's linear layers (plain `nn.Linear`) whose weight is `packable` run on its
    packed copy; everything else runs as it would. One instance keeps its copies across uses: enter it for every
    forward pass. Entering gives each layer a `forward` of its own, and leaving takes it away: a torch function
    mode would do the same for `F.linear` alone but costs every other torch call of the model a Python round trip
    (measured: more than the packed weights save at one row)."""

    def __init__(self, model: torch.nn.Module, dtypes: tuple[torch.dtype, ...] = PACKED_DTYPES):
        self.model = model
        self.dtypes = dtypes
        self._copies: dict[int, tuple[weakref.ref, int, int, torch.Tensor]] = {}
        self._layers: list[torch.nn.Linear] = []

    def packed(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The packed copy of `weight`, or None where it is not packed (another device or dtype, or autograd)."""
        if not packable(weight, self.dtypes) or (weight.requires_grad and torch.is_grad_enabled()):
            return None
        key = id(weight)
        entry = self._copies.get(key)
        if entry is None or entry[0]() is not weight or entry[1] != weight._version or entry[2] != weight.data_ptr():
            copy = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _BATCH_HINT)
            self._copies[key] = entry = (weakref.ref(weight, lambda _, key=key: self._copies.pop(key, None)),
                                         weight._version, weight.data_ptr(), copy)
        return entry[3]

    def pack_all(self) -> None:
        """Make every layer's copy now (the engine does at start), so that no request waits for them."""
        with torch.no_grad():
            for layer in self.model.modules():
                if type(layer) is torch.nn.Linear:
                    self.packed(layer.weight)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`F.linear(x, weight, bias)`, on the packed copy where there is one."""
        copy = self.packed(weight) if x.dtype == weight.dtype and x.device.type == "cpu" else None
        if copy is None or (bias is not None and bias.dtype != weight.dtype):
            return F.linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, copy, bias, "none", [], "")

    def __enter__(self) -> PackedLinear:
        self._layers = [m for m in self.model.modules() if type(m) is torch.nn.Linear]  # not subclasses (4-bit, ...)
        for layer in self._layers:
            layer.forward = functools.partial(self._forward, layer)
        return self

    def __exit__(self, *exc) -> None:
        for layer in self._layers:
            layer.__dict__.pop("forward", None)
        self._layers = []

    def _forward(self, layer: torch.nn.Linear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs:  # not nn.Linear's own call: its own forward says what they mean
            return torch.nn.Linear.forward(layer, x, *args, **kwargs)
        return self.linear(x, layer.weight, layer.bias)
