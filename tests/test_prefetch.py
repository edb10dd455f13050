"""The checkpoint prefetch: weight files read on a thread in load order, skipped when it cannot help, reported."""

from __future__ import annotations

import json

import pytest

from artifex.cli import main
from artifex.errors import InvalidRequestError
from artifex.models import prefetch


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """Each test starts with no prefetch of this process (start() runs once per directory per process)."""
    monkeypatch.setattr(prefetch, "_CURRENT", [])
    monkeypatch.delenv("ARTIFEX_PREFETCH", raising=False)


def fake_checkpoint(root, sizes: dict[str, int]):
    for rel, size in sizes.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    return root


LAYOUT = {"text_encoder/model.safetensors": 3000, "vae/diffusion_pytorch_model.safetensors": 2000,
          "transformer_2/diffusion_pytorch_model.safetensors": 1500,
          "transformer/diffusion_pytorch_model-00001-of-00002.safetensors": 5000,
          "transformer/diffusion_pytorch_model-00002-of-00002.safetensors": 4000,
          "tokenizer/spiece.model": 700, "model_index.json": 50}


def test_reads_every_weight_file_in_load_order(tmp_path, monkeypatch):
    monkeypatch.setattr(prefetch, "CHUNK", 1024)  # several reads per file
    root = fake_checkpoint(tmp_path / "ckpt", LAYOUT)
    files = [p.relative_to(root).as_posix() for p in prefetch.weight_files(root)]
    assert files == ["transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
                     "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
                     "transformer_2/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                     "text_encoder/model.safetensors"]  # the tokenizer and configs are not weights
    p = prefetch.start(str(root))
    assert prefetch.start(root) is p  # once per directory
    p._thread.join(10)
    r = p.report()
    assert r["files"] == 5 and r["state"] == "done" and p.done_bytes == 15500 == p.total
    assert prefetch.report() == {str(root.resolve()): r}


def test_official_layout_order(tmp_path):
    root = fake_checkpoint(tmp_path / "off", {"models_t5_umt5-xxl-enc-bf16.pth": 10, "Wan2.2_VAE.pth": 10,
                                              "diffusion_pytorch_model-00001-of-00003.safetensors": 10})
    assert [p.name for p in prefetch.weight_files(root)] == [
        "diffusion_pytorch_model-00001-of-00003.safetensors", "Wan2.2_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth"]


def test_skipped_when_off_or_short_of_memory(tmp_path, monkeypatch):
    root = fake_checkpoint(tmp_path / "ckpt", LAYOUT)
    monkeypatch.setenv("ARTIFEX_PREFETCH", "off")
    p = prefetch.start(root)
    assert p.report() == {"files": 5, "gib": 0.0, "skipped": "ARTIFEX_PREFETCH=off"} and p._thread is None
    monkeypatch.setattr(prefetch, "_CURRENT", [])
    monkeypatch.setenv("ARTIFEX_PREFETCH", "on")
    monkeypatch.setattr(prefetch, "mem_available", lambda: 3 * 2**30)  # under the 4 GiB margin alone
    r = prefetch.start(root).report()
    assert "3.0 GiB available" in r["skipped"] and "read_gib" not in r
    monkeypatch.setenv("ARTIFEX_PREFETCH", "sometimes")
    monkeypatch.setattr(prefetch, "_CURRENT", [])
    with pytest.raises(InvalidRequestError, match="ARTIFEX_PREFETCH.*allowed: on, off"):
        prefetch.start(root)


def test_nothing_for_what_is_not_a_local_directory(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"0" * 10)
    assert prefetch.start(None) is None and prefetch.start(f) is None
    assert prefetch.start("Wan-AI/Wan2.2-TI2V-5B-Diffusers") is None and prefetch.report() is None


def test_evict_keeps_the_files_readable(tmp_path):
    root = fake_checkpoint(tmp_path / "ckpt", LAYOUT)
    before = {p: p.read_bytes() for p in prefetch.weight_files(root)}
    assert prefetch.evict(root) == 15500
    assert {p: p.read_bytes() for p in prefetch.weight_files(root)} == before


@pytest.mark.slow
def test_generate_from_a_checkpoint_directory_reports_its_prefetch(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("tiny-ti2v")
    out = tmp_path / "clip.mp4"
    assert main(["generate", "--model", "tiny-ti2v", "--checkpoint", str(ckpt), "--prompt", "a kite",
                 "--size", "256x160", "--frames", "5", "--steps", "1", "--output", str(out)]) == 0
    side = json.loads(out.with_suffix(".json").read_text())
    r = side["prefetch"][str(ckpt.resolve())]
    assert r["files"] == len(prefetch.weight_files(ckpt)) and r["state"] in ("done", "stopped")
    assert 0 < r["read_gib"] <= r["gib"] or r["gib"] == 0.0
