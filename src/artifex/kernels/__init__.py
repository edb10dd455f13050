"""Fused and low-precision kernels, each one module: the kernel's thin API, its plain twin, a decision.

- ``qk_norm_rope``: RMS norm of q and k over all heads plus Wan's rotary embedding, one launch (and in e4m3).
- ``ada_norm``: the blocks' adaptive LayerNorms (norm, shift and scale, a gated residual folded in), one pass.
- ``rms_silu``: the VAE's RMS norm + SiLU, one pass.
- ``fp8``: an e4m3 linear (``Fp8Linear``, ``quantize_linears``) over ``torch._scaled_mm``, with a one-pass row
  quantization kernel.
- ``fp8_attention``: q/k/v to e4m3 at per-head scales for FlashAttention-3's fp8 kernel, and its twin.
- ``linear_gelu``: the feed-forward's first linear with GELU in cuBLASLt's epilogue.
- ``triton_util``: Triton (optional), the GPU queries and the run-or-twin decision every Triton kernel here makes.

The attention kernels (fp8 FlashAttention-3 included) live in ``artifex.attention.backends``.
Nothing here is wired into a model: the engine applies these from outside.
"""

from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn  # the e4m3 format every fp8 path here uses
FP8_MAX = float(torch.finfo(FP8).max)  # 448


@dataclass(frozen=True)
class Decision:
    """Which path a kernel module takes on a device, and why (for the plain twin: why the fast path cannot run)."""

    path: str  # qk_norm_rope: "triton" | "torch"; fp8: "scaled_mm" | "twin"
    reason: str


# Distinct input shapes one compiled function sees in a long-lived process: every request size and frame count,
# batch 1 and 2, probes, bf16 and fp8 blocks. Dynamo's default (8 graphs per function) would silently run the
# rest eagerly, at eager speed.
RECOMPILE_LIMIT = 64


def compile_static(fn, fullgraph: bool = False, backend: str = "inductor"):
    """``torch.compile(fn, dynamic=False)`` (one specialised graph per input shape) with the process-wide
    recompile limit raised to at least ``RECOMPILE_LIMIT`` (never lowered), so shapes past the eighth are
    compiled too instead of falling back to eager."""
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(fn, fullgraph=fullgraph, dynamic=False, backend=backend)
