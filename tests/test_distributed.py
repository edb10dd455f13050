"""Parallel layouts on real gloo processes: CFG-parallel, Ulysses and both give one process's latents.

Every worker loads the same tiny checkpoint through ``Engine.load`` (fp32, TF32 off) and
runs the real engine with the layout applied from outside; the reference is the same
engine in this process without any layout. Tolerance: relative L2 of the final latents
below 1e-5 (measured: 0 to ~1e-7 on CPU), and every rank of a run holds the same bits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from distributed_support import FP32, H4, register_test_specs, relative_l2, run_cases

from artifex.config import OptimizationConfig
from artifex.distributed.layout import ParallelLayout, layouts_for
from artifex.engine.pipeline import Engine
from artifex.engine.request import GenerationRequest
from artifex.engine.video import to_uint8_frames
from artifex.errors import InvalidRequestError
from artifex.models.registry import get_model

TOL = 1e-5
T2V = dict(prompt="a red kite over the beach at sunset", negative_prompt="blurry", seed=5, steps=3, frames=5,
           width=160, height=96)


def reference(model: str, request: dict, checkpoint=None, tmp_path=None):
    eng = Engine.load(model, checkpoint=checkpoint, config=OptimizationConfig(**FP32))
    return eng.generate(GenerationRequest(model=model, output=str(tmp_path / f"ref-{model}.mp4"), **request)).latents


def check_case(ranks: list[dict], ref: torch.Tensor) -> float:
    for r in ranks[1:]:
        assert torch.equal(r["latents"], ranks[0]["latents"]), "ranks disagree"
    assert ranks[0]["video"] is not None and all(r["video"] is None for r in ranks[1:]), "rank 0 alone writes"
    err = relative_l2(ranks[0]["latents"], ref)
    assert err < TOL, err
    return err


# -- layouts refused before anything runs --------------------------------------------------------
def test_ulysses_degree_must_divide_the_heads_and_lists_the_valid_degrees():
    with pytest.raises(InvalidRequestError) as e:
        ParallelLayout(1, 5).check(get_model("ti2v-5b"))
    assert e.value.field == "ulysses" and "24 attention heads" in str(e.value)
    assert e.value.allowed == "1, 2, 3, 4, 6, 8, 12, 24"
    with pytest.raises(InvalidRequestError) as e:
        ParallelLayout(2, 3).check(get_model("t2v-a14b"))
    assert e.value.allowed == "1, 2, 4, 5, 8, 10, 20, 40"
    assert ParallelLayout(2, 4).check(get_model("t2v-a14b"), world_size=8).world_size == 8


def test_other_invalid_layouts_are_refused_clearly():
    spec = get_model("t2v-a14b")
    with pytest.raises(InvalidRequestError, match=r"cfg: .*got 3 \(allowed: 1, 2\)"):
        ParallelLayout(3, 1).check(spec)
    with pytest.raises(InvalidRequestError) as e:
        ParallelLayout(2, 2).check(spec, world_size=8)
    assert e.value.field == "world_size" and "needs 4 processes, 8 were started" in str(e.value)
    assert e.value.allowed == "cfg 1 x ulysses 8, cfg 2 x ulysses 4" == ", ".join(layouts_for(8, 40))
    with pytest.raises(InvalidRequestError, match=r"nproc_per_node: 4 ranks on this node but only 2 CUDA"):
        ParallelLayout(2, 2).check(spec, world_size=4, devices=2)
    with pytest.raises(InvalidRequestError) as e:
        ParallelLayout(2, 1).check_request(spec, (1.0, 1.0), 832, 480, 81)
    assert e.value.field == "guidance" and "turns classifier-free guidance off" in str(e.value)
    assert "or cfg 1" in e.value.allowed
    warnings = ParallelLayout(2, 1).check_request(spec, (4.0, 1.0), 832, 480, 81)
    assert warnings and "without CFG" in warnings[0]
    with pytest.raises(InvalidRequestError, match="fewer than the 4 Ulysses ranks"):
        ParallelLayout(1, 4).check_request(get_model("tiny-ti2v"), (5.0,), 32, 32, 1)


# -- real processes ------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_cfg_parallel_and_ulysses_match_one_process(tmp_path, artifex_home, image_file):
    ti2v = dict(prompt="a cat walking on the beach", seed=9, steps=3, frames=5, image=str(image_file))
    partial_cfg = {**T2V, "guidance_low": 1.0}  # low-noise expert without CFG: rank 0 computes, broadcasts
    cases = [
        dict(model="tiny-t2v-moe", cfg=2, ulysses=1, request=T2V),
        dict(model="tiny-t2v-moe", cfg=1, ulysses=2, request=T2V),
        dict(model="tiny-ti2v", cfg=1, ulysses=2, request=ti2v),  # per-token timesteps are sharded too
        dict(model="tiny-t2v-moe", cfg=2, ulysses=1, request=partial_cfg),
    ]
    refs = [reference(c["model"], c["request"], tmp_path=tmp_path) for c in cases]
    results = run_cases(2, cases, tmp_path / "runs", artifex_home)
    errors = [check_case(r, ref) for r, ref in zip(results, refs)]
    print("relative L2 vs one process:", errors)
    assert [r[0]["shard"] for r in results] == [None, [60, 60], [40, 40], None]
    # each rank chose its attention kernel for the call it makes: one pass (CFG-parallel), 1 of 2 heads (Ulysses)
    assert [r[0]["attention_shape"][0::2] for r in results] == [[1, 2], [1, 1], [1, 1], [1, 2]]


@pytest.mark.slow
def test_four_processes_cfg2_x_ulysses2_and_ulysses4_match_one_process(tmp_path, artifex_home):
    from artifex.models.registry import MODELS
    from artifex.models.tiny import save_tiny_checkpoint

    register_test_specs()
    h4 = save_tiny_checkpoint(MODELS[H4], tmp_path / "h4")
    uneven = {**T2V, "width": 144, "height": 80}  # 2 x 5 x 9 = 90 tokens: slices of 23, 23, 22, 22
    cases = [
        dict(model="tiny-t2v-moe", cfg=2, ulysses=2, request=T2V),
        dict(model=H4, checkpoint=str(h4), cfg=1, ulysses=4, request=uneven),
        dict(model=H4, checkpoint=str(h4), cfg=2, ulysses=2, request=uneven),
    ]
    refs = [reference(c["model"], c["request"], c.get("checkpoint"), tmp_path) for c in cases]
    results = run_cases(4, cases, tmp_path / "runs", artifex_home)
    errors = [check_case(r, ref) for r, ref in zip(results, refs)]
    print("relative L2 vs one process:", errors)
    assert [r[0]["shard"] for r in results] == [[60, 60], [23, 23, 22, 22], [45, 45]]


def _mp4_frames(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


@pytest.mark.slow
def test_two_processes_split_the_vae_decode_and_rank_0_writes_the_one_process_video(tmp_path, artifex_home,
                                                                                   image_file):
    """Every rank decodes a band of each frame (``vae_split``); rank 0's mp4 has the frames of the one-process run,
    and its pixels are the one-process decode of the same latents (fp32: within 1e-5, as tests/test_vae_split.py).
    CFG-parallel gives the one-process latents bit for bit, so the mp4s can be compared frame for frame (H.264
    turns the ~1e-6 latent differences of a Ulysses run into visible ones)."""
    ti2v = dict(prompt="a cat walking on the beach", seed=9, steps=2, frames=5, image=str(image_file))
    cases = [
        dict(model="tiny-t2v-moe", cfg=2, ulysses=1, request=T2V, pixels=True),  # 12 latent rows: 6 + 6
        dict(model="tiny-ti2v", cfg=2, ulysses=1, request=ti2v, pixels=True),  # the Wan2.2 VAE, 10 rows: 5 + 5
        dict(model="tiny-t2v-moe", cfg=2, ulysses=1, request=T2V, split_vae_decode=False),  # rank 0 alone
    ]
    engines = {m: Engine.load(m, config=OptimizationConfig(**FP32)) for m in ("tiny-t2v-moe", "tiny-ti2v")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run: a CPU convolution's sums depend on the thread count
    try:
        refs = [engines[c["model"]].generate(GenerationRequest(model=c["model"], output=str(tmp_path / f"ref{i}.mp4"),
                                                               **c["request"])) for i, c in enumerate(cases)]
    finally:
        torch.set_num_threads(threads)
    results = run_cases(2, cases, tmp_path / "runs", artifex_home)
    for case, ranks, ref in zip(cases, results, refs):
        check_case(ranks, ref.latents)
        frames = _mp4_frames(ranks[0]["video"])
        assert frames.shape[0] == case["request"]["frames"]
        assert np.array_equal(frames, _mp4_frames(ref.video_path)), case
        split = case.get("split_vae_decode", True)
        assert ("decode" in ranks[1]["timings"]) == split  # the other rank took part in the decode, or did not
        if case.get("pixels"):
            assert ranks[1]["pixels"] == []  # only rank 0 receives the frames
            pixels = torch.cat(ranks[0]["pixels"], dim=2)
            torch.set_num_threads(1)  # the one-process decode as the ranks ran theirs
            try:
                whole = engines[case["model"]].decode(ranks[0]["latents"]).float()
            finally:
                torch.set_num_threads(threads)
            assert len(ranks[0]["pixels"]) == ranks[0]["latents"].shape[2]  # streamed per latent frame
            assert float((pixels - whole).abs().max()) <= 1e-5
            assert np.array_equal(to_uint8_frames(pixels), to_uint8_frames(whole))
        side = json.loads(Path(ranks[0]["video"]).with_suffix(".json").read_text())
        assert side["parallel"]["split_vae_decode"] is split


@pytest.mark.slow
def test_artifex_launch_runs_torchrun_and_rank_0_alone_writes_a_playable_mp4(tmp_path, artifex_home, tiny_checkpoint):
    tiny_checkpoint("tiny-t2v-moe")  # built once here, not by two ranks at the same time
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "artifex", "launch", "--cfg", "2", "--ulysses", "1", "--model", "tiny-t2v-moe",
           "--prompt", "a dog running in the snow", "--steps", "2", "--frames", "5", "--seed", "3",
           "--precision", "fp32", "--output-dir", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    videos = sorted(out.glob("*.mp4"))
    assert len(videos) == 1 and sorted(out.glob("*.json")) == [videos[0].with_suffix(".json")]
    assert p.stdout.strip().splitlines()[-1] == str(videos[0])
    with av.open(str(videos[0])) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
    assert len(frames) == 5 and frames[0].shape == (96, 160, 3)
    side = json.loads(videos[0].with_suffix(".json").read_text())
    assert side["parallel"] == {"cfg": 2, "ulysses": 1, "world_size": 2, "backend": "gloo", "writer_rank": 0,
                                "split_vae_decode": True}
    assert side["seed"] == 3


@pytest.mark.slow
def test_launch_refuses_a_bad_layout_before_starting_processes(tmp_path):
    cmd = [sys.executable, "-m", "artifex", "launch", "--ulysses", "3", "--model", "tiny-t2v-moe", "--prompt", "x"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "ulysses: Ulysses degree must divide tiny-t2v-moe's 2 attention heads" in p.stderr
    assert "(allowed: 1, 2)" in p.stderr and "torch.distributed.run" not in p.stderr


@pytest.mark.slow
def test_torchrun_module_needs_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "artifex.cli.launch", "--model", "tiny-t2v-moe", "--prompt", "x"]
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2 and "start this with torchrun" in p.stderr
