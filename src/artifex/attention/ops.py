"""The attention call the model makes: one custom op over a chain of backends.

``torch.ops.artifex.attention(q, k, v, chain, ...)`` runs the first backend of ``chain``
(comma-separated names); if it raises, the failure is logged once, the backend is
marked failed for this process, and the next one runs. The chain always ends in a
backend that works everywhere, so a kernel failing at runtime costs speed, never the
video. Being a custom op with a registered fake, it is opaque to torch.compile: kernels
that dynamo cannot trace (FA2/FA3/FA4, SageAttention, xFormers) work in compiled blocks.
"""

import logging
from typing import Optional

import torch

from artifex.attention import backends
from artifex.attention.backends import BACKENDS

log = logging.getLogger("artifex")

LAST_RESORT = "sdpa-math"
_failed: dict[str, str] = {}  # backend -> the error that took it out of service in this process


def runtime_failures() -> dict[str, str]:
    return dict(_failed)


def run_chain(chain: list[str], q, k, v, scale: Optional[float], causal: bool, dropout: float, slices: int):  # noqa: UP045
    last_error: Exception | None = None
    for name in chain:
        if name in _failed and name != chain[-1]:
            continue
        try:
            return BACKENDS[name].run(q, k, v, scale, causal, dropout, slices)
        except Exception as e:  # a kernel that fails at runtime is replaced, not fatal
            if name not in _failed:
                _failed[name] = f"{type(e).__name__}: {e}"
                log.warning("attention backend %s failed (%s); falling back to the next one", name, _failed[name])
            last_error = e
    raise RuntimeError(f"every attention backend in {chain} failed") from last_error


@torch.library.custom_op("artifex::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chain: str, scale: Optional[float],  # noqa: UP045
                 causal: bool, dropout: float, slices: int) -> torch.Tensor:
    out = run_chain(chain.split(","), q, k, v, scale, causal, dropout, slices)
    return out.contiguous()


@attention_op.register_fake
def _attention_fake(q, k, v, chain, scale, causal, dropout, slices):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


QK8 = "fa3-fp8"  # the backend that takes q and k already in e4m3


@torch.library.custom_op("artifex::attention_qk8", mutates_args=())
def attention_qk8_op(q8: torch.Tensor, dq: torch.Tensor, k8: torch.Tensor, dk: torch.Tensor, v: torch.Tensor,
                     chain: str, scale: Optional[float], causal: bool, dropout: float,  # noqa: UP045
                     slices: int) -> torch.Tensor:
    """``attention_op`` for a chain led by fa3-fp8, with q and k (B, L, H, D) already e4m3 and their (B, H)
    descales: FA3 takes them as they are. If it fails (logged once, out of service for the process, as in
    ``run_chain``), q and k are dequantized to v's dtype and the rest of the chain runs."""
    names = chain.split(",")
    if names[0] == QK8 and QK8 not in _failed:
        try:
            return backends._fa3_fp8_qk8(q8, dq, k8, dk, v, scale, causal).contiguous()
        except Exception as e:  # as run_chain: a kernel failing at runtime costs speed, never the video
            _failed[QK8] = f"{type(e).__name__}: {e}"
            log.warning("attention backend %s failed (%s); falling back to the next one", QK8, _failed[QK8])
    from artifex.kernels.fp8_attention import dequantize_heads

    q, k = dequantize_heads(q8, dq, v.dtype), dequantize_heads(k8, dk, v.dtype)
    return run_chain(names, q, k, v, scale, causal, dropout, slices).contiguous()


@attention_qk8_op.register_fake
def _attention_qk8_fake(q8, dq, k8, dk, v, chain, scale, causal, dropout, slices):
    return v.new_empty((*q8.shape[:-1], v.shape[-1]))


def reset_runtime_failures() -> None:
    """Forget runtime failures (tests; or after a driver/library change in a long-lived process)."""
    _failed.clear()
