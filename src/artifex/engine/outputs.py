"""What a generation writes: the mp4 path, the JSON sidecar beside it (what was asked, what ran: settings, plan,
layout; how long each stage took, peak memory, versions), built in one place and written once, atomically."""

from __future__ import annotations

import json
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from artifex import timeline
from artifex.engine.decoders import decoder_report
from artifex.env import read_env
from artifex.models import prefetch, read_ahead
from artifex.sysinfo import device_info, versions

if TYPE_CHECKING:
    from artifex.engine.pipeline import Engine, GenerationResult
    from artifex.engine.request import GenerationRequest


def build_sidecar(engine: Engine, request: GenerationRequest, r: GenerationResult, extra: dict) -> dict:
    """The sidecar of ``r``; ``extra``: keys a layout or a pipelined job adds (e.g. ``parallel``)."""
    spec, s = engine.spec, r.settings
    _, t, h, w = spec.latent_shape(s.width, s.height, s.frames)
    return {
        "artifex_sidecar": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "video": {"path": r.video_path.name, "codec": "h264", "pix_fmt": "yuv420p", "color": "bt709 tv",
                  "fps": s.fps, "frames": s.frames, "width": s.width, "height": s.height},
        "request": request.to_dict(),
        "settings": s.to_dict(),
        "seed": s.seed,
        "model": {"name": spec.name, "checkpoint": str(engine.c.info.path),
                  "boundary_ratio": engine.c.info.boundary_ratio, "latent_shape": [spec.vae.z_dim, t, h, w],
                  "tokens_per_forward": spec.tokens(s.width, s.height, s.frames)},
        "experts_per_step": r.experts_per_step,
        "switch_step": r.switch_step,
        "plan": r.plan.to_dict(),
        "attention": r.attention.to_dict(),
        "memory": r.memory,
        "fp8": engine.fp8_report,
        "lora": engine.loras,
        "decoder": decoder_report(engine.light_decoder),
        "config": engine.config.to_dict(),
        "timings_s": {"load": round(engine.load_s, 4), **r.timings},
        # The process's time from its start to this mp4 closed, stage by stage (``artifex.timeline``).
        "wall": timeline.wall_section(engine.load_timings, r.timings),
        "prefetch": prefetch.report(),  # checkpoints read into the page cache during the imports (models.prefetch)
        "read_ahead": read_ahead.report(),  # weights read to the GPU during the imports (models.read_ahead)
        "text_cache": text_cache_section(engine, s),
        "peak_memory": r.peak_memory,
        "versions": versions(),
        "device": device_info(engine.device),
        **extra,
    }


def text_cache_section(engine: Engine, s) -> dict:
    """The prompt-embedding cache: whether this request's prompt (and negative prompt, under CFG) came from it,
    and its totals. The outcome is the latest lookup of each text, so a pipelined batch's next job with the same
    text may have looked it up again in between (it then reads as that lookup's)."""
    from artifex.engine.pipeline import clean_prompt

    cache = engine.text_cache
    texts = {"prompt": s.prompt}
    if any(g > 1.0 for g in s.guidance):
        texts["negative_prompt"] = s.negative_prompt
    keys = engine.text_keys([clean_prompt(t) for t in texts.values()])
    hits = {name: cache.last_outcome(k) if k is not None else None for name, k in zip(texts, keys, strict=True)}
    return {"enabled": cache.enabled, "hit": hits, **cache.to_dict()}


def default_output(output_dir: str | Path | None, model: str, seed: int) -> Path:
    """A fresh mp4 name in ``output_dir`` (default: the environment's output directory)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return Path(output_dir or read_env().output_dir) / f"{model}-{stamp}-seed{seed}.mp4"


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (a partial file renamed into place), as strict JSON (no NaN or Infinity
    tokens, which most readers refuse). The request's numbers are finite by validation; a measurement that came out
    non-finite (a diverged error figure) is written as null."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(_finite_or_null(data), indent=2, default=str, allow_nan=False))
    tmp.replace(path)


def _finite_or_null(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a synced temporary file and a rename: the file is whole or absent."""
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
