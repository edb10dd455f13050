"""A linear layer followed by tanh-approximated GELU, as one cuBLASLt GEMM with a GELU epilogue.

What ``linear_gelu`` computes for x (..., K), W (N, K), b (N,):

    y = gelu_tanh(x @ W^T + b)

That is the up-projection of Wan's feed-forward (diffusers' ``GELU(approximate="tanh")``: its
``proj`` then ``F.gelu``). diffusers rounds the GEMM's output to bf16, writes it, reads it back
and applies GELU; here cuBLASLt applies bias and GELU to the fp32 accumulator in the GEMM's
epilogue (``torch._addmm_activation(..., use_gelu=True)``) and writes the result once. At
TI2V-5B 720p that is one round trip fewer over a 27,280 x 14,336 activation (780 MB) per block.

- ``linear_gelu``: the API. ``path="cublaslt"`` runs the epilogue GEMM (CUDA), ``"torch"`` the twin.
- ``linear_gelu_torch``: the twin, ``F.gelu(F.linear(x, W, b), approximate="tanh")``.
- ``decide``: which path runs on a device and dtype, and why.

The epilogue GEMM is a ``torch.library`` custom op, so ``torch.compile`` keeps it whole (inductor
would otherwise decompose ``_addmm_activation`` into a GEMM plus a separate GELU). It runs the twin
on CPU: ATen's CPU ``_addmm_activation`` uses the exact (erf) GELU, not the tanh form.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

from artifex.kernels import Decision

Tensor = torch.Tensor
PATHS = ("cublaslt", "torch")


def linear_gelu_torch(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


@torch.library.custom_op("artifex::linear_gelu", mutates_args=())
def _linear_gelu_op(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    if not x.is_cuda:
        return linear_gelu_torch(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    out = torch._addmm_activation(bias, rows, weight.t(), use_gelu=True)
    return out.reshape(*x.shape[:-1], weight.shape[0])


@_linear_gelu_op.register_fake
def _linear_gelu_fake(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@cache
def _decide(device_type: str, dtype: torch.dtype) -> Decision:
    if device_type != "cuda":
        return Decision("torch", f"the GELU epilogue needs cuBLASLt (CUDA); this run is on {device_type.upper()}")
    if dtype not in (torch.bfloat16, torch.float16):
        return Decision("torch", f"the epilogue path is used for bf16/fp16 only; dtype is {dtype}")
    return Decision("cublaslt", "cuBLASLt GEMM with a bias + GELU(tanh) epilogue")


def decide(device: torch.device | str, dtype: torch.dtype) -> Decision:
    """Which path ``linear_gelu`` takes for ``device`` and ``dtype``, and why."""
    return _decide(torch.device(device).type, dtype)


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None, path: str | None = None) -> Tensor:
    """``gelu_tanh(x @ weight^T + bias)``; ``path`` None = ``decide``'s choice, or one of ``PATHS``."""
    path = path or decide(x.device, x.dtype).path
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; paths: {', '.join(PATHS)}")
    if path == "torch" or bias is None:  # the epilogue op takes a bias; Wan's feed-forward always has one
        return linear_gelu_torch(x, weight, bias)
    if x.dtype != weight.dtype or bias.dtype != weight.dtype:
        raise ValueError(f"linear_gelu needs x, weight and bias in one dtype; got {x.dtype}, {weight.dtype}, "
                         f"{bias.dtype}")
    return _linear_gelu_op(x, weight, bias)
