"""The executor seam: the import rules, one Executor class every door uses, and the executors themselves (in this
process; a layout's ranks started by one executor, as ``artifex serve --layout`` runs them)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_support import FP32, relative_l2
from serve_support import REPO, Server

from artifex.config import OptimizationConfig
from artifex.engine.executor import Executor, ExecutorLost, LocalExecutor, RemoteError
from artifex.engine.pipeline import Engine
from artifex.engine.request import GenerationRequest
from artifex.errors import GenerationCancelled

SRC = REPO / "src"
T2V = dict(prompt="a red kite over the beach at sunset", negative_prompt="blurry", seed=5, steps=3, frames=5,
           width=160, height=96)


def test_no_cli_import_outside_the_cli_and_no_cycle_between_packages():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import check_imports
    finally:
        sys.path.pop(0)
    assert check_imports.check(SRC) == []
    # the rule can fail: a library module importing the CLI is found
    bad = SRC / "artifex" / "serve" / "_probe_bad_import.py"
    bad.write_text("from artifex.cli import main\n")
    try:
        problems = check_imports.check(SRC)
    finally:
        bad.unlink()
    assert any("outside the CLI: artifex/serve/_probe_bad_import.py" in p for p in problems)
    assert any(p.startswith("import cycle") and "artifex.cli" in p and "artifex.serve" in p for p in problems)


def test_one_executor_class_and_every_door_drives_one():
    classes = {}
    for path in (SRC / "artifex").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                classes.setdefault(node.name, []).append(path.relative_to(SRC).as_posix())
    assert classes["Executor"] == ["artifex/engine/executor.py"]
    from artifex.distributed.executor import DistributedExecutor
    from artifex.distributed.world import WorldExecutor
    from artifex.ray.executor import RayExecutor

    assert all(issubclass(c, Executor) for c in (LocalExecutor, DistributedExecutor, WorldExecutor, RayExecutor))
    doors = {"cli/generate.py": "LocalExecutor", "cli/launch.py": "DistributedExecutor",
             "serve/worker.py": "Executor", "bench/multigpu.py": "LocalExecutor"}
    for door, name in doors.items():
        assert name in (SRC / "artifex" / door).read_text(), door


@pytest.mark.slow
def test_a_refused_request_imports_neither_torch_nor_diffusers():
    code = ("import sys\nfrom artifex.cli import main\n"
            "rc = main(['generate', '--model', 'tiny-ti2v', '--prompt', 'x', '--frames', '80'])\n"
            "print(rc, sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert "frames: must be 4n+1" in p.stderr and "nearest valid: 77, 81" in p.stderr, p.stderr
    assert p.stdout.strip() == "2 []", p.stdout


def test_local_executor_runs_the_engine_it_holds(tmp_path):
    executor = LocalExecutor()
    with pytest.raises(ExecutorLost):
        executor.generate(GenerationRequest(model="tiny-t2v-moe", prompt="x"))
    assert executor.load("tiny-t2v-moe", config=OptimizationConfig(**FP32)) > 0
    events = []
    r = executor.generate(GenerationRequest(model="tiny-t2v-moe", output=str(tmp_path / "a.mp4"), **T2V),
                          on_event=events.append)
    assert r.video_path.exists() and r.sidecar["request"]["prompt"] == T2V["prompt"]
    assert [e.step for e in events if e.stage == "denoise"] == [1, 2, 3] and events[-1].stage == "done"
    assert executor.health()["pid"] == executor.identity["pid"]


@pytest.mark.slow
def test_world_executor_runs_a_layout_in_ranks_it_starts(tmp_path, artifex_home):
    """CFG-parallel over two gloo ranks started by the executor: the one-process latents, rank 0's mp4 here, the
    sidecar's layout; a cancel stops every rank at the same step and the ranks stay usable, one that comes after
    the mp4 was written removes it; a killed rank is
    ExecutorLost; a refused request is the engine's error."""
    from artifex.distributed.layout import ParallelLayout
    from artifex.distributed.world import WorldExecutor

    ref = Engine.load("tiny-t2v-moe", config=OptimizationConfig(**FP32)).generate(
        GenerationRequest(model="tiny-t2v-moe", output=str(tmp_path / "ref.mp4"), **T2V))
    executor = WorldExecutor(ParallelLayout(cfg=2, ulysses=1), backend="gloo")
    try:
        executor.load("tiny-t2v-moe", config=OptimizationConfig(**FP32))
        events = []
        r = executor.generate(GenerationRequest(model="tiny-t2v-moe", output=str(tmp_path / "w.mp4"), **T2V),
                              on_event=events.append)
        assert relative_l2(r.latents, ref.latents) < 1e-5
        assert Path(r.video_path) == tmp_path / "w.mp4" and r.video_path.exists()
        assert r.sidecar["parallel"]["cfg"] == 2 and r.sidecar["parallel"]["backend"] == "gloo"
        assert [e.step for e in events if e.stage == "denoise"] == [1, 2, 3]

        def stop_at_two(e):
            if e.stage == "denoise" and e.step == 2:
                raise GenerationCancelled("enough")

        with pytest.raises(GenerationCancelled):
            executor.generate(GenerationRequest(model="tiny-t2v-moe", output=str(tmp_path / "c.mp4"), **T2V),
                              on_event=stop_at_two)
        assert not (tmp_path / "c.mp4").exists()

        def stop_at_write(e):  # after every rank's last check: rank 0 wrote the files, which go
            if e.stage == "write":
                assert (tmp_path / "late.mp4").is_file()
                raise GenerationCancelled("asked after the video was written")

        with pytest.raises(GenerationCancelled, match="after its video was written"):
            executor.generate(GenerationRequest(model="tiny-t2v-moe", output=str(tmp_path / "late.mp4"), **T2V),
                              on_event=stop_at_write)
        assert not (tmp_path / "late.mp4").exists() and not (tmp_path / "late.json").exists()
        with pytest.raises(RemoteError, match="frames: must be 4n\\+1") as e:
            executor.generate(GenerationRequest(model="tiny-t2v-moe", **{**T2V, "frames": 6}))
        assert e.value.code == "invalid_request" and e.value.param == "frames"
        again = executor.generate(GenerationRequest(model="tiny-t2v-moe", output=str(tmp_path / "d.mp4"), **T2V))
        assert torch.equal(again.latents, r.latents)
        report = executor.health()
        assert len(report["ranks"]) == 2
        executor._procs[1].kill()
        with pytest.raises(ExecutorLost, match="rank"):
            executor.generate(GenerationRequest(model="tiny-t2v-moe", output=str(tmp_path / "e.mp4"), **T2V))
    finally:
        executor.close()


@pytest.mark.slow
def test_serve_runs_a_model_on_a_layout(tmp_path):
    """``artifex serve --layout 2x1``: a job over HTTP runs on the server's two ranks; /api/workers says where."""
    srv = Server(tmp_path / "data", ["tiny-t2v-moe"], args=["--no-auth", "--layout", "2x1", "--layout-backend",
                                                            "gloo", "--no-warmup", "--precision", "fp32"])
    srv.start()
    try:
        workers = srv.get("/api/workers").json()
        assert workers["executor"]["kind"] == "torch.distributed" and workers["executor"]["layout"] == "cfg 2 x ulysses 1"
        job = srv.submit(model="tiny-t2v-moe", prompt="a kite", width=160, height=96, frames=5, steps=2, seed=1)
        done = srv.wait_job(job["id"])
        assert done["state"] == "succeeded", done
        sidecar = json.loads((tmp_path / "data" / "outputs" / f"{job['id']}.json").read_text())
        assert sidecar["parallel"]["world_size"] == 2 and sidecar["parallel"]["writer_rank"] == 0
    finally:
        srv.stop()


@pytest.mark.slow
def test_a_layout_and_ray_together_are_refused(tmp_path):
    p = subprocess.run([sys.executable, "-m", "artifex", "serve", "--model", "tiny-t2v-moe", "--no-auth",
                        "--layout", "2x1", "--ray", "auto", "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 2 and "choose --layout or --ray" in p.stderr, p.stderr


def test_a_warm_up_decodes_only_its_first_latent_frames(tmp_path):
    """A warm-up request (what ``Executor.warm_up`` sends) runs text and denoise at its whole shape, then decodes
    and writes only WARM_UP_DECODE_FRAMES latent frames; the same request unmarked decodes every frame, with the
    same latents up to there."""
    from serve_support import frame_count

    from artifex.engine.executor import warm_up_requests
    from artifex.engine.pipeline import WARM_UP_DECODE_FRAMES

    req, = warm_up_requests("tiny-t2v-moe", False, tmp_path, [(160, 96, 21)])
    assert req.warm_up and req.to_dict()["warm_up"] is True
    executor = LocalExecutor()
    executor.load("tiny-t2v-moe", config=OptimizationConfig(**FP32))
    warm = executor.generate(req)
    full = executor.generate(GenerationRequest(**{**req.to_dict(), "warm_up": False,
                                                  "output": str(tmp_path / "full.mp4")}))
    assert "warm_up" not in full.sidecar["request"] and warm.sidecar["request"]["warm_up"] is True
    assert full.latents.shape[2] == 6 and warm.latents.shape[2] == WARM_UP_DECODE_FRAMES  # 21 frames: 6 latent
    assert torch.equal(warm.latents, full.latents[:, :, :WARM_UP_DECODE_FRAMES])
    assert frame_count(full.video_path.read_bytes(), tmp_path)[0] == 21
    assert frame_count(warm.video_path.read_bytes(), tmp_path)[0] == 1 + 4 * (WARM_UP_DECODE_FRAMES - 1)
