"""Shared fixtures: tiny Wan checkpoints saved to disk once per session, loaded through the real loader."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub: everything is built locally
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session", autouse=True)
def artifex_home(tmp_path_factory) -> Path:
    """Keep tiny checkpoints and outputs of the test run in a temporary ARTIFEX_HOME."""
    home = tmp_path_factory.mktemp("artifex-home")
    old = {k: os.environ.get(k) for k in ("ARTIFEX_HOME", "ARTIFEX_OUTPUT_DIR", "ARTIFEX_CONFIG")}
    os.environ["ARTIFEX_HOME"] = str(home)
    os.environ["ARTIFEX_OUTPUT_DIR"] = str(home / "out")
    os.environ.pop("ARTIFEX_CONFIG", None)
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_checkpoint(artifex_home):
    """tiny_checkpoint(name) -> the path of that tiny model's diffusers-format checkpoint."""
    from artifex.models.loader import resolve_checkpoint
    from artifex.models.registry import get_model

    def get(name: str) -> Path:
        return resolve_checkpoint(get_model(name), None, artifex_home)

    return get


@pytest.fixture
def checkpoint_copy(tiny_checkpoint, tmp_path):
    """checkpoint_copy(name) -> a private copy of a tiny checkpoint that a test may damage."""

    def copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(tiny_checkpoint(name), dst)
        return dst

    return copy


_ENGINES: dict = {}


@pytest.fixture(scope="session")
def engine(artifex_home):
    """engine(model, **config_fields) -> a loaded Engine, cached for the session."""
    from artifex.config import OptimizationConfig
    from artifex.engine.pipeline import Engine

    def get(model: str, **fields):
        key = (model, tuple(sorted(fields.items())))
        if key not in _ENGINES:
            _ENGINES[key] = Engine.load(model, config=OptimizationConfig(**fields))
        return _ENGINES[key]

    return get


@pytest.fixture(scope="session")
def image_file(tmp_path_factory) -> Path:
    """A 160x96 RGB test image with structure (gradients and a square), saved as PNG."""
    h, w = 96, 160
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, ((x // 16 + y // 16) % 2) * 200], axis=-1).astype(np.uint8)
    arr[30:60, 60:100] = [250, 30, 30]
    path = tmp_path_factory.mktemp("img") / "cond.png"
    Image.fromarray(arr).save(path)
    return path
