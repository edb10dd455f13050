"""Ray: a real local cluster started by scripts/start_ray_cluster.sh (``artifex cluster start --head``), CPU
actors and tiny models, shared by the tests of this module and always stopped with ``artifex cluster stop``;
``artifex serve --ray`` against it, with an actor killed mid-job; the executor shipping files as it does from
another node; bad input."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from serve_support import REPO, Server, frame_count, free_port

from artifex.errors import ArtifexError, InvalidRequestError

if not os.environ.get("CI"):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'artifex[ray]')")

SLOW = {"model": "tiny-t2v-moe", "size": "160x96", "frames": 17, "steps": 40, "shift": 1.0}
FAST = {"model": "tiny-t2v-moe", "size": "128x64", "frames": 9, "steps": 3}


def artifex(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "artifex", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint):
    """A one-node Ray cluster with 2 CPUs: (GCS address, dashboard port). Stopped at the end, whatever happens."""
    for name in ("tiny-t2v-moe", "tiny-ti2v"):
        tiny_checkpoint(name)  # built once here, before actors on both CPUs would race to build it
    temp = Path(tempfile.mkdtemp(prefix="axray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    port, dashboard = free_port(), free_port()
    try:
        # through the setup guide's script: no HOST:PORT, so it starts a head (artifex cluster start --head ...)
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        started = subprocess.run(["bash", str(REPO / "scripts" / "start_ray_cluster.sh"), "--port", str(port),
                                  "--dashboard-port", str(dashboard), "--num-cpus", "2", "--num-gpus", "0",
                                  "--temp-dir", str(temp)], capture_output=True, text=True, timeout=120, cwd=REPO,
                                 env={**os.environ, "PATH": path, "OMP_NUM_THREADS": "1"})
        out = started.stdout + started.stderr
        assert started.returncode == 0, out
        assert "artifex cluster: running " in started.stderr and " start --head --port=" in started.stderr
        address = re.search(r"--address='([^']+)'", out).group(1)
        assert address.endswith(f":{port}")
        _wait_for_status(address)
        yield address, dashboard
    finally:  # ray stop ends every Ray process of this user on this machine: there is no per-cluster stop
        stopped = artifex("cluster", "stop")
        shutil.rmtree(temp, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert "running " in stopped.stderr and " stop" in stopped.stderr


def _wait_for_status(address: str, tries: int = 30) -> None:
    """Ray reports 'No cluster status' for a few seconds after start: wait until its status lists resources."""
    from artifex.ray.cluster import auth_env, ray_executable

    env, _ = auth_env()
    for _ in range(tries):
        r = subprocess.run([str(ray_executable()), "status", f"--address={address}"], capture_output=True, text=True,
                           timeout=60, env=env)
        if r.returncode == 0 and "CPU" in r.stdout:
            return
        time.sleep(1)
    raise TimeoutError(f"ray status never listed the cluster's resources: {r.stdout} {r.stderr}")


@pytest.mark.slow
def test_cluster_status_shows_ray_status_and_the_dashboard(cluster):
    address, dashboard = cluster
    r = artifex("cluster", "status", "--address", address)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"status --address={address}" in r.stderr
    assert "0.0/2.0 CPU" in r.stdout  # ray status: the node's resources, nothing in use
    assert f"Ray dashboard: http://127.0.0.1:{dashboard}" in r.stdout


def _workers(srv: Server) -> dict:
    r = srv.get("/api/workers")
    assert r.status_code == 200, r.text
    return r.json()


def _wait(predicate, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(what)


@pytest.mark.slow
def test_serve_on_ray_actors_retries_the_job_of_a_killed_actor(cluster, tmp_path):
    address, dashboard = cluster
    srv = Server(tmp_path / "data", ["tiny-t2v-moe"], ["--ray", address, "--ray-workers", "2", "--no-auth",
                                                       "--max-steps", "100"])
    srv.start(timeout=180)
    try:
        view = _wait(lambda: (v := _workers(srv)) and all(w["status"] == "ready" for w in v["workers"]) and v,
                     "both actors ready")
        assert view["executor"]["kind"] == "ray" and view["executor"]["dashboard"] == f"http://127.0.0.1:{dashboard}"
        pids = {w["pid"] for w in view["workers"]}
        assert len(pids) == 2 and os.getpid() not in pids and srv.proc.pid not in pids
        assert all(w["kind"] == "ray" and w["report"]["rss_bytes"] > 0 for w in view["workers"])

        # two jobs run at the same time, one on each actor (data parallel), with progress from inside the actors
        first, second = srv.submit(**SLOW, prompt="first", seed=1), srv.submit(**SLOW, prompt="second", seed=2)

        def both_denoising():
            jobs = [srv.get(f"/api/jobs/{j['id']}").json() for j in (first, second)]
            return all(j["state"] == "running" and j["progress"]["stage"] == "denoise" and j["progress"]["step"] >= 2
                       for j in jobs) and jobs

        _wait(both_denoising, "both jobs denoising at once")
        busy = {w["current_job"]: w for w in _workers(srv)["workers"]}
        assert set(busy) == {first["id"], second["id"]}
        victim = busy[first["id"]]
        os.kill(victim["pid"], signal.SIGKILL)  # the actor's process dies mid-job

        done = srv.wait_job(first["id"], timeout=180)
        assert done["state"] == "succeeded" and done["attempts"] == 2 and done["error"] is None, done
        assert frame_count(srv.get(done["video_url"]).content, tmp_path) == (17, 160, 96)
        other = srv.wait_job(second["id"], timeout=180)
        assert other["state"] == "succeeded" and other["attempts"] == 1, other

        # the dead actor was replaced by a fresh one; nothing else restarted
        view = _wait(lambda: (v := _workers(srv)) and all(w["status"] == "ready" for w in v["workers"]) and v,
                     "the replacement actor ready")
        replaced = next(w for w in view["workers"] if w["index"] == victim["index"])
        assert replaced["restarts"] == 1 and replaced["pid"] != victim["pid"]
        assert sum(w["restarts"] for w in view["workers"]) == 1
        metrics = srv.get("/metrics").text
        assert 'artifex_worker_restarts_total{model="tiny-t2v-moe"} 1' in metrics
        assert f'dashboard="http://127.0.0.1:{dashboard}"' in metrics and 'kind="ray"' in metrics
        assert re.search(r'artifex_worker_rss_bytes\{model="tiny-t2v-moe",worker="1",node="[^"]+"\} \d', metrics)
        monitor = artifex("monitor", "--once", "--url", srv.url(""))
        assert monitor.returncode == 0, monitor.stderr
        assert f"engines: Ray actors (cluster {address}, dashboard http://127.0.0.1:{dashboard})" in monitor.stdout
        assert monitor.stdout.count("worker tiny-t2v-moe/") == 2

        # cancel reaches the actor between steps; quick jobs keep flowing
        slow = srv.submit(**SLOW, prompt="cancel me", seed=3)
        _wait(lambda: srv.get(f"/api/jobs/{slow['id']}").json()["progress"]["stage"] == "denoise", "denoising")
        assert srv.post(f"/api/jobs/{slow['id']}/cancel").status_code == 202
        quick = [srv.submit(**FAST, prompt=f"quick {i}") for i in range(3)]
        assert srv.wait_job(slow["id"])["state"] == "cancelled"
        assert not (srv.data_dir / "outputs" / f"{slow['id']}.mp4").exists()
        for job in quick:
            job = srv.wait_job(job["id"])
            assert job["state"] == "succeeded", job
            assert frame_count(srv.get(job["video_url"]).content, tmp_path) == (9, 128, 64)
        assert srv.get("/readyz").json()["models"]["tiny-t2v-moe"]["workers"] == ["ready", "ready"]
    finally:
        srv.stop()


@pytest.mark.slow
def test_executor_ships_inputs_and_outputs_as_for_another_node(cluster, tmp_path, image_file, monkeypatch):
    """ship_outputs=True: the image goes to the actor as bytes, the mp4 and sidecar come back as bytes and the
    server writes them, exactly what happens when the actor runs on another node."""
    import ray

    from artifex.config import OptimizationConfig
    from artifex.errors import GenerationCancelled
    from artifex.ray.executor import RayPool as RayExecutor
    from artifex.serve.settings import ServeSettings
    from artifex.serve.worker import WorkerLost, run_job

    address, dashboard = cluster
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # start() may set it (a token here); undone afterwards
    executor = RayExecutor(address, workers=1, ship_outputs=True)
    executor.start(["tiny-ti2v"])
    try:
        assert executor.info()["dashboard"] == f"http://127.0.0.1:{dashboard}" and executor.gpus_per_worker == 0
        settings = ServeSettings(models=("tiny-ti2v",), data_dir=tmp_path / "data")
        settings.outputs_dir.mkdir(parents=True)
        (runner,) = executor.executors("tiny-ti2v")
        assert runner.load("tiny-ti2v", config=OptimizationConfig()) > 0 and runner.identity["pid"] != os.getpid()
        events = []
        output = settings.outputs_dir / "job.mp4"
        outcome = run_job(runner, {"model": "tiny-ti2v", "prompt": "shipped", "image": str(image_file),
                                     "width": 64, "height": 64, "frames": 5, "steps": 2, "seed": 0,
                                     "output": str(output)}, lambda *e: events.append(e))
        assert outcome["state"] == "succeeded", outcome
        assert outcome["video"] == str(output) and frame_count(output.read_bytes(), tmp_path) == (5, 64, 64)
        assert output.with_suffix(".json").is_file()
        assert ("encode_image", 0, 1) in events and ("denoise", 2, 2) in events and events[-1][0] == "done"
        assert runner.health()["pid"] == runner.identity["pid"]

        # a cancel seen only once the actor is past its last check (the "write" event): cancelled, and no files
        def cancel_at_write(stage, step, total):
            if stage == "write":
                raise GenerationCancelled("asked after the video was written")

        for ship in (True, False):
            runner.ship, late = ship, settings.outputs_dir / f"late-{ship}.mp4"
            outcome = run_job(runner, {"model": "tiny-ti2v", "prompt": "late", "image": str(image_file),
                                         "width": 64, "height": 64, "frames": 5, "steps": 2, "seed": 1,
                                         "output": str(late)}, cancel_at_write)
            assert outcome == {"state": "cancelled"}
            assert not late.exists() and not late.with_suffix(".json").exists()
        ray.kill(runner.actor, no_restart=True)  # asynchronous: a call sent just before it lands may still answer
        with pytest.raises(WorkerLost):
            for _ in range(300):
                runner.health()
                time.sleep(0.1)
        runner.close()
    finally:
        executor.shutdown()


def test_the_actor_writes_shipped_inputs_and_points_the_request_at_them(tmp_path):
    """From another node, every file a request names (image, S2V's audio and pose video) arrives as bytes: the actor
    writes each into the request's own directory and the engine reads them there; nothing is left behind."""
    from types import SimpleNamespace

    from artifex.engine.request import GenerationRequest
    from artifex.ray.executor import SHIPPED_INPUTS, EngineActor

    seen = {}

    class Engine:
        def generate(self, request, on_event=None, output_dir=None):
            seen.update({f: Path(getattr(request, f)).read_bytes() for f in SHIPPED_INPUTS})
            seen["dir"] = Path(request.audio).parent
            video = Path(request.output)
            video.write_bytes(b"mp4")
            return SimpleNamespace(video_path=video, sidecar_path=None)

    actor = EngineActor(0)
    actor.local = Engine()
    elsewhere = "/on/the/callers/node"
    request = GenerationRequest(model="tiny-s2v", prompt="x", image=f"{elsewhere}/same.bin",
                                audio=f"{elsewhere}/same.bin", pose_video=f"{elsewhere}/p.mp4",
                                output=f"{elsewhere}/out.mp4")
    out = actor.generate("call", request, None, {"image": ("same.bin", b"I"), "audio": ("same.bin", b"A"),
                                                 "pose_video": ("p.mp4", b"P")}, True)
    assert {k: seen[k] for k in SHIPPED_INPUTS} == {"image": b"I", "audio": b"A", "pose_video": b"P"}
    assert out["files"] == {"video": b"mp4"} and not seen["dir"].exists()


def test_bad_ray_input_is_named():
    from artifex.ray.executor import RayPool as RayExecutor
    from artifex.ray.executor import check_address

    with pytest.raises(InvalidRequestError, match=r"cannot reach a Ray cluster at 127\.0\.0\.1:\d+"):
        check_address(f"127.0.0.1:{free_port()}")
    with pytest.raises(InvalidRequestError, match="not a cluster address"):
        check_address("localhost")
    with pytest.raises(InvalidRequestError, match="Ray Client addresses are not supported"):
        check_address("ray://head:10001")
    two_gpu_nodes = [{"CPU": 16, "GPU": 2}, {"CPU": 16, "GPU": 1}]
    with pytest.raises(InvalidRequestError, match=r"ray_gpus_per_worker: a group of 2 GPU\(s\) is larger than the "
                                                  r"GPUs of any node \(the largest has 1\)"):
        RayExecutor(gpus_per_worker=2)._plan(["ti2v-5b"], [{"CPU": 8, "GPU": 1}])
    with pytest.raises(InvalidRequestError, match=r"ray_workers: 3 worker\(s\) x 1 model\(s\) need 3 groups of 2"):
        RayExecutor(workers=3, gpus_per_worker=2)._plan(["ti2v-5b"], two_gpu_nodes)
    plan = RayExecutor()
    plan._plan(["ti2v-5b", "t2v-a14b"], two_gpu_nodes + [{"CPU": 8, "GPU": 1}])  # 4 GPUs, 2 models: 2 actors each
    assert (plan.gpus_per_worker, plan.workers) == (1, 2)
    cpu = RayExecutor()
    cpu._plan(["tiny-ti2v"], [{"CPU": 2}])
    assert (cpu.gpus_per_worker, cpu.workers) == (0, 1)


@pytest.mark.slow
def test_without_ray_artifex_runs_and_the_ray_commands_say_how_to_install_it(tmp_path, monkeypatch):
    """Ray made unimportable: artifex still imports and starts; --ray and the cluster commands name the extra."""
    code = ("import sys; sys.modules['ray'] = None\n"
            "from artifex.cli import main\n"
            "sys.exit(main(sys.argv[1:]))")
    serve = subprocess.run([sys.executable, "-c", code, "serve", "--model", "tiny-ti2v", "--no-auth", "--ray", "auto",
                            "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert serve.returncode == 2 and "pip install 'artifex[ray]'" in serve.stderr, serve.stderr

    from artifex.ray.cluster import import_ray, ray_executable

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ArtifexError, match=r"Ray is not installed .*pip install 'artifex\[ray\]'"):
        import_ray()
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))  # no ray command beside this python
    with pytest.raises(ArtifexError, match=r"pip install 'artifex\[ray\]'"):
        ray_executable()
