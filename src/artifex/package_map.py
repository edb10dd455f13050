"""``importlib.metadata.packages_distributions()`` kept on disk while the libraries import.

diffusers calls it once at import (``diffusers.utils.import_utils``: the map from import names to the
distributions that provide them), and it reads every installed distribution's file list: 0.95 s of a process's
imports on the GPU image (211 distributions, ``benchmarks/probes/probe12-h200.json``), 0.15 s on the CPU machine
(127, ``benchmarks/probes/imports-cpu.json``). ``cached()`` puts in its place, for the duration of the block, a
function that returns the map stored in ``$ARTIFEX_HOME/package-map.json`` when nothing on ``sys.path`` changed
since it was stored (the same interpreter, the same path entries, and each directory entry's modification time:
installing, upgrading or removing a distribution adds or removes an entry of its site-packages directory), and
otherwise computes the map, stores it and returns it. An unreadable or foreign file is computed again; a file that
cannot be written only costs the time. Blocks nest: an inner one leaves the outer one's function in place.
``ARTIFEX_LAZY_IMPORTS=off`` leaves the function alone.

Torch-free: ``timeline.import_libraries`` uses it before torch is imported.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

FORMAT = 1


def path_state() -> list:
    """What the map depends on: the interpreter and each ``sys.path`` entry with its modification time (None for
    an entry that is not there)."""
    entries = []
    for entry in sys.path:
        try:
            entries.append([entry, os.stat(entry or ".").st_mtime_ns])
        except OSError:
            entries.append([entry, None])
    return [FORMAT, sys.executable, sys.version, entries]


def _read(path: Path, state: list) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("state") != state or not isinstance(data.get("map"), dict):
        return None
    return data["map"]


def _write(path: Path, state: list, mapping: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"state": state, "map": mapping}))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def cached(path: Path) -> Iterator[None]:
    """Within the block, ``importlib.metadata.packages_distributions`` answers from ``path`` where it can."""
    from artifex.env import switch

    original = importlib.metadata.packages_distributions
    if not switch("ARTIFEX_LAZY_IMPORTS") or getattr(original, "artifex_cached", False):
        yield  # off, or inside another block (``importing()`` nests): that block's function answers
        return

    def packages_distributions() -> dict:
        state = path_state()
        mapping = _read(path, state)
        if mapping is None:
            mapping = original()
            _write(path, state, mapping)
        return {name: list(dists) for name, dists in mapping.items()}  # the caller's own copy, as the original's

    packages_distributions.artifex_cached = True
    importlib.metadata.packages_distributions = packages_distributions
    try:
        yield
    finally:
        if importlib.metadata.packages_distributions is packages_distributions:
            importlib.metadata.packages_distributions = original


__all__ = ["cached", "path_state"]
