"""A request's GPU memory, around the engine loop: the tier chosen before any work, each stage's measured peak,
and the OOM step-down (free memory, take the next leaner tier or tile the VAE, run the stage again).

The engine calls ``fit`` once per request, ``stage_peak`` after each stage and runs each heavy stage through
``stepping_down``; the loop itself holds no memory policy.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from artifex.engine.memory import (
    SLACK,
    activations,
    estimate,
    fits,
    plan_memory,
    prefetch_fits,
    prefetch_peak,
    tiers_for,
)
from artifex.engine.placement import on_demand
from artifex.engine.plan import memory_budget
from artifex.sysinfo import peak_bytes, reset_peak_memory

if TYPE_CHECKING:
    from artifex.engine.pipeline import Engine, GenerationJob

log = logging.getLogger("artifex")


class MemoryGuard:
    """The memory policy of one engine (one device)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.peak_floor: tuple[int, int] | None = None  # a request's completed stages' peaks, kept over an OOM retry

    def start(self) -> None:
        """A request starts: the peak counters from zero."""
        reset_peak_memory(self.engine.device)
        self.peak_floor = None

    def dit_forward(self, job: GenerationJob) -> str:
        """Which DiT forward the planner counts (``memory.DIT_FORWARDS``): Artifex's, or diffusers' (``fast_dit``
        off), which for TI2V given an image embeds one timestep per token (Artifex's embeds the distinct ones)."""
        if self.engine.plan.fast_dit:
            return "artifex"
        return "diffusers_per_token" if job.image is not None else "diffusers"

    def fit(self, job: GenerationJob) -> dict:
        """Plan memory for this request: the fastest tier within the budget, moved to before any work."""
        eng = self.engine
        budget = memory_budget(eng.config, eng.device)
        s = job.settings
        tier, tiling, ests, reasons = plan_memory(job.spec, eng.weights, s.width, s.height, s.frames,
                                                  eng.plan.cfg_batch, eng.plan.vae_tiling, self.dit_forward(job),
                                                  budget, eng.config.requested_tier(), eng.plan.vae_precision,
                                                  eng.config.vae_tile_size)
        info = {"budget_gib": round(budget / 2**30, 2) if budget else None, "step_downs": [],
                "predicted": {e.tier: round(e.peak_gib, 2) for e in ests}}
        for r in reasons:
            log.info(r)
        if tiling and not eng.plan.vae_tiling:
            eng.tile_vae()
        if tier != eng.placement.tier:
            eng.retier(tier)
        # A swap tier prefetches the next expert only where the planner has room for both (an OOM step-down's
        # move_to turns it off for the rest of the request).
        est = next((e for e in ests if e.tier == tier), None)
        prefetch = est is not None and prefetch_fits(est, eng.weights, budget)
        eng.placement.set_prefetch_room(prefetch)
        info["tier"] = eng.placement.tier
        info["expert_prefetch"] = prefetch
        info["predicted_peak_gib"] = info["predicted"].get(eng.placement.tier)
        if est is not None:
            info["predicted_stages_gib"] = est.stages_gib
        if prefetch:
            info["predicted_peak_gib"] = round(max(est.peak_bytes, prefetch_peak(est, eng.weights)) / 2**30, 2)
        extra = self.decode_warm_up_bytes(job, est, prefetch, budget)
        info["decode_warm_up_fits"] = extra is not None
        if extra is not None:  # what the denoise stage holds more while the warm-up decodes beside it
            info["predicted_decode_warm_up_gib"] = round(extra / 2**30, 2)
        return info

    def decode_warm_up_bytes(self, job: GenerationJob, est, prefetch: bool, budget: int | None) -> int | None:
        """The bytes the decoder's warm-up (``Engine.start_decoder_warm_up``: a streamed decode of a few latent
        frames while the denoise runs) adds to the denoise stage, where it fits, else None: the VAE stays on the
        device through the denoise (not an on-demand VAE, not tiled), and one latent frame's decode activations fit
        the budget beside the denoise stage's peak (the next expert's prefetch included)."""
        eng, s = self.engine, job.settings
        if est is None or budget is None or eng.plan.vae_tiling or on_demand(eng.placement.tier)[1]:
            return None
        denoise = est.stages["denoise"] if not prefetch else prefetch_peak(est, eng.weights)
        decode = activations(job.spec, s.width, s.height, s.frames, eng.plan.cfg_batch, False, self.dit_forward(job),
                             eng.plan.vae_precision)["decode"]
        extra = int(decode * SLACK)
        return extra if fits(denoise + extra, budget) else None

    def repredict(self, job: GenerationJob) -> None:
        """After an OOM step-down: the planner's prediction for what runs now (tier and VAE tiling), so the
        sidecar compares the measured peak with the configuration that produced it; the first plan's figure is
        kept as ``planned_peak_gib``."""
        eng, memory, s = self.engine, job.memory, job.settings
        if "predicted_peak_gib" not in memory:
            return
        memory.setdefault("planned_peak_gib", memory["predicted_peak_gib"])
        est = estimate(job.spec, eng.weights, eng.placement.tier, s.width, s.height, s.frames, eng.plan.cfg_batch,
                       eng.plan.vae_tiling, self.dit_forward(job), eng.plan.vae_precision, eng.config.vae_tile_size)
        memory["predicted_peak_gib"] = round(est.peak_gib, 2)
        memory["predicted_stages_gib"] = est.stages_gib

    def stage_peak(self, job: GenerationJob, stage: str) -> None:
        """The device's peak (allocated) since the last stage ended, as ``job.memory["measured_stages_gib"][stage]``
        beside the planner's ``predicted_stages_gib``; the counters restart, the peak kept in ``peak_floor``."""
        peaks = peak_bytes(self.engine.device)
        if peaks is None:
            return
        job.memory.setdefault("measured_stages_gib", {})[stage] = round(peaks[0] / 2**30, 3)
        self._restart_peaks(peaks)

    def _restart_peaks(self, keep: tuple[int, int]) -> None:
        """Restart the device's peak counters, folding ``keep`` (allocated, reserved) into ``peak_floor``, which
        the result's peak is taken over."""
        floor = self.peak_floor or (0, 0)
        self.peak_floor = (max(floor[0], keep[0]), max(floor[1], keep[1]))
        reset_peak_memory(self.engine.device)

    def stepping_down(self, stage: str, run, job: GenerationJob):
        """Run a stage of ``job``; on a device OOM free memory, take the next leaner tier (or tile the VAE), run it
        again. The failed attempt's peak goes in ``job.memory["failed_attempt_peak_gib"]``, not in the result's
        peak: the counters restart for the retry, with the completed stages' peaks kept (``peak_floor``)."""
        eng, memory = self.engine, job.memory
        while True:
            before = peak_bytes(eng.device)
            try:
                return run()
            except torch.OutOfMemoryError as e:
                if not eng.layout.oom_step_down:
                    raise
                failed = peak_bytes(eng.device)
                if failed is not None:
                    memory.setdefault("failed_attempt_peak_gib", []).append(round(failed[0] / 2**30, 3))
                    self._restart_peaks(before)  # what ran before the stage counts; the failed attempt does not
                if eng.device.type == "cuda":
                    torch.cuda.empty_cache()
                if stage == "decode" and not eng.plan.vae_tiling:
                    eng.tile_vae()
                    step = {"stage": stage, "change": "vae_tiling on"}
                else:
                    tiers = tiers_for(eng.spec)
                    here = tiers.index(eng.placement.tier)
                    if here + 1 >= len(tiers):
                        raise
                    step = {"stage": stage, "change": f"{eng.placement.tier} -> {tiers[here + 1]}"}
                    eng.retier(tiers[here + 1])
                step["error"] = str(e).splitlines()[0][:200]
                memory["step_downs"].append(step)
                memory["tier"] = eng.placement.tier
                self.repredict(job)
                log.warning("out of memory in %s: %s, retrying the stage", stage, step["change"])
