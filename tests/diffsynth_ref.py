"""DiffSynth-Studio's Wan model files as an independent reference for the tests (``artifex.bench.reference``).

Tests call ``reference("models.wan_video_dit_s2v")`` and skip when the wheel is absent (``scripts/
install_test_deps.sh`` installs it; under ``CI=true``, where that script has run, its absence fails).
"""

from __future__ import annotations

import os

import pytest

from artifex.bench.reference import available, diffsynth


def reference(submodule: str):
    """``diffsynth.<submodule>``, imported without running the package's ``__init__``."""
    if not available():
        if os.environ.get("CI") == "true":
            pytest.fail("diffsynth (the reference implementation) is not installed; "
                        "scripts/install_test_deps.sh installs it")
        pytest.skip("diffsynth is not installed (scripts/install_test_deps.sh installs it)")
    return diffsynth(submodule)
