"""Attention: kernel adapters, probing, verification, selection and the Wan processor."""

from __future__ import annotations

from pathlib import Path

from artifex.attention.backends import BACKENDS, Backend, attention_flops, probe
from artifex.attention.processor import AttentionRuntime, WanAttentionProcessor, install
from artifex.attention.select import FLASH_FIRST, AttentionUnavailableError, Choice, select, verify
from artifex.config import OptimizationConfig
from artifex.errors import InvalidRequestError

__all__ = ["BACKENDS", "Backend", "AttentionRuntime", "AttentionUnavailableError", "Choice", "WanAttentionProcessor",
           "attention_flops", "install", "probe", "runtime_from_config", "select", "verify"]


def runtime_from_config(config: OptimizationConfig, cache_dir: Path | None) -> AttentionRuntime:
    """Map the config's attention fields (the guide's names included) onto one runtime."""
    requested, prefer = config.attention, []
    if config.fp8 == "all":
        requested = "fa3-fp8"
    if config.attention_slicing:
        if requested not in ("auto", "sliced"):
            raise InvalidRequestError("attention_slicing", f"conflicts with attention={requested!r}; "
                                      "slicing is the 'sliced' backend")
        requested = "sliced"
    if config.use_flash_attention or config.use_xformers:
        if requested != "auto":
            raise InvalidRequestError("use_flash_attention" if config.use_flash_attention else "use_xformers",
                                      f"conflicts with attention={requested!r}; set one of them")
        prefer = (FLASH_FIRST if config.use_flash_attention else []) + (["xformers"] if config.use_xformers else [])
    return AttentionRuntime(
        requested=requested, scale=config.flash_attention_scale, causal=config.flash_attention_causal,
        dropout=config.flash_attention_dropout, slices=config.attention_slicing, prefer=prefer,
        cache_path=(cache_dir / "attention-selection.json") if cache_dir else None,
    )
