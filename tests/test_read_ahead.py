"""The read-ahead: a checkpoint's safetensors read on a thread while the libraries import, taken by the loader file by
file. On the CPU machine it reads to the CPU (``device=``), where the loader's device path reads too."""

from __future__ import annotations

import pytest
import torch

from artifex.config import OptimizationConfig
from artifex.errors import CheckpointError
from artifex.models import read_ahead
from artifex.models.loader import load_components
from artifex.models.registry import get_model

ROLES = ("transformer", "transformer_2", "vae", "text_encoder")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _no_read_ahead_left():
    yield
    read_ahead.finish()


def _state(c) -> dict[str, torch.Tensor]:
    models = {"text_encoder": c.text_encoder, "vae": c.vae} | {f"expert{i}": e for i, e in enumerate(c.experts)}
    return {f"{k}.{n}": t for k, m in models.items() for n, t in m.state_dict().items()}


def test_a_load_taking_the_read_ahead_gets_the_same_weights(tiny_checkpoint):
    """Every file is read once, by the thread; the loader takes them all and casts them as it casts what it reads:
    the same tensors, dtypes included (bf16 and the fp32-kept modules), as the plain load's."""
    spec = get_model("tiny-t2v-moe")
    path = tiny_checkpoint(spec.name)
    plain = _state(load_components(spec, path, "bf16"))
    ahead = read_ahead.start(path, OptimizationConfig(), device=CPU)
    assert ahead is not None and read_ahead.start(path, OptimizationConfig(), device=CPU) is ahead  # one at a time
    got = _state(load_components(spec, path, "bf16", devices={r: "cpu" for r in ROLES}))
    read_ahead.finish()
    assert got.keys() == plain.keys()
    for k, t in plain.items():
        assert got[k].dtype == t.dtype, k
        assert torch.equal(got[k], t), k
    assert {torch.bfloat16, torch.float32} <= {t.dtype for t in got.values()}
    r = read_ahead.report()
    assert r["state"] == "done" and r["files"] == 4 and r["device"] == "cpu"
    assert r["taken_gib"] == r["read_gib"] == r["gib"] > 0 and r["dropped_gib"] == 0


def test_files_read_for_a_place_the_load_did_not_choose_are_dropped(tiny_checkpoint):
    """A load that reads elsewhere (here: the libraries' own readers, as for a tier's host homes) takes nothing;
    ``finish`` drops every file the thread read, and the weights are still the checkpoint's."""
    spec = get_model("tiny-ti2v")
    path = tiny_checkpoint(spec.name)
    plain = _state(load_components(spec, path, "bf16"))
    read_ahead.start(path, OptimizationConfig(), device=CPU)
    got = _state(load_components(spec, path, "bf16"))
    read_ahead.finish()
    assert all(torch.equal(got[k], t) for k, t in plain.items())
    r = read_ahead.report()
    assert r["taken_gib"] == 0 and r["dropped_gib"] == r["read_gib"] == r["gib"] > 0


def test_a_corrupt_file_is_left_to_the_loader_to_report(checkpoint_copy):
    """The thread fails on a truncated VAE file and holds nothing of it; the load reads it itself and raises the
    error it raises without a read-ahead."""
    spec = get_model("tiny-ti2v")
    path = checkpoint_copy(spec.name)
    vae = path / "vae" / "diffusion_pytorch_model.safetensors"
    vae.write_bytes(vae.read_bytes()[:-64])
    devices = {r: "cpu" for r in ROLES}
    with pytest.raises(CheckpointError) as without:
        load_components(spec, path, "bf16", devices=devices)
    read_ahead.start(path, OptimizationConfig(), device=CPU)._thread.join()  # it has met the file
    assert read_ahead.report()["state"] == "failed" and "vae" in read_ahead.report()["error"]
    with pytest.raises(CheckpointError) as with_it:
        load_components(spec, path, "bf16", devices=devices)
    read_ahead.finish()
    assert str(with_it.value) == str(without.value) and "diffusion_pytorch_model.safetensors" in str(without.value)


@pytest.mark.parametrize("fields, env, reason", [
    ({"vram_budget": "24GB"}, {}, "vram_budget"),
    ({"memory_tier": "model_offload"}, {}, "offload or swap"),
    ({"offload_to_cpu": True}, {}, "offload or swap"),
    ({"fp8_weights": True}, {}, "fp8_weights"),
    ({"device": "cpu"}, {}, "device cpu"),
    ({}, {"ARTIFEX_READ_AHEAD": "off"}, "ARTIFEX_READ_AHEAD=off"),
    ({}, {"ARTIFEX_FAST_READ": "off"}, "ARTIFEX_FAST_READ=off"),
])
def test_no_read_ahead_where_the_load_may_keep_weights_elsewhere(tiny_checkpoint, monkeypatch, fields, env, reason):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    path = tiny_checkpoint("tiny-ti2v")
    assert read_ahead.start(path, OptimizationConfig().merged(fields), device=CPU) is None
    assert reason in read_ahead.report()["reason"]


def test_no_read_ahead_without_a_local_diffusers_checkpoint(tmp_path):
    assert "not a local" in read_ahead.why_not(None, OptimizationConfig())
    assert "not a local" in read_ahead.why_not(tmp_path, OptimizationConfig())
    (tmp_path / "transformer").mkdir()
    assert read_ahead.why_not(tmp_path, OptimizationConfig()) is None
    assert "single-file" in read_ahead.why_not(tmp_path, OptimizationConfig(), {"vae": "x.safetensors"})


@pytest.mark.parametrize("value", ["0", "-2", "four", "1.5"])
def test_a_bad_reader_count_is_refused_by_name(tiny_checkpoint, monkeypatch, value):
    """ARTIFEX_READ_AHEAD_THREADS takes a positive integer; anything else fails the read-ahead (the load then reads
    everything itself), naming the variable and what it takes."""
    from artifex.env import positive_int
    from artifex.errors import InvalidRequestError

    monkeypatch.setenv("ARTIFEX_READ_AHEAD_THREADS", value)
    with pytest.raises(InvalidRequestError, match="ARTIFEX_READ_AHEAD_THREADS.*positive integer"):
        positive_int("ARTIFEX_READ_AHEAD_THREADS", 8)
    read_ahead.start(tiny_checkpoint("tiny-ti2v"), OptimizationConfig(), device=CPU)._thread.join()
    assert read_ahead.report()["state"] == "failed" and "ARTIFEX_READ_AHEAD_THREADS" in read_ahead.report()["error"]


def test_the_reader_count_is_read_from_the_environment(tiny_checkpoint, monkeypatch):
    from artifex.models import fast_read

    seen = []
    real = fast_read.read_safetensors
    monkeypatch.setattr(fast_read, "read_safetensors", lambda *a, **k: seen.append(k["threads"]) or real(*a, **k))
    monkeypatch.setenv("ARTIFEX_READ_AHEAD_THREADS", "3")
    read_ahead.start(tiny_checkpoint("tiny-ti2v"), OptimizationConfig(), device=CPU)._thread.join()
    assert seen and set(seen) == {3}


@pytest.mark.parametrize("flags, models, reads_ahead", [({}, ("tiny-ti2v",), True),
                                                        ({"layout": "2x1"}, ("tiny-ti2v",), False),
                                                        ({"ray": "auto"}, ("tiny-ti2v",), False),
                                                        ({}, ("tiny-ti2v", "tiny-t2v-moe"), False)])
def test_serve_reads_ahead_only_where_its_own_process_loads_its_one_model(tiny_checkpoint, monkeypatch, flags,
                                                                          models, reads_ahead):
    """A server whose engines load in other processes (a layout's ranks, Ray actors) or that serves several models
    starts no read-ahead: the weights would sit on a GPU that its ranks need, or be dropped by another load."""
    import argparse

    from artifex.cli.serve import start_reading
    from artifex.models import prefetch

    monkeypatch.setattr(prefetch, "start", lambda checkpoint: None)
    started = []
    monkeypatch.setattr(read_ahead, "start", lambda checkpoint, config: started.append(checkpoint))
    settings = argparse.Namespace(models=models, checkpoints={m: tiny_checkpoint(m) for m in models})
    start_reading(argparse.Namespace(**{"ray": None, "layout": None, **flags}), settings, OptimizationConfig())
    assert started == ([settings.checkpoints[models[0]]] if reads_ahead else [])
