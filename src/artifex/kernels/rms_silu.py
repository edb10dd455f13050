"""The Wan VAE's channel RMS norm followed by SiLU, in one kernel.

What ``rms_silu`` computes for x (N, C, *spatial), the norm's ``gamma`` (C, 1, ...) and ``bias`` (a tensor or
0.0), rounding to x's dtype where diffusers' eager ops round:

    n = dtype(x / max(||x over C||_2, 1e-12))        (fp32 inside: ``F.normalize(x.float(), dim=1)``)
    y = dtype(dtype(dtype(n * scale) * gamma) + bias) (``WanRMS_norm``: scale = sqrt(C))
    y = dtype(silu(y))                              (the block's ``nonlinearity``), when ``silu``

That is ``WanRMS_norm`` (``channel_first``) and the SiLU after it in every residual block and at the head of the
Wan VAE's encoder and decoder. Eagerly, at bf16, that is eight passes over the whole activation, four of them
over fp32 copies: the upcast, the norm, the division, the downcast, the two multiplies, the bias add and SiLU.
At 1280x704 the decoder's top stage holds 256 channels x 4 frames x 352 x 640 positions per chunk. The kernel
reads x twice (a sum of squares over C, then the normalization) and writes y once: at that shape 0.45 ms in
channels_last_3d (0.73 ms channels-first) against 3.80 ms for diffusers' modules, and 99.999% of the bf16
values bit-equal to theirs, the rest within 4.2 ulps (H100, benchmarks/results/kernels-vae-h100.json).

- ``rms_silu``: the API; ``path`` "triton" (CUDA) or "torch" (the twin).
- ``rms_silu_torch``: the twin, diffusers' expressions.
- ``decide``: which path runs on a device and dtype, and why (once per device and dtype).

x may be contiguous or in channels_last(_3d); y has x's layout. The kernel reads x as (N, C, S) with strides,
so any layout where the spatial dims flatten into one stride works; other layouts are made contiguous first.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from artifex.kernels import Decision
from artifex.kernels.triton_util import triton, triton_decision

if triton is not None:
    import triton.language as tl

Tensor = torch.Tensor
PATHS = ("triton", "torch")
EPS = 1e-12  # F.normalize's default


def rms_silu_torch(x: Tensor, gamma: Tensor, bias: Tensor | float, scale: float, silu: bool = True) -> Tensor:
    """The twin: ``WanRMS_norm.forward`` (channel-first, fp32 normalize) and then ``F.silu``."""
    normalize_fp32 = x.dtype in (torch.float16, torch.bfloat16)
    n = F.normalize(x.float() if normalize_fp32 else x, dim=1).to(x.dtype)
    y = n * scale * gamma + bias
    return F.silu(y) if silu else y


if triton is not None:

    @triton.jit
    def _rms_silu_kernel(x_ptr, g_ptr, b_ptr, y_ptr, S, sxn, sxc, sxs, syn, syc, sys, scale, eps,
                         C: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_S: tl.constexpr):
        pid = tl.program_id(0)
        n = tl.program_id(1).to(tl.int64)
        dt = y_ptr.dtype.element_ty
        offs_s = (pid * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
        mask_s = offs_s < S
        x_base = x_ptr + n * sxn + offs_s[None, :] * sxs
        y_base = y_ptr + n * syn + offs_s[None, :] * sys
        acc = tl.zeros([BLOCK_S], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            m = (offs_c[:, None] < C) & mask_s[None, :]
            v = tl.load(x_base + offs_c[:, None] * sxc, mask=m, other=0.0).to(tl.float32)
            acc += tl.sum(v * v, axis=0)
        norm = tl.maximum(tl.sqrt(acc), eps)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            m = (offs_c[:, None] < C) & mask_s[None, :]
            v = tl.load(x_base + offs_c.to(tl.int64)[:, None] * sxc, mask=m, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)
            h = (v / norm[None, :]).to(dt).to(tl.float32)
            h = (h * scale).to(dt).to(tl.float32)
            h = (h * g[:, None]).to(dt).to(tl.float32)
            if HAS_BIAS:
                b = tl.load(b_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)
                h = (h + b[:, None]).to(dt).to(tl.float32)
            if SILU:
                h = h / (1.0 + tl.exp(-h))
            tl.store(y_base + offs_c.to(tl.int64)[:, None] * syc, h.to(dt), mask=m)


def _flat_strides(t: Tensor) -> tuple[int, int, int] | None:
    """(batch, channel, position) strides when t's spatial dims flatten into one stride, else None."""
    spatial = t.shape[2:]
    inner = t.stride(-1) if spatial else 1
    expect = inner
    for size, stride in zip(reversed(spatial), reversed(t.stride()[2:]), strict=True):
        if size != 1 and stride != expect:
            return None
        expect *= size
    return t.stride(0), t.stride(1), inner


def _launch(x: Tensor, gamma: Tensor, bias: Tensor | float, scale: float, silu: bool) -> Tensor:
    if _flat_strides(x) is None:
        x = x.contiguous()
    y = torch.empty_like(x)  # the same layout (dense tensors keep their strides)
    sx, sy = _flat_strides(x), _flat_strides(y)
    if sy is None:
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        sy = _flat_strides(y)
    N, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    has_bias = isinstance(bias, Tensor)
    g = gamma.reshape(C).to(x.dtype)  # diffusers multiplies by gamma in x's dtype
    b = bias.reshape(C).to(x.dtype) if has_bias else g
    # C is a compile-time constant (a Wan VAE has a handful of widths); positions contiguous (NC...): a wide run
    # of positions per channel, channels contiguous (channels_last): the reverse
    block_c, block_s = (16, 128) if sx[2] == 1 else (128, 16)
    grid = (triton.cdiv(S, block_s), N)
    _rms_silu_kernel[grid](x, g, b, y, S, *sx, *sy, float(scale), EPS, C=C, HAS_BIAS=has_bias, SILU=silu,
                           BLOCK_C=block_c, BLOCK_S=block_s, num_warps=4)
    return y


def decide(device: torch.device | str, dtype: torch.dtype) -> Decision:
    """Which path ``rms_silu`` takes on ``device`` for ``dtype``, and why."""
    return triton_decision(device, dtype, "the VAE's RMS norm + SiLU kernel")


def rms_silu(x: Tensor, gamma: Tensor, bias: Tensor | float, scale: float, silu: bool = True,
             path: str | None = None) -> Tensor:
    """``silu(WanRMS_norm(x))`` over dim 1 (``silu=False``: the norm alone); ``path`` None = ``decide``'s."""
    path = path or decide(x.device, x.dtype).path
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; paths: {', '.join(PATHS)}")
    if x.dim() < 2 or x.shape[1] != gamma.numel():
        raise ValueError(f"rms_silu needs x (N, C, ...) with C = gamma's {gamma.numel()} channels; got x of shape "
                         f"{tuple(x.shape)}")
    if path == "torch" or x.numel() == 0:
        return rms_silu_torch(x, gamma, bias, scale, silu)
    return _launch(x, gamma, bias, scale, silu)
