"""The environment variables Artifex reads: a short fixed list, read here and nowhere else."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from artifex.errors import InvalidRequestError

VARIABLES = {
    "ARTIFEX_HOME": "cache folder for tiny checkpoints and (later) compile/autotune caches; default ~/.cache/artifex",
    "ARTIFEX_OUTPUT_DIR": "where generated videos go when no --output is given; default ./artifex-output",
    "ARTIFEX_CONFIG": "an OptimizationConfig TOML file read before --config and CLI flags",
    "ARTIFEX_LOG_LEVEL": "logging level: DEBUG, INFO (default), WARNING, ERROR",
    "ARTIFEX_PREFETCH": "on (default) or off: read a checkpoint directory's weight files into the page cache while "
                        "the libraries import (skipped when the host lacks the memory to keep them cached)",
    "ARTIFEX_READ_AHEAD": "on (default) or off: where the load will keep every component on the GPU, `artifex "
                          "generate`, `batch` and `serve` (one model) read a checkpoint directory's safetensors "
                          "there on a thread while the libraries import (models/read_ahead.py)",
    "ARTIFEX_READ_AHEAD_THREADS": "reader threads of the read-ahead (default 8, fast_read's); at 8 the imports it "
                                  "overlaps took ~0.8 s longer (benchmarks/probes/probe13-h100-run1.json)",
    "ARTIFEX_FAST_READ": "on (default) or off: read a component's safetensors straight to the GPU it loads on "
                         "through pinned buffers on threads (off: diffusers' and transformers' own readers)",
    "ARTIFEX_PIN_REGISTER": "on (default) or off: pin host memory (offload tiers' CPU homes, read buffers) as "
                            "ordinary pages registered with CUDA, not by cudaHostAlloc (off: torch's default)",
    "ARTIFEX_PIN_HUGE_PAGES": "off (default) or on: pinned host memory of 64 MiB and more (an offload tier's "
                              "homes) is 2 MiB transparent huge pages that Artifex registers with CUDA itself",
    "ARTIFEX_LAZY_IMPORTS": "on (default) or off: import only the diffusers model modules the Wan classes need, "
                            "transformers' model registry, scipy.stats, scipy.integrate and scipy.optimize when first "
                            "used, and keep importlib's package map on disk (off: diffusers imports all of its "
                            "autoencoders, UNets and transformer models, transformers reads every model's files, the "
                            "schedulers import scipy.stats and scipy.integrate, transformers' losses scipy.optimize, "
                            "and the package map is built at each import)",
    "ARTIFEX_DECODE_WARM_UP": "off (default) or on: on a GPU, a process's first decode at a shape first meets its "
                              "kernels while the denoise runs (a few latent frames of random latents; it did not "
                              "pay on an H200: ttv-h200.json)",
    "ARTIFEX_API_TOKEN": "bearer token of `artifex serve` (and what `artifex monitor` and `artifex submit` send); "
                         "default: a generated one stored in the data directory",
}


@dataclass(frozen=True)
class Env:
    home: Path
    output_dir: Path
    config: Path | None
    log_level: str
    api_token: str | None = None


def read_env() -> Env:
    home = os.environ.get("ARTIFEX_HOME") or str(Path.home() / ".cache" / "artifex")
    cfg = os.environ.get("ARTIFEX_CONFIG")
    return Env(
        home=Path(home).expanduser(),
        output_dir=Path(os.environ.get("ARTIFEX_OUTPUT_DIR") or "artifex-output"),
        config=Path(cfg).expanduser() if cfg else None,
        log_level=(os.environ.get("ARTIFEX_LOG_LEVEL") or "INFO").upper(),
        api_token=os.environ.get("ARTIFEX_API_TOKEN") or None,
    )


# The on/off variables whose default is off (every other one defaults to on)
OFF_BY_DEFAULT = ("ARTIFEX_DECODE_WARM_UP", "ARTIFEX_PIN_HUGE_PAGES")


def switch(name: str) -> bool:
    """An on/off variable of ``VARIABLES``: True for on; any other value than on or off is an error naming both.
    Unset: off for ``OFF_BY_DEFAULT``, on for the others."""
    value = (os.environ.get(name) or ("off" if name in OFF_BY_DEFAULT else "on")).strip().lower()
    if value not in ("on", "off"):
        raise InvalidRequestError(name, f"is {value!r}", "on, off")
    return value == "on"


def positive_int(name: str, default: int) -> int:
    """A whole-number variable of ``VARIABLES``: ``default`` when unset; anything but a positive integer is an
    error naming it."""
    value = (os.environ.get(name) or "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise InvalidRequestError(name, f"is {value!r}", "a positive integer")
    return int(value)
