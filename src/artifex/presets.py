"""Quality presets of the setup guide (Draft / Preview / Production / Cinema).

A preset is relative to the model it is applied to: it scales the model's own step
count, picks among the sizes that model was trained on, and turns optimizations on.
Explicit request fields and config values always win over a preset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from artifex.errors import InvalidRequestError
from artifex.models.registry import MODELS, ModelSpec


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    steps_scale: float
    size: str  # "smallest" or "largest" trained size of the wanted orientation
    frames: str  # "short" (about a third of the default length) or "default"
    optimizations: dict = field(default_factory=dict)
    few_step: bool = False  # turbo: the sampling defaults of the model's distilled profile

    def sampling(self, spec: ModelSpec) -> ModelSpec:
        """The spec whose sampling defaults (steps, sampler, schedule, guidance, shift, expert switch) this preset
        runs: the model's few-step profile for ``turbo``, else the model itself."""
        if not self.few_step or spec.base is not None:
            return spec
        if spec.few_step is None:
            with_one = [n for n, s in MODELS.items() if s.few_step and s.tiny == spec.tiny]
            raise InvalidRequestError("preset", f"{self.name}: {spec.name} has no few-step (distilled) schedule",
                                      f"models that have one: {', '.join(with_one)}")
        return MODELS[spec.few_step]

    def steps(self, spec: ModelSpec) -> int:
        if self.few_step or spec.timesteps is not None:  # a distilled schedule is run as published
            return self.sampling(spec).steps
        return max(4, round(spec.steps * self.steps_scale))

    def num_frames(self, spec: ModelSpec) -> int | None:
        """The preset's frame count for ``spec``; S2V: one clip for a short preset, else None (the audio's)."""
        if spec.clip_frames:
            return spec.clip_video_frames(1) if self.frames == "short" else None
        if self.frames == "default":
            return spec.frames
        stride = spec.vae.temporal_stride
        return max(1, round((spec.frames - 1) / 3 / stride)) * stride + 1


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("draft", "fast look at motion and framing: 30% of the steps, smallest size, short clip", 0.3,
               "smallest", "short"),
        Preset("preview", "half the steps at the smallest trained size, full length", 0.5, "smallest", "default"),
        Preset("production", "the model's official settings at its largest size, compiled blocks", 1.0,
               "largest", "default", {"use_torch_compile": True}),
        Preset("cinema", "25% more steps than official at the largest size, compiled blocks", 1.25,
               "largest", "default", {"use_torch_compile": True}),
        Preset("turbo", "the model's distilled few-step schedule (FastWan 3-step DMD, Lightning 4-step Euler), no "
               "CFG, largest size; needs distilled weights (see `artifex models`)", 1.0, "largest", "default",
               few_step=True),
    ]
}


def get_preset(name: str) -> Preset:
    key = name.strip().lower()
    if key not in PRESETS:
        raise InvalidRequestError("preset", f"unknown preset {name!r}", PRESETS)
    return PRESETS[key]


def pick_size(spec: ModelSpec, which: str, aspect: float | None = None) -> tuple[int, int]:
    """A trained (width, height): the smallest or largest of the orientation ``aspect`` suggests.

    With an ``aspect`` (width/height of a conditioning image), the size whose aspect is
    closest wins among those of the chosen area; without one, landscape.
    """
    target = 1.0 if aspect is None else aspect
    oriented = [s for s in spec.sizes if (s[0] >= s[1]) == (target >= 1.0)] or list(spec.sizes)
    areas = sorted({w * h for w, h in oriented})
    area = areas[0] if which == "smallest" else areas[-1]
    same_area = [s for s in oriented if s[0] * s[1] == area]
    return min(same_area, key=lambda s: abs(s[0] / s[1] - (aspect or s[0] / s[1])))
