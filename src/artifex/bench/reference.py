"""DiffSynth-Studio's Wan model files, the independent reference of the S2V tests and benchmark.

The ``diffsynth`` wheel goes in with ``--no-deps``: its package ``__init__`` imports its training data tools and
through them torchvision, which is not in this project's stack. The model files need only torch, einops, ftfy
and regex, so ``diffsynth`` and ``diffsynth.core`` are registered as bare packages (their ``__path__`` only, no
``__init__`` run) and the submodule asked for is imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types


def available() -> bool:
    if "diffsynth" in sys.modules:
        return True
    spec = importlib.util.find_spec("diffsynth")
    return spec is not None and bool(spec.submodule_search_locations)


def _bare_package(name: str, path: str) -> None:
    if name not in sys.modules:
        module = types.ModuleType(name)
        module.__path__ = [path]
        sys.modules[name] = module


def diffsynth(submodule: str):
    """``diffsynth.<submodule>``, imported without running the package's ``__init__``; ImportError if absent."""
    if "diffsynth" not in sys.modules:
        spec = importlib.util.find_spec("diffsynth")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("diffsynth is not installed (pip install --no-deps diffsynth==2.1.12)")
        root = list(spec.submodule_search_locations)[0]
        _bare_package("diffsynth", root)
        _bare_package("diffsynth.core", os.path.join(root, "core"))
    return importlib.import_module(f"diffsynth.{submodule}")
