"""Running Artifex's Triton kernels on CPU tensors under Triton's interpreter, for the kernel tests."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="Triton is not installed (CPU builds of PyTorch come without it); "
                                         "scripts/check_kernels.py checks the kernels on a GPU")


def run_interpreted(code: str) -> dict:
    """Run ``code`` in a fresh interpreter with TRITON_INTERPRET=1 (set before Triton is imported, hence the
    subprocess) and return the JSON it prints on its ``RESULT `` line."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))
