"""QK RMSNorm + Wan RoPE (placeholder twin; the Triton kernel lands with the kernels branch)."""

from __future__ import annotations

import torch


def rope_table(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' (1, L, 1, D) interleaved tables -> compact (L, D/2) fp32 cos and sin."""
    return cos[0, :, 0, 0::2].float().contiguous(), sin[0, :, 0, 1::2].float().contiguous()


def qk_norm_rope(q, k, weight_q, weight_k, eps, cos, sin, heads):
    def one(x, weight):
        x = torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps).unflatten(2, (heads, -1))
        x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).type_as(x)

    return one(q, weight_q), one(k, weight_k)
