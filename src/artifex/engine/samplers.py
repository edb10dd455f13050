"""The denoising samplers: UniPC (Wan's own, the default) and the few-step samplers of distilled checkpoints.

Every sampler has the interface the engine loop uses: ``set_timesteps(steps, device)``, ``.timesteps``,
``.step(model_output, t, sample, return_dict=False)[0]`` and ``.config.num_train_timesteps``.

- ``unipc``: diffusers' ``UniPCMultistepScheduler`` on flow sigmas, configured from the checkpoint's
  ``scheduler/scheduler_config.json`` (its solver settings and timestep spacing are used), with the request's shift.
- ``euler``: flow-matching Euler, ``x <- x + (s_next - s) * v``, at given sigmas or timesteps, else at the shifted
  linear schedule ``shift(linspace(1, 0, steps + 1))``. Lightning / LightX2V 4-step: shift 5 gives timesteps
  1000, 937.5, 833.3, 625.
- ``dmd``: the DMD sampler of FastWan: each step predicts ``x0 = x - s * v`` and re-noises it to the next sigma
  with fresh noise, ``x <- (1 - s_next) * x0 + s_next * noise``; the last step returns ``x0``. The noise is drawn
  on the CPU from a generator seeded from the request's seed (another stream than the starting noise), so a seed
  means the same video on every device. Published schedule: 3 steps at timesteps 1000, 757, 522.

Explicit timesteps and sigmas are the values the model sees (already shifted); they are not shifted again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from artifex.models.schedules import FASTWAN_TIMESTEPS, LIGHTNING_TIMESTEPS, NUM_TRAIN_TIMESTEPS, SAMPLERS  # noqa: F401

# The DMD re-noising generator's seed: request seed + this (request seeds are below 2**32, so the stream is never
# the starting noise of any request).
DMD_SEED_OFFSET = 2**32


def shifted(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow shift: ``shift * s / (1 + (shift - 1) * s)`` (1 -> 1, 0 -> 0; shift > 1 spends steps at high noise)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def default_sigmas(steps: int, shift: float) -> torch.Tensor:
    """The shifted linear schedule of ``steps`` sigmas, from 1 down to (not including) 0: float32."""
    return shifted(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1], shift).float()


@dataclass(frozen=True)
class SamplerConfig:
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS


class FlowEuler:
    """Flow-matching Euler over a fixed sigma schedule (terminal sigma 0); see the module docstring."""

    name = "euler"

    def __init__(self, sigmas: Sequence[float] | None = None, shift: float = 1.0):
        self.config = SamplerConfig()
        self._given = None if sigmas is None else torch.tensor([float(s) for s in sigmas], dtype=torch.float32)
        self.shift = shift
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self._index = 0

    def set_timesteps(self, steps: int, device: torch.device | str | None = None) -> None:
        """The schedule of ``steps`` steps: the given sigmas (their count must be ``steps``), else the default."""
        if self._given is not None and len(self._given) != steps:
            raise ValueError(f"{self.name}: the schedule has {len(self._given)} sigmas, asked for {steps} steps")
        sigmas = self._given if self._given is not None else default_sigmas(steps, self.shift)
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])  # on the CPU, as diffusers keeps them: no syncs
        self.timesteps = (self.sigmas[:-1] * self.config.num_train_timesteps).to(device)
        self._index = 0

    def _sigmas_now(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's sigma and the next; steps run in order, as the engine loop calls them."""
        if self._index >= len(self.timesteps):
            raise RuntimeError(f"{self.name}: step called more times than the {len(self.timesteps)} set")
        i = self._index
        self._index += 1
        return self.sigmas[i], self.sigmas[i + 1]

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = False):
        """One Euler step of the flow ODE, in fp32: ``x + (s_next - s) * v``."""
        sigma, sigma_next = self._sigmas_now()
        prev = sample.float() + (sigma_next - sigma) * model_output.float()
        return (prev.to(model_output.dtype),)


class DmdSampler(FlowEuler):
    """The DMD few-step sampler: predict x0, re-noise it to the next sigma with seeded fresh noise."""

    name = "dmd"

    def __init__(self, sigmas: Sequence[float] | None = None, shift: float = 1.0, seed: int = 0):
        super().__init__(sigmas, shift)
        self.seed = seed
        self.generator = torch.Generator("cpu").manual_seed(seed + DMD_SEED_OFFSET)

    def set_timesteps(self, steps: int, device: torch.device | str | None = None) -> None:
        super().set_timesteps(steps, device)
        self.generator.manual_seed(self.seed + DMD_SEED_OFFSET)  # a restarted denoise draws the same noise

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = False):
        sigma, sigma_next = self._sigmas_now()
        x0 = sample.float() - sigma * model_output.float()
        if float(sigma_next) == 0.0:
            return (x0.to(model_output.dtype),)
        noise = torch.randn(sample.shape, generator=self.generator, dtype=torch.float32).to(sample.device)
        return (((1 - sigma_next) * x0 + sigma_next * noise).to(model_output.dtype),)


def unipc(scheduler_config: dict, shift: float):
    """diffusers' UniPC from the checkpoint's scheduler config, on flow sigmas at ``shift``."""
    from diffusers import UniPCMultistepScheduler

    cfg = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    cfg.update(flow_shift=shift, use_flow_sigmas=True, prediction_type="flow_prediction")
    return UniPCMultistepScheduler.from_config(cfg)


def make_sampler(settings, scheduler_config: dict):
    """The sampler ``settings`` asks for (``Settings.sampler``, its schedule, shift and seed)."""
    sigmas = settings.sigmas
    if sigmas is None and settings.timesteps is not None:
        sigmas = [t / NUM_TRAIN_TIMESTEPS for t in settings.timesteps]
    if settings.sampler == "unipc":
        return unipc(scheduler_config, settings.shift)
    if settings.sampler == "euler":
        return FlowEuler(sigmas, settings.shift)
    if settings.sampler == "dmd":
        return DmdSampler(sigmas, settings.shift, settings.seed)
    raise ValueError(f"unknown sampler {settings.sampler!r} (allowed: {', '.join(SAMPLERS)})")


# -- the checkpoint's scheduler ------------------------------------------------------------
# What a checkpoint's scheduler_config.json may set, where each value goes: "flow_shift" (UniPC) or "shift"
# (FlowMatchEulerDiscreteScheduler) is the default shift of requests that give none.
_SHIFT_KEYS = {"UniPCMultistepScheduler": "flow_shift", "FlowMatchEulerDiscreteScheduler": "shift"}
_FORCED = {"prediction_type": "flow_prediction", "use_flow_sigmas": True}  # what makes UniPC run Wan's flow


def checkpoint_shift(scheduler_config: dict) -> float | None:
    """The shift a checkpoint's scheduler config declares, or None (no such key, or not a number > 0)."""
    key = _SHIFT_KEYS.get(scheduler_config.get("_class_name"), "flow_shift")
    value = scheduler_config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def scheduler_warnings(spec, scheduler_config: dict) -> list[str]:
    """Where a checkpoint's scheduler config differs from the variant's defaults (Wan's UniPC at the model's
    shift), one line each, saying what is used: logged once, at load."""
    from diffusers import UniPCMultistepScheduler

    where = "scheduler/scheduler_config.json"
    cls = scheduler_config.get("_class_name")
    out = []
    if cls not in (None, "UniPCMultistepScheduler"):
        out.append(f"{where}: the checkpoint's scheduler is {cls}; Artifex runs its own samplers ({', '.join(SAMPLERS)}"
                   f"; default unipc): pick one with the request's sampler field")
    key = _SHIFT_KEYS.get(cls, "flow_shift")
    if key in scheduler_config:
        shift = checkpoint_shift(scheduler_config)
        if shift is None:
            out.append(f"{where}: {key} {scheduler_config[key]!r} is not a number > 0; requests without a shift use "
                       f"{spec.name}'s {spec.shift:g}")
        elif shift != spec.shift:
            out.append(f"{where}: {key} {shift:g} differs from {spec.name}'s {spec.shift:g}; requests without a shift "
                       f"use the checkpoint's {shift:g}")
    if cls in (None, "UniPCMultistepScheduler"):
        defaults = UniPCMultistepScheduler(flow_shift=spec.shift, **_FORCED).config
        for name, value in sorted(scheduler_config.items()):
            if name.startswith("_") or name == "flow_shift" or name not in defaults or defaults[name] == value:
                continue
            if name in _FORCED:
                out.append(f"{where}: {name} {value!r} is ignored: Wan models run UniPC with {name} "
                           f"{_FORCED[name]!r}")
            else:
                out.append(f"{where}: {name} {value!r} differs from Wan's default {defaults[name]!r}; the "
                           f"checkpoint's value is used (unipc sampler)")
    return out
