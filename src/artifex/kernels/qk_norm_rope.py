"""Fused q/k RMS norm over all heads + Wan's rotary embedding, written once in (B, L, H, D).

What it computes, for x in (q, k) with rows of width H*D (one token of one batch entry):

    y = x * rsqrt(mean(x**2 over all H*D channels) + eps) * weight        (fp32)
    for each head h and pair j:  (a, b) = (y[h, 2j], y[h, 2j+1])
        out[h, 2j]   = a * cos[l, j] - b * sin[l, j]
        out[h, 2j+1] = a * sin[l, j] + b * cos[l, j]
    out is cast to x's dtype, laid out (B, L, H, D) contiguous, ready for attention.

That is diffusers' ``WanAttnProcessor`` step ``norm_q``/``norm_k`` (``torch.nn.RMSNorm`` over
``heads*head_dim``) followed by its ``apply_rotary_emb``, except that nothing is rounded to
bf16 between the norm and the rotation (the fused path is the more precise one).

- ``qk_norm_rope``: the API. Runs the Triton kernel on CUDA (one program per token row, q and
  k in the same launch: grid (B*L, 2)), else the twin; ``path=`` forces one.
- ``qk_norm_rope_torch``: the plain PyTorch twin with the same math; runs anywhere.
- ``qk_norm_rope_triton``: the kernel launcher (also runs under ``TRITON_INTERPRET=1`` on CPU
  tensors, which is how the tests check it without a GPU).
- ``qk_norm_rope_fp8``: the same written in e4m3 for FlashAttention-3's fp8 kernel, at per-head scales
  that the norm weights alone bound (``fp8_head_scales``), with their descales.
- ``decide``: which path runs on a device and dtype, and why; made once per (device, dtype).
- ``compact_rope`` / ``rope_table``: the rotary table the kernel reads, (L, D/2) fp32 cos and
  sin, from what diffusers' ``WanRotaryPosEmbed`` returns ((1, L, 1, D), pairs repeated), or
  straight from the rope module for a latent shape (build it once per shape, reuse per layer).
"""

from __future__ import annotations

import torch

from artifex.kernels import FP8, FP8_MAX, Decision
from artifex.kernels.triton_util import (  # noqa: F401  (_triton_decision: the cached decision, tests clear it)
    DTYPES,
    _triton_blocker,
    _triton_decision,
    triton,
    triton_decision,
)

Tensor = torch.Tensor

if triton is not None:
    import triton.language as tl


# -- the rotary table ---------------------------------------------------------------------
def compact_rope(freqs_cos: Tensor, freqs_sin: Tensor) -> tuple[Tensor, Tensor]:
    """(L, D/2) fp32 cos and sin from diffusers' (1, L, 1, D) tables (or pass compact ones through).

    diffusers repeats each frequency for both members of a pair and reads ``cos[..., 0::2]`` and
    ``sin[..., 1::2]``; this keeps exactly those entries.
    """
    if freqs_cos.dim() == 2 and freqs_sin.dim() == 2:
        return freqs_cos.float().contiguous(), freqs_sin.float().contiguous()
    if freqs_cos.dim() != 4 or freqs_cos.shape[0] != 1 or freqs_cos.shape[2] != 1:
        raise ValueError(f"expected diffusers' rotary table of shape (1, L, 1, D), got {tuple(freqs_cos.shape)}")
    if freqs_sin.shape != freqs_cos.shape:
        raise ValueError(f"cos {tuple(freqs_cos.shape)} and sin {tuple(freqs_sin.shape)} differ in shape")
    return (freqs_cos[0, :, 0, 0::2].float().contiguous(), freqs_sin[0, :, 0, 1::2].float().contiguous())


def rope_table(rope: torch.nn.Module, latent_shape: tuple[int, ...], device: torch.device | str | None = None
               ) -> tuple[Tensor, Tensor]:
    """The compact table for one latent shape (B, C, F, H, W) from a diffusers ``WanRotaryPosEmbed``.

    The rope module only reads the shape, so no latent is needed; build this once per shape.
    """
    freqs_cos, freqs_sin = rope(torch.empty(tuple(latent_shape), device="meta"))
    cos, sin = compact_rope(freqs_cos, freqs_sin)
    return (cos.to(device), sin.to(device)) if device is not None else (cos, sin)


# -- the decision -------------------------------------------------------------------------
def decide(device: torch.device | str, dtype: torch.dtype) -> Decision:
    """Which path ``qk_norm_rope`` takes on ``device`` for ``dtype``, and why (decided once, cached)."""
    return triton_decision(device, dtype, "the Triton QK norm + RoPE kernel")


# -- checks shared by both paths ----------------------------------------------------------
def _shapes(q: Tensor, k: Tensor, weight_q: Tensor, weight_k: Tensor, heads: int, cos: Tensor
            ) -> tuple[int, int, int]:
    if q.dim() != 3 or k.shape != q.shape:
        raise ValueError(f"q and k must both be (B, L, H*D); got {tuple(q.shape)} and {tuple(k.shape)}")
    b, n, width = q.shape
    if width % heads or (width // heads) % 2:
        raise ValueError(f"width {width} is not heads ({heads}) times an even head_dim")
    d = width // heads
    if weight_q.shape != (width,) or weight_k.shape != (width,):
        raise ValueError(f"norm weights must be ({width},); got {tuple(weight_q.shape)}, {tuple(weight_k.shape)}")
    if cos.shape != (n, d // 2):
        raise ValueError(f"rotary table is {tuple(cos.shape)}; expected ({n}, {d // 2}) for {n} tokens, "
                         f"head_dim {d}")
    return b, n, d


def _eps(eps: float | None, dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if eps is None else float(eps)  # torch.nn.RMSNorm's default


# -- the twin -----------------------------------------------------------------------------
def _norm_rope_torch(x: Tensor, weight: Tensor, eps: float, cos: Tensor, sin: Tensor, heads: int,
                     dtype: torch.dtype | None = None) -> Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.float()
    a, b = y.unflatten(-1, (heads, -1, 2)).unbind(-1)  # (B, L, H, D/2) each
    c, s = cos[:, None, :], sin[:, None, :]  # (L, 1, D/2)
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).to(dtype or x.dtype)


def _prepare(q: Tensor, k: Tensor, weight_q: Tensor, weight_k: Tensor, eps: float | None, cos: Tensor, sin: Tensor,
             heads: int, path: str) -> tuple[float, Tensor, Tensor]:
    """What every entry point does first: refuse a ``path`` that cannot run here (naming why), check the shapes
    (the twin), and return the norm's epsilon and the compact rotary table on q's device."""
    if path == "triton":
        why = _triton_blocker(q.device, q.dtype)
        if why:
            raise RuntimeError(f"qk_norm_rope Triton kernel cannot run: {why}")
    elif path != "torch":
        raise ValueError(f"unknown path {path!r}; paths: triton, torch")
    cos, sin = compact_rope(cos, sin)
    cos, sin = cos.to(q.device), sin.to(q.device)
    if path == "torch":
        _shapes(q, k, weight_q, weight_k, heads, cos)
    return _eps(eps, q.dtype), cos, sin


def qk_norm_rope_torch(q: Tensor, k: Tensor, weight_q: Tensor, weight_k: Tensor, eps: float | None,
                       cos: Tensor, sin: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """The plain PyTorch twin: same math as the kernel, fp32 inside, (B, L, H, D) out."""
    e, cos, sin = _prepare(q, k, weight_q, weight_k, eps, cos, sin, heads, "torch")
    return (_norm_rope_torch(q, weight_q, e, cos, sin, heads).contiguous(),
            _norm_rope_torch(k, weight_k, e, cos, sin, heads).contiguous())


# -- the kernel ---------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _norm_rope_row(x_ptr, w_ptr, out_ptr, cos_ptr, sin_ptr, inv_ptr, row, seq_len, stride_b, stride_l, eps,
                       fp8_max, HEADS: tl.constexpr, HEADS_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
                       E4M3: tl.constexpr):
        HALF: tl.constexpr = HEAD_DIM // 2
        row64 = row.to(tl.int64)
        bi = row64 // seq_len
        li = row64 % seq_len
        h = tl.arange(0, HEADS_P2)[:, None]
        d = tl.arange(0, HEAD_DIM)[None, :]
        col = h * HEAD_DIM + d  # (HEADS_P2, HEAD_DIM)
        mask = (h < HEADS) & (d < HEAD_DIM)
        x = tl.load(x_ptr + bi * stride_b + li * stride_l + col, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + col, mask=mask, other=0.0).to(tl.float32)
        mean_sq = tl.sum(tl.sum(x * x, axis=1), axis=0) / (HEADS * HEAD_DIM)
        y = x * tl.rsqrt(mean_sq + eps) * w
        a, b = tl.split(tl.reshape(y, (HEADS_P2, HALF, 2)))  # the interleaved pairs, in registers
        j = tl.arange(0, HALF)
        c = tl.load(cos_ptr + li * HALF + j)[None, :]
        s = tl.load(sin_ptr + li * HALF + j)[None, :]
        out = tl.reshape(tl.join(a * c - b * s, a * s + b * c), (HEADS_P2, HEAD_DIM))
        if E4M3:  # e4m3 at the head's static scale (``fp8_head_scales``): no amax pass over the output
            inv = tl.load(inv_ptr + tl.arange(0, HEADS_P2), mask=tl.arange(0, HEADS_P2) < HEADS, other=0.0)
            out = tl.minimum(tl.maximum(out * inv[:, None], -fp8_max), fp8_max)
        tl.store(out_ptr + row64 * (HEADS * HEAD_DIM) + col, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _qk_norm_rope_kernel(q_ptr, k_ptr, wq_ptr, wk_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, q_inv_ptr, k_inv_ptr,
                             seq_len, q_stride_b, q_stride_l, k_stride_b, k_stride_l, eps, fp8_max,
                             HEADS: tl.constexpr, HEADS_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
                             E4M3: tl.constexpr):
        row = tl.program_id(0)
        if tl.program_id(1) == 0:
            _norm_rope_row(q_ptr, wq_ptr, qo_ptr, cos_ptr, sin_ptr, q_inv_ptr, row, seq_len, q_stride_b, q_stride_l,
                           eps, fp8_max, HEADS, HEADS_P2, HEAD_DIM, E4M3)
        else:
            _norm_rope_row(k_ptr, wk_ptr, ko_ptr, cos_ptr, sin_ptr, k_inv_ptr, row, seq_len, k_stride_b, k_stride_l,
                           eps, fp8_max, HEADS, HEADS_P2, HEAD_DIM, E4M3)


def _launch(q: Tensor, k: Tensor, weight_q: Tensor, weight_k: Tensor, eps: float, cos: Tensor, sin: Tensor,
            heads: int, q_inv: Tensor | None = None, k_inv: Tensor | None = None,
            out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``q_inv``/``k_inv`` (H,) fp32: write e4m3 (or ``out_dtype``) values times these, clamped to +-448."""
    b, n, d = _shapes(q, k, weight_q, weight_k, heads, cos)
    if d & (d - 1):
        raise ValueError(f"the Triton kernel needs a power-of-two head_dim; got {d}")
    if q.stride(2) != 1 or k.stride(2) != 1:  # rows may be strided (views of a fused qkv), channels not
        q, k = q.contiguous(), k.contiguous()
    fp8 = q_inv is not None
    q_out = torch.empty((b, n, heads, d), device=q.device, dtype=out_dtype or (FP8 if fp8 else q.dtype))
    k_out = torch.empty_like(q_out)
    if b * n == 0:
        return q_out, k_out
    heads_p2 = triton.next_power_of_2(heads)
    warps = 8 if heads_p2 * d >= 4096 else 4
    _qk_norm_rope_kernel[(b * n, 2)](
        q, k, weight_q.contiguous(), weight_k.contiguous(), q_out, k_out, cos, sin,
        q_inv if fp8 else cos, k_inv if fp8 else cos, n,  # (cos: a pointer never read when not fp8)
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), eps, FP8_MAX,
        HEADS=heads, HEADS_P2=heads_p2, HEAD_DIM=d, E4M3=fp8, num_warps=warps)
    return q_out, k_out


# A custom op, so torch.compile treats the launch as one opaque call with a known output shape.
@torch.library.custom_op("artifex::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(q: Tensor, k: Tensor, weight_q: Tensor, weight_k: Tensor, eps: float, cos: Tensor,
                     sin: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    return _launch(q, k, weight_q, weight_k, eps, cos, sin, heads)


@_qk_norm_rope_op.register_fake
def _qk_norm_rope_fake(q, k, weight_q, weight_k, eps, cos, sin, heads):
    b, n, width = q.shape
    out = q.new_empty((b, n, heads, width // heads))
    return out, torch.empty_like(out)


@torch.library.custom_op("artifex::qk_norm_rope_fp8", mutates_args=())
def _qk_norm_rope_fp8_op(q: Tensor, k: Tensor, weight_q: Tensor, weight_k: Tensor, eps: float, cos: Tensor,
                         sin: Tensor, heads: int, q_inv: Tensor, k_inv: Tensor) -> tuple[Tensor, Tensor]:
    return _launch(q, k, weight_q, weight_k, eps, cos, sin, heads, q_inv, k_inv)


@_qk_norm_rope_fp8_op.register_fake
def _qk_norm_rope_fp8_fake(q, k, weight_q, weight_k, eps, cos, sin, heads, q_inv, k_inv):
    b, n, width = q.shape
    out = q.new_empty((b, n, heads, width // heads), dtype=FP8)
    return out, torch.empty_like(out)


# -- e4m3 output at a static per-head scale (fp8 attention) ------------------------------------
def fp8_head_scales(weight: Tensor, heads: int) -> Tensor:
    """(H,) fp32 descales that make every value of the normed, rotated q (or k) fit e4m3, from the norm's
    weight alone: for a row x of width C, |x_i| * rsqrt(mean(x^2) + eps) <= sqrt(C), so each normed value is at
    most sqrt(C) * max|w| over its head, and a rotation keeps each pair's length. With that bound mapped to
    448 no amax pass is needed; e4m3 is floating point, so values far below the bound keep their 3 mantissa
    bits (only those under 2^-6 of the scale, i.e. ~1/64 of sqrt(C)/448 of the bound, become subnormal)."""
    width = weight.shape[0]
    return (weight.float().abs().view(heads, -1).amax(1) * width**0.5).clamp_min(1e-12) / FP8_MAX


def qk_norm_rope_fp8(q: Tensor, k: Tensor, weight_q: Tensor, weight_k: Tensor, eps: float | None, cos: Tensor,
                     sin: Tensor, heads: int, path: str | None = None
                     ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``qk_norm_rope`` written in e4m3: ((q8, q_descale), (k8, k_descale)), values (B, L, H, D) and descales
    (B, H) fp32 (``fp8_head_scales``, as FlashAttention-3's ``q_descale``/``k_descale`` take them). The twin
    quantizes the fp32 result the same way."""
    path = path or decide(q.device, q.dtype).path
    e, cos, sin = _prepare(q, k, weight_q, weight_k, eps, cos, sin, heads, path)
    dq, dk = fp8_head_scales(weight_q, heads), fp8_head_scales(weight_k, heads)
    b = q.shape[0]
    if path == "triton":
        q8, k8 = _qk_norm_rope_fp8_op(q, k, weight_q, weight_k, e, cos, sin, heads, 1 / dq, 1 / dk)
    else:
        q8, k8 = (_quantize_static(_norm_rope_torch(x, w, e, cos, sin, heads, torch.float32), s)
                  for x, w, s in ((q, weight_q, dq), (k, weight_k, dk)))
    return (q8, dq.expand(b, heads).contiguous()), (k8, dk.expand(b, heads).contiguous())


def _quantize_static(y: Tensor, descale: Tensor) -> Tensor:
    """fp32 (B, L, H, D) over the per-head ``descale`` (H,), clamped, e4m3; contiguous."""
    return (y / descale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).contiguous()


def qk_norm_rope_triton(q: Tensor, k: Tensor, weight_q: Tensor, weight_k: Tensor, eps: float | None,
                        cos: Tensor, sin: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """The Triton kernel: one launch for q and k; refuses with the reason when it cannot run here."""
    e, cos, sin = _prepare(q, k, weight_q, weight_k, eps, cos, sin, heads, "triton")
    return _qk_norm_rope_op(q, k, weight_q, weight_k, e, cos, sin, heads)


# -- the API ------------------------------------------------------------------------------
def qk_norm_rope(q: Tensor, k: Tensor, weight_q: Tensor, weight_k: Tensor, eps: float | None, cos: Tensor,
                 sin: Tensor, heads: int, path: str | None = None) -> tuple[Tensor, Tensor]:
    """RMS-normalize q and k (B, L, H*D) over all heads, rotate pairs, return both as (B, L, H, D).

    ``cos``/``sin``: diffusers' ``WanRotaryPosEmbed`` output ((1, L, 1, D)) or the compact (L, D/2)
    fp32 table from ``rope_table``/``compact_rope`` (cheaper: build it once per shape).
    ``eps``: the norm's epsilon (Wan: 1e-6; None = ``torch.nn.RMSNorm``'s default).
    ``path``: None = ``decide`` (Triton on CUDA, else the twin), "triton" or "torch" to force one.
    Callers that compile should decide once (``decide(device, dtype).path``, kept in the plan) and
    pass it here, so the compiled region holds no lookup.
    """
    if path is None:
        path = decide(q.device, q.dtype).path
    if path == "triton":
        return qk_norm_rope_triton(q, k, weight_q, weight_k, eps, cos, sin, heads)
    if path == "torch":
        return qk_norm_rope_torch(q, k, weight_q, weight_k, eps, cos, sin, heads)
    raise ValueError(f"unknown path {path!r}; paths: triton, torch")

