"""The typed request every door builds (CLI, HTTP, Ray) and its validated, resolved form.

``GenerationRequest`` is what a user asked for: plain JSON-able fields, most optional.
``resolve_request`` fills the gaps from the preset and the model's defaults, checks
every field, and returns ``Settings``: the exact values the engine will run with.
Sizes and frame counts are validated, never rounded. Every number is checked for type,
finiteness and range before anything uses it (NaN and infinities are refused at every door),
and the hints an error gives (nearest valid sizes, maxima) respect the limits in force: the
model's, and a server's (``RequestLimits``) when one passes them.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from artifex.errors import InvalidRequestError, NotSupportedYetError
from artifex.models.registry import ModelSpec, get_model
from artifex.models.schedules import FASTWAN_TIMESTEPS, NUM_TRAIN_TIMESTEPS, SAMPLERS
from artifex.presets import Preset, get_preset, pick_size

# RoPE tables of the Wan DiT cover 1024 positions per axis (rope_max_seq_len).
_MAX_POSITIONS = 1024
MAX_SEED = 2**32 - 1
MAX_STEPS = 1000
# Classifier-free guidance scales in use are 1-10; far larger ones only saturate the video.
GUIDANCE_RANGE = (0.0, 100.0)
# The flow schedule's shift: Wan uses 1-17; below 0.01 or above 100 every timestep collapses onto one end.
SHIFT_RANGE = (0.01, 100.0)


@dataclass(frozen=True)
class RequestLimits:
    """A server's own caps on requests (``artifex serve --max-*``); None: only the model's limits apply."""

    max_width: int | None = None
    max_height: int | None = None
    max_frames: int | None = None
    max_steps: int | None = None


@dataclass
class GenerationRequest:
    """What to generate. Unset fields come from the preset, then from the model."""

    model: str
    prompt: str
    negative_prompt: str | None = None
    image: str | None = None  # path of a conditioning image (TI2V optional, I2V required)
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    steps: int | None = None
    guidance: float | None = None  # the only scale, or the high-noise expert's (A14B)
    guidance_low: float | None = None  # the low-noise expert's scale (A14B)
    shift: float | None = None
    seed: int | None = None
    preset: str | None = None
    output: str | None = None  # mp4 path; default: a fresh name in the output directory
    sampler: str | None = None  # unipc (default), euler, dmd (artifex.engine.samplers)
    timesteps: list[float] | None = None  # euler/dmd: the timesteps (0, 1000], decreasing; defines steps
    sigmas: list[float] | None = None  # euler/dmd: the sigmas (0, 1], decreasing (instead of timesteps)
    switch_step: int | None = None  # A14B: the first step of the low-noise expert (instead of the boundary)
    audio: str | None = None  # S2V: path of the speech/audio that drives the video (required there)
    pose_video: str | None = None  # S2V: path of a pose video that drives the body (optional)
    # A warm-up's (``Executor.warm_up``; not an API field): the whole shape through text and denoise, then only the
    # first ``WARM_UP_DECODE_FRAMES`` latent frames decoded and written (S2V decodes its clip whole)
    warm_up: bool = False

    def to_dict(self) -> dict:
        """The fields (``warm_up`` only on a warm-up: it is nobody's request field)."""
        d = asdict(self)
        if not d["warm_up"]:
            del d["warm_up"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRequestError(unknown[0], "unknown request field", sorted(known))
        for required in ("model", "prompt"):
            if required not in data:
                raise InvalidRequestError(required, "is required")
        return cls(**data)


# Used when a request gives none; a plain list of what Wan videos should not look like.
DEFAULT_NEGATIVE_PROMPT = (
    "blurry, low quality, jpeg artifacts, watermark, subtitles, text, static frame, frozen motion, "
    "overexposed, washed out colors, deformed body, extra fingers, distorted face, cluttered background"
)


@dataclass
class Settings:
    """The resolved, validated values a generation runs with."""

    model: str
    prompt: str
    negative_prompt: str
    image: str | None
    width: int
    height: int
    frames: int
    steps: int
    guidance: tuple[float, ...]  # per expert, high-noise first
    shift: float
    seed: int
    fps: int
    preset: str | None
    output: str | None
    sampler: str = "unipc"
    timesteps: list[float] | None = None  # the explicit schedule, if any (euler/dmd); not shifted again
    sigmas: list[float] | None = None
    switch_step: int | None = None  # A14B: the expert switch by step index, overriding the boundary
    shift_source: str = "model default"  # where shift came from: request, checkpoint or model default
    audio: str | None = None  # S2V: the audio file (checked: decodable, long enough, within the limit)
    audio_seconds: float | None = None  # S2V: its length
    pose_video: str | None = None
    clips: int | None = None  # S2V: clips generated (frames = 77 + 80 (clips - 1))
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["guidance"] = list(self.guidance)
        return d


def _nearest_valid(value: int, multiple: int, offset: int = 0, most: int | None = None) -> str:
    """The valid values (``multiple * n + offset``, positive, at most ``most``) on either side of ``value``."""
    lo = (value - offset) // multiple * multiple + offset
    cands = sorted({c for c in (lo, lo + multiple) if c > 0 and (most is None or c <= most)})
    return ", ".join(str(c) for c in cands)


def _largest_valid(most: int, multiple: int, offset: int = 0) -> int:
    """The largest ``multiple * n + offset`` that is at most ``most``."""
    return (most - offset) // multiple * multiple + offset


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(name, f"must be an integer, got {value!r}")
    return value


def _num(name: str, value: Any, allowed: str) -> float:
    """A finite number; ``allowed`` names the range in the error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(name, f"must be a number, got {value!r}", allowed)
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        raise InvalidRequestError(name, f"must be a finite number, got {value}", allowed) from None
    if not math.isfinite(number):
        raise InvalidRequestError(name, f"must be a finite number, got {value!r}", allowed)
    return number


def _text(name: str, value: Any) -> str:
    """A string that the text encoder, the job store and JSON can all carry: valid Unicode, no control
    characters besides tab and line breaks (a NUL would be cut or refused further down)."""
    if not isinstance(value, str):
        raise InvalidRequestError(name, f"must be a string, got {type(value).__name__}")
    for i, ch in enumerate(value):
        code = ord(ch)
        if (code < 0x20 and ch not in "\t\n\r") or code == 0x7F:
            raise InvalidRequestError(name, f"holds the control character U+{code:04X} at position {i}",
                                      "text; tab, newline and carriage return are the only control characters")
        if 0xD800 <= code <= 0xDFFF:
            raise InvalidRequestError(name, f"holds a lone UTF-16 surrogate (U+{code:04X}) at position {i}; "
                                            "it is not valid Unicode text")
    return value


def _schedule(name: str, values: Any, top: float) -> list[float]:
    """A request's explicit schedule: a non-empty list of finite numbers in (0, top], strictly decreasing."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)) or not values:
        raise InvalidRequestError(name, f"must be a non-empty list of numbers, got {values!r}")
    if len(values) > 1000:
        raise InvalidRequestError(name, f"has {len(values)} values; at most 1000 steps")
    allowed = f"numbers in (0, {top:g}], decreasing"
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InvalidRequestError(name, f"must be a number, got {v!r}", allowed)
    try:
        out = [float(v) for v in values]
    except OverflowError:  # an integer too large for a float
        raise InvalidRequestError(name, "holds an integer too large for a float", allowed) from None
    for i, v in enumerate(out):
        if not math.isfinite(v) or not 0 < v <= top:
            raise InvalidRequestError(name, f"value {i} is {v:g}, outside (0, {top:g}]")
        if i and v >= out[i - 1]:
            raise InvalidRequestError(name, f"must decrease strictly; value {i} ({v:g}) follows {out[i - 1]:g}")
    return out


def open_image(path: str) -> Image.Image:
    """Open and fully decode an image; an unreadable file is an error naming it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InvalidRequestError("image", f"{path} does not exist")
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InvalidRequestError(
            "image", f"{path} is not a readable image ({e})", "PNG, JPEG, WebP, BMP and other formats Pillow decodes"
        ) from None


def check_size(spec: ModelSpec, width: int, height: int, limits: RequestLimits | None = None) -> list[str]:
    """Errors for sizes the model (or the server's ``limits``) cannot run; a warning for sizes it was not
    trained on."""
    m = spec.spatial_multiple
    for name, v in (("width", width), ("height", height)):
        model_max = m * _MAX_POSITIONS
        server_max = getattr(limits, f"max_{name}", None) if limits else None
        most = _largest_valid(min(model_max, server_max or model_max), m)
        allowed = f"multiples of {m} up to {most}"
        if v <= 0:
            raise InvalidRequestError(name, f"must be positive, got {v}", allowed)
        if server_max is not None and server_max < model_max and v > server_max:
            raise InvalidRequestError(name, f"{v} is over this server's limit", allowed)
        if v > model_max:
            raise InvalidRequestError(name, f"{v} exceeds the model's position table "
                                            f"({_MAX_POSITIONS} positions of {m} pixels)", f"at most {most}")
        if v % m:
            raise InvalidRequestError(
                name, f"{v} is not a multiple of {m} ({spec.name}: VAE stride x patch); nearest valid: "
                      f"{_nearest_valid(v, m, most=most)}", allowed)
    if (width, height) not in spec.sizes:
        trained = ", ".join(f"{w}x{h}" for w, h in spec.sizes)
        return [f"{width}x{height} is not a size {spec.name} was trained on ({trained}); quality may suffer"]
    return []


def check_frames(spec: ModelSpec, frames: int, limits: RequestLimits | None = None) -> None:
    """Frame counts the VAE packs (``4n+1``) within the model's position table and the server's ``limits``."""
    s = spec.vae.temporal_stride
    model_max = s * (_MAX_POSITIONS - 1) + 1
    server_max = limits.max_frames if limits else None
    most = _largest_valid(min(model_max, server_max or model_max), s, 1)
    allowed = f"{s}n+1 up to {most}"
    if server_max is not None and server_max < model_max and frames > server_max:
        raise InvalidRequestError("frames", f"{frames} is over this server's limit", allowed)
    if frames > model_max:
        raise InvalidRequestError("frames", f"{frames} exceeds the model's position table ({_MAX_POSITIONS} "
                                            f"latent frames)", f"at most {most}")
    if frames < 1 or (frames - 1) % s:
        raise InvalidRequestError(
            "frames", f"must be {s}n+1 (the VAE packs {s} frames per latent frame after the first); "
                      f"got {frames}; nearest valid: {_nearest_valid(max(frames, 1), s, 1, most=most)}", allowed)


def resolve_request(req: GenerationRequest, limits: RequestLimits | None = None,
                    checkpoint_shift: float | None = None) -> tuple[ModelSpec, Settings, Image.Image | None]:
    """Validate ``req`` and fill every gap; returns the spec, the settings and the decoded image.

    ``checkpoint_shift``: the shift the loaded checkpoint's scheduler config declares (a distilled or fine-tuned
    checkpoint ships its own); a request without a shift runs at it rather than at the model's default.
    ``limits``: a server's caps, checked here with the model's so that every hint respects both."""
    if not isinstance(req.model, str):
        raise InvalidRequestError("model", f"must be a string, got {type(req.model).__name__}")
    spec = get_model(req.model)
    if not spec.runnable:
        raise NotSupportedYetError(f"{spec.name} is in the registry but its pipeline is not built yet; "
                                   "runnable models: " + ", ".join(n for n in _runnable()))
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise InvalidRequestError("prompt", "must be a non-empty string")
    _text("prompt", req.prompt)
    if req.preset is not None and not isinstance(req.preset, str):
        raise InvalidRequestError("preset", f"must be a string, got {type(req.preset).__name__}")
    preset: Preset | None = get_preset(req.preset) if req.preset else None

    # Every number is checked before the image is opened: nothing costly happens for a request refused anyway.
    if (req.width is None) != (req.height is None):
        raise InvalidRequestError("width" if req.width is None else "height",
                                  "give both width and height, or neither")
    given_size = None
    if req.width is not None:
        given_size = _int("width", req.width), _int("height", req.height)
        check_size(spec, *given_size, limits)

    if spec.clip_frames:  # S2V: the audio sets the length; a given frame count must be a whole number of clips
        frames = _int("frames", req.frames) if req.frames is not None else None
        if frames is not None:
            check_clip_frames(spec, frames, limits)
        elif preset is not None:
            frames = preset.num_frames(spec)  # one clip for draft; None: the audio's length
    else:
        frames = _int("frames", req.frames) if req.frames is not None else (
            preset.num_frames(spec) if preset else spec.frames)
        check_frames(spec, frames, limits)

    d = preset.sampling(spec) if preset else spec  # whose sampling defaults: turbo runs the few-step profile's
    sampler = req.sampler if req.sampler is not None else d.sampler
    if sampler not in SAMPLERS:
        raise InvalidRequestError("sampler", f"unknown sampler {sampler!r}", SAMPLERS)
    if req.timesteps is not None and req.sigmas is not None:
        raise InvalidRequestError("sigmas", "give timesteps or sigmas, not both")
    timesteps = _schedule("timesteps", req.timesteps, NUM_TRAIN_TIMESTEPS) if req.timesteps is not None else None
    sigmas = _schedule("sigmas", req.sigmas, 1.0) if req.sigmas is not None else None
    schedule_field, schedule = ("timesteps", timesteps) if timesteps is not None else ("sigmas", sigmas)
    if schedule is not None and sampler == "unipc":
        raise InvalidRequestError(schedule_field, "the unipc sampler takes no explicit schedule; choose a sampler "
                                                  "that does with the sampler field", ["euler", "dmd"])
    if schedule is None and req.shift is None:
        if d.timesteps is not None and sampler == d.sampler and req.steps in (None, len(d.timesteps)):
            timesteps = schedule = list(d.timesteps)  # a distilled profile's published schedule (not shifted)
        elif sampler == "dmd" and req.steps in (None, len(FASTWAN_TIMESTEPS)):
            timesteps = schedule = list(FASTWAN_TIMESTEPS)  # FastWan's published DMD schedule (not shifted)
        if schedule is not None:
            schedule_field = "timesteps"

    top = min(MAX_STEPS, limits.max_steps) if limits and limits.max_steps else MAX_STEPS
    if req.steps is not None:
        steps = _int("steps", req.steps)
    elif schedule is not None:
        steps = len(schedule)  # the schedule defines the step count
    else:
        steps = preset.steps(spec) if preset else spec.steps
    if steps <= 0 or steps > top:
        if limits and limits.max_steps and limits.max_steps < MAX_STEPS and steps > top:
            raise InvalidRequestError("steps", f"{steps} is over this server's limit", f"1..{top}")
        raise InvalidRequestError("steps", f"must be between 1 and {top}, got {steps}", f"1..{top}")
    if schedule is not None and len(schedule) != steps:
        raise InvalidRequestError(schedule_field, f"has {len(schedule)} values but steps is {steps}; give as many "
                                                  "values as steps, or leave steps out")

    g_lo, g_hi = GUIDANCE_RANGE
    g_allowed = f"{g_lo:g} to {g_hi:g} (1 or less turns classifier-free guidance off)"
    guidance = list(d.guidance)
    if req.guidance is not None:
        guidance[0] = _num("guidance", req.guidance, g_allowed)
        if spec.experts == 1:
            guidance = guidance[:1]
    if req.guidance_low is not None:
        if spec.experts < 2:
            raise InvalidRequestError("guidance_low", f"{spec.name} has one expert; use guidance only")
        guidance[1] = _num("guidance_low", req.guidance_low, g_allowed)
    for name, g in zip(("guidance", "guidance_low"), guidance):
        if g < g_lo:
            raise InvalidRequestError(name, f"must be >= 0 (1 or less turns classifier-free guidance off), got {g}",
                                      g_allowed)
        if g > g_hi:
            raise InvalidRequestError(name, f"must be at most {g_hi:g}, got {g:g}", g_allowed)

    s_lo, s_hi = SHIFT_RANGE
    s_allowed = f"{s_lo:g} to {s_hi:g}"
    if req.shift is not None:
        shift, shift_source = _num("shift", req.shift, s_allowed), "request"
        if req.timesteps is not None or req.sigmas is not None:
            raise InvalidRequestError("shift", f"has no effect with explicit {schedule_field} (they are the "
                                               "shifted values the model sees); leave shift out")
    elif checkpoint_shift is not None:
        shift, shift_source = float(checkpoint_shift), "checkpoint"
    else:
        shift, shift_source = d.shift, "model default"
    if not math.isfinite(shift) or shift <= 0:
        raise InvalidRequestError("shift", f"must be > 0, got {shift:g}", s_allowed)
    if not s_lo <= shift <= s_hi:
        raise InvalidRequestError("shift", f"must be between {s_lo:g} and {s_hi:g}, got {shift:g}", s_allowed)
    limit = max_steps(shift) if sampler == "unipc" else steps
    if steps > limit:
        raise InvalidRequestError("steps", f"{steps} steps at shift {shift:g} repeat integer timesteps, which the "
                                           f"UniPC solver cannot step through", f"at most {limit} at this shift")

    switch_step = None
    if req.switch_step is None and d.switch_step is not None and schedule is not None and \
            list(schedule) == list(d.timesteps or ()):
        switch_step = d.switch_step  # the profile's expert switch by step index, with its schedule
    if req.switch_step is not None:
        switch_step = _int("switch_step", req.switch_step)
        if spec.experts < 2:
            raise InvalidRequestError("switch_step", f"{spec.name} has one expert; the switch is for two-expert "
                                                     "(A14B) models")
        if not 0 <= switch_step <= steps:
            raise InvalidRequestError("switch_step", f"must be in [0, {steps}] (the first of the {steps} steps run "
                                                     f"by the low-noise expert), got {switch_step}")

    if req.seed is None:
        seed = random.SystemRandom().randint(0, MAX_SEED)
    else:
        seed = _int("seed", req.seed)
        if not 0 <= seed <= MAX_SEED:
            raise InvalidRequestError("seed", f"must be in [0, {MAX_SEED}], got {seed}", f"0..{MAX_SEED}")

    negative = req.negative_prompt if req.negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT
    if not isinstance(negative, str):
        raise InvalidRequestError("negative_prompt", "must be a string")
    _text("negative_prompt", negative)
    if req.output is not None and not str(req.output).lower().endswith(".mp4"):
        raise InvalidRequestError("output", f"must be an .mp4 path, got {req.output!r}")

    image = None
    if req.image is not None:
        if spec.image == "none":
            others = ", ".join(n for n, s in _runnable().items() if s.image != "none" and s.tiny == spec.tiny)
            raise InvalidRequestError("image", f"{spec.name} takes no image", f"models that do: {others}")
        if not isinstance(req.image, str):
            raise InvalidRequestError("image", f"must be a file path, got {type(req.image).__name__}")
        image = open_image(req.image)
    elif spec.image == "required":
        raise InvalidRequestError("image", f"{spec.name} generates from an image; pass one (--image PATH)")

    audio = _s2v_media(spec, req, frames, limits)

    warnings: list[str] = []
    if given_size is not None:
        width, height = given_size
    else:
        aspect = image.width / image.height if image is not None else None
        width, height = pick_size(spec, preset.size if preset else "largest", aspect)
        if spec.clip_frames and image is not None:  # S2V: the image's aspect within the chosen size's area
            width, height = fit_area(image.width, image.height, width * height, spec.spatial_multiple)
    warnings += check_size(spec, width, height, limits)

    settings = Settings(
        model=spec.name, prompt=req.prompt, negative_prompt=negative, image=req.image, width=width, height=height,
        frames=audio.frames if audio else frames, steps=steps, guidance=tuple(guidance), shift=shift, seed=seed,
        fps=spec.fps, preset=preset.name if preset else None, output=req.output, sampler=sampler,
        timesteps=timesteps, sigmas=sigmas, switch_step=switch_step, shift_source=shift_source, warnings=warnings,
        audio=req.audio, audio_seconds=audio.seconds if audio else None, pose_video=req.pose_video,
        clips=audio.clips if audio else None,
    )
    return spec, settings, image


def fit_area(width: int, height: int, area: int, multiple: int) -> tuple[int, int]:
    """The largest size of ``width``/``height``'s aspect, each side rounded up to ``multiple``, whose area is at most
    ``area`` (S2V sizes itself this way from the reference image); at least one ``multiple`` a side."""
    best = (multiple, multiple)
    scale = math.sqrt(area / (width * height))
    for i in range(200):  # from the scale that fills the area down, in 0.5% steps
        s = scale * (1 - i / 200)
        w = max(multiple, math.ceil(int(width * s) / multiple) * multiple)
        h = max(multiple, math.ceil(int(height * s) / multiple) * multiple)
        if w * h <= area:
            best = (w, h)
            break
    return best


def check_clip_frames(spec: ModelSpec, frames: int, limits: RequestLimits | None = None) -> int:
    """S2V: a frame count that is a whole number of clips (77 + 80 (n - 1)) within the server's ``limits``;
    returns the clips."""
    first, step = spec.clip_video_frames(1), spec.clip_frames
    most = limits.max_frames if limits and limits.max_frames else None
    if most is not None and most < first:
        raise InvalidRequestError("frames", f"this server's limit ({most} frames) is under one {spec.name} clip "
                                            f"({first} frames)")
    allowed = f"{first} + {step}n ({first}, {first + step}, {first + 2 * step}, ...)" + (
        f" up to {(most - first) // step * step + first}" if most else "")
    if frames < first or (frames - first) % step:
        lo = first + max(0, (frames - first) // step) * step
        near = [lo] if frames < first else [lo, lo + step]
        raise InvalidRequestError("frames", f"{spec.name} makes clips of {step} frames (the first {first}); got "
                                            f"{frames}; nearest valid: {', '.join(map(str, near))}", allowed)
    if most is not None and frames > most:
        raise InvalidRequestError("frames", f"{frames} is over this server's limit", allowed)
    return (frames - first) // step + 1


@dataclass(frozen=True)
class _Audio:
    seconds: float
    clips: int
    frames: int


def _s2v_media(spec: ModelSpec, req: GenerationRequest, frames: int | None,
               limits: RequestLimits | None) -> _Audio | None:
    """S2V: decode the audio (never trusted: format, length and stream checked) and open the pose video; the clip
    count follows the audio, or ``frames`` when given (at most the audio's). Other models refuse both fields."""
    s2v = [n for n, s in _runnable().items() if s.task == "s2v" and s.tiny == spec.tiny]
    if spec.task != "s2v":
        for name in ("audio", "pose_video"):
            if getattr(req, name) is not None:
                raise InvalidRequestError(name, f"{spec.name} takes no {name.replace('_', ' ')}",
                                          f"models that do: {', '.join(s2v)}")
        return None
    from artifex.models.s2v.audio import SAMPLE_RATE, audio_samples, clips_for_samples, open_pose_video

    if req.audio is None:
        raise InvalidRequestError("audio", f"{spec.name} generates from speech or other audio; pass one "
                                           "(--audio PATH: wav, mp3, m4a, flac, ogg or any file PyAV decodes)")
    if not isinstance(req.audio, str):
        raise InvalidRequestError("audio", f"must be a file path, got {type(req.audio).__name__}")
    samples = audio_samples(req.audio)  # decoded and checked (a server's check decoded it already: not again)
    seconds = samples / SAMPLE_RATE
    available = clips_for_samples(samples)
    if frames is not None:
        clips = check_clip_frames(spec, frames, limits)
        if clips > available:
            valid = ", ".join(str(spec.clip_video_frames(n)) for n in range(1, available + 1))
            raise InvalidRequestError("frames", f"{frames} frames need {clips} clips; the audio ({seconds:.1f} s) "
                                                f"makes {available}", valid)
    else:
        clips = available
        most = limits.max_frames if limits and limits.max_frames else None
        if most is not None and spec.clip_video_frames(clips) > most:
            fit = (most - spec.clip_video_frames(1)) // spec.clip_frames + 1 if most >= spec.clip_video_frames(1) else 0
            raise InvalidRequestError("audio", f"{seconds:.1f} s of audio make {clips} clips "
                                               f"({spec.clip_video_frames(clips)} frames), over this server's limit "
                                               f"of {most} frames",
                                      f"frames {spec.clip_video_frames(fit)} to keep the first {fit} clip(s)"
                                      if fit else "a shorter audio")
    if req.pose_video is not None:
        if not isinstance(req.pose_video, str):
            raise InvalidRequestError("pose_video", f"must be a file path, got {type(req.pose_video).__name__}")
        open_pose_video(req.pose_video)
    return _Audio(seconds=round(seconds, 3), clips=clips, frames=spec.clip_video_frames(clips))


@functools.cache
def max_steps(shift: float) -> int:
    """The most steps whose shifted flow schedule keeps every integer timestep distinct (UniPC needs that)."""
    from artifex import timeline

    with timeline.PROCESS.span("imports"):  # often the process's first import of torch and diffusers
        from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)

    def ok(n: int) -> bool:
        sched.set_timesteps(n)
        return len(set(sched.timesteps.tolist())) == n

    lo, hi = 1, 1000
    if ok(hi):
        return hi
    while hi - lo > 1:  # ok(lo) and not ok(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _runnable() -> dict[str, ModelSpec]:
    from artifex.models.registry import MODELS

    return {n: s for n, s in MODELS.items() if s.runnable}
