"""fp8 (e4m3) attention through FlashAttention-3's forward kernel, with its math twin.

What ``fa3_fp8_attention`` computes for q (B, Lq, H, D), k and v (B, Lk, H, D), bf16/fp16:

    for t in (q, k, v):  s_t[b, h] = amax(|t[b, :, h, :]|) / 448   (fp32; "tensor": one amax for all)
                         t8 = e4m3(t / s_t)
    out = FA3(t8 ..., q_descale=s_q, k_descale=s_k, v_descale=s_v)  -> bf16, cast to q's dtype

FA3 multiplies the descales back in (scores by s_q*s_k, output by s_v) and also rounds the
softmax probabilities to e4m3 before P@V. The twin ``fp8_attention_twin`` quantizes and
dequantizes q, k, v the same way and runs SDPA in fp32: it carries the input quantization
error, not FA3's internal P rounding, so the GPU check compares both against bf16.

Which of this can run is the attention backend ``fa3-fp8``'s business (artifex.attention.backends:
probe with reasons; never picked by ``auto``, since it changes numerics).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from artifex.kernels import compile_static
from artifex.kernels.fp8 import _TINY, FP8, FP8_MAX

Tensor = torch.Tensor
GRANULARITIES = ("head", "tensor")


def quantize_fp8(x: Tensor, granularity: str = "head") -> tuple[Tensor, Tensor]:
    """e4m3 copy of x (B, L, H, D) and the fp32 descales FA3 takes, shape (B, H), contiguous.

    granularity "head": one scale per (batch, head); "tensor": one for the whole tensor.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; one of {', '.join(GRANULARITIES)}")
    b, _, h, _ = x.shape
    dims = (1, 3) if granularity == "head" else (0, 1, 2, 3)
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=dims, dtype=torch.float32)  # max |x|, one pass
    descale = (amax.clamp_min(_TINY) / FP8_MAX).expand(b, h).contiguous()  # (B, H)
    values = (x.float() / descale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return values, descale


def dequantize_heads(values: Tensor, descale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """e4m3 (B, L, H, D) with descales (B, H) back to ``dtype``."""
    return (values.float() * descale[:, None, :, None]).to(dtype)


@functools.cache
def _compiled_quantize():
    return compile_static(quantize_fp8)  # q, k, v views, text and image keys, every request shape


def _quantize(x: Tensor, granularity: str) -> tuple[Tensor, Tensor]:
    """``quantize_fp8``, compiled on CUDA (fused into one read of x plus the fp8 write)."""
    return _compiled_quantize()(x, granularity) if x.is_cuda else quantize_fp8(x, granularity)


def fa3_fp8_attention(fa3_module, q: Tensor, k: Tensor, v: Tensor, scale: float | None = None,
                      causal: bool = False, granularity: str = "head") -> Tensor:
    """Quantize q, k, v to e4m3 and run FA3's forward with the descales; (B, Lq, H, D) in q's dtype.

    ``fa3_module``: ``flash_attn_interface`` (official build) or ``fa3_fwd_interface`` (the fa3-fwd
    wheel); both take ``q_descale``/``k_descale``/``v_descale`` of shape (batch, num_heads_k).
    """
    (q8, dq), (k8, dk), (v8, dv) = (_quantize(t, granularity) for t in (q, k, v))
    out = fa3_module.flash_attn_func(q8, k8, v8, softmax_scale=scale, causal=causal, q_descale=dq, k_descale=dk,
                                     v_descale=dv)
    out = out[0] if isinstance(out, tuple) else out
    return out.to(q.dtype)


def fa3_fp8_attention_qk8(fa3_module, q8: Tensor, dq: Tensor, k8: Tensor, dk: Tensor, v: Tensor,
                          scale: float | None = None, causal: bool = False) -> Tensor:
    """``fa3_fp8_attention`` with q and k already e4m3 (``kernels.qk_norm_rope.qk_norm_rope_fp8``: the
    QK-norm/RoPE kernel writes them at static per-head scales, descales (B, H)); only v is quantized here."""
    v8, dv = _quantize(v, "head")
    out = fa3_module.flash_attn_func(q8, k8, v8, softmax_scale=scale, causal=causal, q_descale=dq, k_descale=dk,
                                     v_descale=dv)
    out = out[0] if isinstance(out, tuple) else out
    return out.to(v.dtype)


def fp8_attention_twin(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, causal: bool = False,
                       granularity: str = "head") -> Tensor:
    """The math twin: q, k, v through e4m3 and back, then fp32 SDPA; (B, Lq, H, D) in q's dtype."""
    deq = [dequantize_heads(*quantize_fp8(t, granularity)).transpose(1, 2) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*deq, is_causal=causal, scale=scale)
    return out.transpose(1, 2).to(q.dtype)
