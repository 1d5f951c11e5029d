"""The compiled decode step's matrix-vector products, written as fused reductions.

A decode step of one or two rows multiplies every weight matrix by a vector or two, and that is
bound by how fast the weights are read. torch's kernels for such products read them slowly on CPU:
MKL's float32 matrix-vector product at about 11 GB/s and oneDNN's bf16 one at about 10 GB/s on 2
AMD EPYC Zen 4 cores, where a plain `sum` over the same bytes reads 26-36 GB/s. Written as an
elementwise product summed over the input features (`(x[..., None, :] * w).sum(-1)`, in float32), a
product is one reduction loop that inductor generates as vectorised C++ and that streams each
weight once: 22 GB/s in float32 and 16 GB/s in bf16 on the same cores (SmolLM2-135M's 210 layer
matrices, cycled so that they come from memory), about twice torch's.

`MatVec` is a torch function mode that the compiled decode step runs the model under: a
`F.linear` of at most `MATVEC_MAX` rows becomes that reduction (float32 accumulation, rounded to
the input's dtype once, as oneDNN's bf16 kernels do); larger ones stay `F.linear`. The rewrite is in
the traced graph itself, so inductor's on-disk graph cache keys on it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MATVEC_MAX = 2  # rows of a product written as a reduction: a decode step's 1-2 rows


def matvec_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` as a float32 reduction over the input features."""
    y = (x.float().unsqueeze(-2) * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


class MatVec(torch.overrides.TorchFunctionMode):
    """Inside: linear layers over at most MATVEC_MAX rows run as `matvec_linear` (meant for compiled code only:
    eagerly, the product would be materialised before the sum)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0]
            if math.prod(x.shape[:-1]) <= MATVEC_MAX:
                return matvec_linear(*args, **kwargs)
        return func(*args, **kwargs)
