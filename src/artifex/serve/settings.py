"""What a server runs with: address, models, data directory, queue and request limits.

Limits can come from the ``[serve]`` table of the TOML file given with ``--config`` (or
``$ARTIFEX_CONFIG``); command-line flags win. Every limit is checked here once, so a bad
value stops the server at start-up with the field named, not at the first request.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from artifex.config import OptimizationConfig
from artifex.errors import InvalidRequestError

# The longest audio the engine reads (``artifex.models.s2v.audio.DEFAULT_MAX_SECONDS``): a server cap above it
# would accept audio that the request's own check then refuses.
ENGINE_MAX_AUDIO_SECONDS = 600
_SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30,
               "t": 2**40, "tb": 2**40}


def parse_bytes(text: str | int, name: str = "max_disk") -> int:
    """``"50G"``, ``"200MB"``, ``"30k"`` or a plain number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise InvalidRequestError(name, f"not a size: {text!r}", "a number of bytes, or with K, M, G, T (e.g. 50G)")
        number = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
        if not math.isfinite(number):  # more digits than a float holds
            raise InvalidRequestError(name, f"not a size: {text!r}", "a number of bytes, or with K, M, G, T (e.g. 50G)")
        value = int(number)
    if value < 0:
        raise InvalidRequestError(name, f"must be >= 0, got {value}")
    return value


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``artifex serve`` needs besides the optimization config."""

    models: tuple[str, ...]
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    checkpoints: dict[str, str] = field(default_factory=dict)  # model -> directory or hub id
    auth: bool = True
    token_file: Path | None = None
    # queue and storage
    max_queue: int = 64  # queued jobs (all models); beyond: 429 with Retry-After
    max_disk: int = 50 * 2**30  # bytes of finished outputs kept; oldest evicted first; 0 = no cap
    max_attempts: int = 3  # a job interrupted this many times (crashes) fails instead of running again
    # request limits
    max_steps: int = 100
    max_frames: int = 121
    max_width: int = 1280
    max_height: int = 1280
    max_upload_bytes: int = 20 * 2**20
    max_image_pixels: int = 40_000_000
    max_prompt_chars: int = 4000
    # S2V uploads: the audio and the pose video, each at most this many bytes; audio at most this many seconds
    max_media_bytes: int = 50 * 2**20
    max_audio_seconds: int = 600
    # warm-up: one short generation per shape before /readyz says ready; () = the model's default shape
    warmup: bool = True
    warmup_shapes: tuple[tuple[int, int, int], ...] = ()
    debug: bool = False
    # named LoRA sets a request may ask for (``lora: NAME``): name -> the ``lora`` config text (comma-separated
    # ``[high=|low=]FILE[:SCALE]`` specs); "default" is the config's own ``lora`` (possibly none)
    loras: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.models:
            raise InvalidRequestError("model", "serve at least one model (--model NAME, repeatable)")
        for name in ("max_queue", "max_steps", "max_frames", "max_width", "max_height", "max_upload_bytes",
                     "max_image_pixels", "max_prompt_chars", "max_attempts", "max_media_bytes", "max_audio_seconds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidRequestError(name, f"must be a positive integer, got {v!r}")
        if self.max_audio_seconds > ENGINE_MAX_AUDIO_SECONDS:
            top = ENGINE_MAX_AUDIO_SECONDS
            raise InvalidRequestError("max_audio_seconds", f"{self.max_audio_seconds} is over the {top} s the engine "
                                                           "reads", f"1..{top}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise InvalidRequestError("port", f"must be an integer in 1..65535, got {self.port!r}", "1..65535")
        if not isinstance(self.host, str) or not self.host:
            raise InvalidRequestError("host", f"must be a host name or address, got {self.host!r}")
        if isinstance(self.max_disk, bool) or not isinstance(self.max_disk, int) or self.max_disk < 0:
            raise InvalidRequestError("max_disk", f"must be a number of bytes >= 0, got {self.max_disk!r}",
                                      "a number of bytes, or with K, M, G, T (e.g. 50G); 0 = no cap")
        for name in ("auth", "warmup", "debug"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(name, f"must be true or false, got {getattr(self, name)!r}")
        shapes = self.warmup_shapes
        if not isinstance(shapes, (list, tuple)) or not all(
                isinstance(x, (list, tuple)) and len(x) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in x) for x in shapes):
            raise InvalidRequestError("warmup_shapes", f"must be a list of [width, height, frames] of positive "
                                                       f"integers, got {shapes!r}"[:300])
        object.__setattr__(self, "warmup_shapes", tuple(tuple(x) for x in shapes))
        object.__setattr__(self, "loras", check_lora_sets(self.loras))
        if isinstance(self.token_file, str):  # from a [serve] table
            object.__setattr__(self, "token_file", Path(self.token_file).expanduser())
        if self.token_file is not None and not isinstance(self.token_file, Path):
            raise InvalidRequestError("token_file", f"must be a file path, got {self.token_file!r}")

    @property
    def db_path(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    def request_limits(self):
        """The caps ``resolve_request`` checks with the model's own (a ``RequestLimits``), so its hints never
        exceed them."""
        from artifex.engine.request import RequestLimits

        return RequestLimits(max_width=self.max_width, max_height=self.max_height, max_frames=self.max_frames,
                             max_steps=self.max_steps)

    def limits(self) -> dict[str, int]:
        return {"max_steps": self.max_steps, "max_frames": self.max_frames, "max_width": self.max_width,
                "max_height": self.max_height, "max_upload_bytes": self.max_upload_bytes,
                "max_image_pixels": self.max_image_pixels, "max_prompt_chars": self.max_prompt_chars,
                "max_queue": self.max_queue, "max_media_bytes": self.max_media_bytes,
                "max_audio_seconds": self.max_audio_seconds}

    @property
    def max_body_bytes(self) -> int:
        """The largest request body: an image and two media uploads, base64 in JSON, plus form overhead."""
        return (self.max_upload_bytes + 2 * self.max_media_bytes) * 4 // 3 + 2**20

    def merged(self, overrides: dict[str, Any]) -> ServeSettings:
        """A copy with ``overrides`` (from a ``[serve]`` table or flags); unknown keys are an error."""
        known = {f.name for f in fields(self)} - {"models", "data_dir", "checkpoints"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise InvalidRequestError(f"serve.{unknown[0]}", "unknown serve setting", sorted(known))
        values = dict(overrides)
        for key in ("max_disk", "max_upload_bytes", "max_media_bytes"):
            if key in values and isinstance(values[key], str):
                values[key] = parse_bytes(values[key], key)
        return replace(self, **values)


LORA_SET_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
DEFAULT_LORA_SET = "default"


def check_lora_sets(sets: Any) -> dict[str, str]:
    """Named LoRA sets (a ``[serve.loras]`` table or ``--lora-set`` flags): each name a short lower-case word,
    each value specs the ``lora`` config field takes (a list of specs or one comma-separated string), every file
    present. Returns name -> the comma-separated text."""
    from artifex.models.lora import format_lora_specs, parse_lora_specs

    if not isinstance(sets, dict):
        raise InvalidRequestError("loras", f"must be a table of NAME = [specs], got {sets!r}"[:200])
    out = {}
    for name, value in sets.items():
        if not isinstance(name, str) or not LORA_SET_NAME.match(name) or name == DEFAULT_LORA_SET:
            raise InvalidRequestError("loras", f"{name!r} is not a LoRA set name",
                                      f"lower-case letters, digits, _ . - (up to 64), not {DEFAULT_LORA_SET!r}")
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            value = ",".join(value)
        if not isinstance(value, str) or not value.strip():
            raise InvalidRequestError(f"loras.{name}", "must name at least one LoRA file",
                                      "[high=|low=]FILE[:SCALE], comma-separated or a list")
        specs = parse_lora_specs(value)
        for spec in specs:
            if not Path(spec.path).is_file():
                raise InvalidRequestError(f"loras.{name}", f"{spec.path} does not exist or is not a file")
        out[name] = format_lora_specs(specs)
    return out


def split_config_file(data: dict) -> tuple[dict, dict]:
    """A TOML document -> (optimization fields, serve fields).

    Optimization fields are top-level keys or an ``[optimization]`` table (as for
    ``artifex generate``); serve fields are the ``[serve]`` table.
    """
    data = dict(data)
    serve = data.pop("serve", {}) or {}
    if not isinstance(serve, dict):
        raise InvalidRequestError("serve", "must be a TOML table ([serve])")
    optimization = data.pop("optimization", None)
    if optimization is None:
        optimization = data
    elif data:
        raise InvalidRequestError(sorted(data)[0], "put optimization fields under [optimization] or at the top, "
                                                   "not both")
    return optimization, serve


def load_config_file(path: Path, config: OptimizationConfig, serve: dict) -> tuple[OptimizationConfig, dict]:
    import tomllib

    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InvalidRequestError("config", f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidRequestError("config", f"{path} is not valid TOML: {e}") from None
    opt, srv = split_config_file(data)
    return config.merged(opt), {**serve, **srv}
