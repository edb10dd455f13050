"""Where each model lives while a video is generated: the memory tiers, fastest to leanest.

- resident: text encoder, DiT experts (both A14B experts) and VAE on the device.
- text_offload: the text encoder comes to the device only to encode (the prompt
  embeddings are kept); the rest resident.
- expert_swap: as text_offload, and only the active A14B expert on the device,
  swapped once at the MoE switch.
- model_offload: as expert_swap, and the VAE comes to the device only to decode
  (the experts leave first).
- block_offload: expert weights stay in CPU memory; one transformer block at a time
  is on the device, the next prefetched on a side stream (diffusers group offload).
- leaf_offload: as block_offload, one layer at a time.

``fp8_weights`` stores the experts' linear weights in float8 (e4m3) and computes in the
model precision (diffusers' layerwise casting), halving their memory in any tier. The
models stay plain diffusers modules; tiers are applied from outside with ``.to`` and
diffusers' group-offload hooks, and ``release`` undoes them so a tier can be changed.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import torch

log = logging.getLogger("artifex")

TIERS = ("resident", "text_offload", "expert_swap", "model_offload", "block_offload", "leaf_offload")
_ON_DEMAND_TEXT = set(TIERS[1:])
_ON_DEMAND_VAE = {"model_offload", "block_offload", "leaf_offload"}
_GROUP_OFFLOAD = {"block_offload": "block_level", "leaf_offload": "leaf_level"}


class Placement:
    """Applies one tier to a set of components and moves models as the stages need them."""

    def __init__(self, components, tier: str, device: torch.device, fp8_weights: bool = False,
                 compute_dtype: torch.dtype = torch.bfloat16):
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}; tiers: {', '.join(TIERS)}")
        self.c, self.tier, self.device = components, tier, device
        self.fp8_weights, self.compute_dtype = fp8_weights, compute_dtype
        self._fp8_applied = False
        self.active_expert: int | None = None
        # The VAE keeps per-call state on its modules (diffusers' causal-conv feature caches): one caller at a time,
        # should two threads share it (artifex.distributed.experts: an I2V image encode beside a decode).
        self._vae_lock = threading.RLock()

    def apply(self) -> None:
        c, tier, dev = self.c, self.tier, self.device
        if self.fp8_weights and not self._fp8_applied:
            for expert in c.experts:
                expert.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=self.compute_dtype)
            self._fp8_applied = True
        c.text_encoder.to("cpu" if tier in _ON_DEMAND_TEXT else dev)
        c.vae.to("cpu" if tier in _ON_DEMAND_VAE else dev)
        if tier in _GROUP_OFFLOAD:
            stream = dev.type == "cuda"
            for expert in c.experts:
                expert.to("cpu")
                expert.enable_group_offload(onload_device=dev, offload_device=torch.device("cpu"),
                                            offload_type=_GROUP_OFFLOAD[tier],
                                            num_blocks_per_group=1 if tier == "block_offload" else None,
                                            use_stream=stream, non_blocking=stream, record_stream=stream)
            return
        if tier in ("resident", "text_offload"):  # text_offload: as the planner counts it, both experts resident
            for expert in c.experts:
                expert.to(dev)
        else:  # one expert at a time; activate_expert brings the first in
            for expert in c.experts:
                expert.to("cpu")
            self.active_expert = None

    def release(self) -> None:
        """Undo the tier: hooks removed, every model back in CPU memory."""
        from diffusers.hooks import HookRegistry

        for expert in self.c.experts:
            registry = HookRegistry.check_if_exists_or_initialize(expert)
            for name in ("group_offloading", "lazy_prefetch_group_offloading", "layer_execution_tracker"):
                registry.remove_hook(name, recurse=True)
            expert.to("cpu")
        self.c.text_encoder.to("cpu")
        self.c.vae.to("cpu")
        self.active_expert = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def move_to(self, tier: str) -> None:
        """Change tier in place: undo the current one, apply ``tier`` (fp8 storage stays as it is)."""
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}; tiers: {', '.join(TIERS)}")
        self.release()
        self.tier = tier
        self.apply()

    def activate_expert(self, index: int) -> None:
        if self.tier in ("resident", "text_offload", *_GROUP_OFFLOAD) or index == self.active_expert:
            self.active_expert = index
            return
        for i, expert in enumerate(self.c.experts):
            if i != index:
                expert.to("cpu")
        self.c.experts[index].to(self.device)
        self.active_expert = index

    def park_experts(self) -> None:
        """Before the VAE decode in the offload tiers: the experts leave the device."""
        if self.tier == "model_offload":
            for expert in self.c.experts:
                expert.to("cpu")
            self.active_expert = None

    @contextlib.contextmanager
    def text_encoder(self):
        yield from self._while_used(self.c.text_encoder, self.tier in _ON_DEMAND_TEXT)

    @contextlib.contextmanager
    def vae(self):
        with self._vae_lock:
            yield from self._while_used(self.c.vae, self.tier in _ON_DEMAND_VAE)

    def _while_used(self, module: torch.nn.Module, on_demand: bool):
        if not on_demand:
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to("cpu")
