"""Fused and low-precision kernels, each one module: the kernel's thin API, its plain twin, a decision.

- ``qk_norm_rope``: RMS norm of q and k over all heads plus Wan's rotary embedding, one launch.
- ``fp8``: an e4m3 linear (``Fp8Linear``, ``quantize_linears``) over ``torch._scaled_mm``.

The attention kernels (fp8 FlashAttention-3 included) live in ``artifex.attention.backends``.
Nothing here is wired into a model: the engine applies these from outside.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    """Which path a kernel module takes on a device, and why (for the plain twin: why the fast path cannot run)."""

    path: str  # qk_norm_rope: "triton" | "torch"; fp8: "scaled_mm" | "twin"
    reason: str
