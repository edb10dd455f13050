"""DiffSynth-Studio's Wan model files as an independent reference for the tests.

The ``diffsynth`` wheel is installed with ``--no-deps`` (``scripts/install_test_deps.sh``): its package
``__init__`` imports its training data tools and through them torchvision, which is not in this project's stack.
The model files themselves need only torch, einops, ftfy and regex, so this module registers ``diffsynth`` and
``diffsynth.core`` as bare packages (their ``__path__`` only, no ``__init__`` run) and imports the submodules
asked for. Tests call ``reference("models.wan_video_dit_s2v")`` and skip when the wheel is absent (it fails under
``CI=true``, where the install script has run).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

import pytest


def _bare_package(name: str, path: str) -> None:
    if name not in sys.modules:
        module = types.ModuleType(name)
        module.__path__ = [path]
        sys.modules[name] = module


def reference(submodule: str):
    """``diffsynth.<submodule>``, imported without running the package's ``__init__``."""
    spec = importlib.util.find_spec("diffsynth") if "diffsynth" not in sys.modules else None
    if "diffsynth" not in sys.modules:
        if spec is None or not spec.submodule_search_locations:
            if os.environ.get("CI") == "true":
                pytest.fail("diffsynth (the reference implementation) is not installed; "
                            "scripts/install_test_deps.sh installs it")
            pytest.skip("diffsynth is not installed (scripts/install_test_deps.sh installs it)")
        root = list(spec.submodule_search_locations)[0]
        _bare_package("diffsynth", root)
        _bare_package("diffsynth.core", os.path.join(root, "core"))
    return importlib.import_module(f"diffsynth.{submodule}")
