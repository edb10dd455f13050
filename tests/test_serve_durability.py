"""The job queue under stress: kill -9 mid-job and restart, 200 concurrent submissions against a
small queue bound, the disk cap, --no-auth rules; servers started as real processes (one of them
through scripts/launch_artifexpro.sh)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from serve_support import REPO, Server, frame_count

FAST = {"model": "tiny-t2v-moe", "size": "128x64", "frames": 9, "steps": 3}


@pytest.mark.slow
def test_kill_9_mid_job_then_restart_loses_nothing(tmp_path, artifex_home):
    token = "test-token-" + "k" * 32
    srv = Server(tmp_path / "data", ["tiny-t2v-moe"], ["--max-steps", "1000", "--no-warmup"],
                 env={"ARTIFEX_API_TOKEN": token}, token=token)
    srv.start()
    try:
        finished = srv.submit(**FAST, prompt="done before the crash", seed=7)
        finished = srv.wait_job(finished["id"])
        assert finished["state"] == "succeeded"
        before = srv.get(finished["video_url"]).content
        # no seed: the server draws one at submission and keeps it, so the re-run makes the same video
        slow = srv.submit(model="tiny-t2v-moe", prompt="interrupted by kill -9", size="160x96", frames=17, steps=400,
                          shift=1.0)
        queued = srv.submit(**FAST, prompt="queued behind it")
        cancelled = srv.submit(**FAST, prompt="cancelled while queued")
        assert srv.post(f"/api/jobs/{cancelled['id']}/cancel").json()["state"] == "cancelled"
        running = srv.wait_job(slow["id"], states=("running",))
        while not (running["progress"]["stage"] == "denoise" and running["progress"]["step"] >= 3):
            time.sleep(0.05)
            running = srv.get(f"/api/jobs/{slow['id']}").json()
            assert running["state"] == "running", running
        srv.kill9()
    finally:
        srv.stop()

    assert not (srv.data_dir / "api_token").exists()  # the token came from ARTIFEX_API_TOKEN
    srv.start()
    try:
        again = srv.get(f"/api/jobs/{finished['id']}").json()
        assert again["state"] == "succeeded" and srv.get(again["video_url"]).content == before
        assert srv.get(f"/api/jobs/{cancelled['id']}").json()["state"] == "cancelled"
        assert srv.get(f"/api/jobs/{queued['id']}").json()["state"] in ("queued", "running", "succeeded")
        rerun = srv.wait_job(slow["id"], timeout=180)
        assert rerun["state"] == "succeeded" and rerun["attempts"] == 2, rerun
        assert rerun["settings"]["seed"] == slow["settings"]["seed"]
        assert frame_count(srv.get(rerun["video_url"]).content, tmp_path) == (17, 160, 96)
        after = srv.wait_job(queued["id"])
        assert after["state"] == "succeeded" and after["attempts"] == 1
        assert frame_count(srv.get(after["video_url"]).content, tmp_path) == (9, 128, 64)
        jobs = srv.get("/api/jobs?limit=50").json()
        assert jobs["total"] == 4
        leftovers = [p.name for p in (srv.data_dir / "outputs").iterdir() if "partial" in p.name]
        assert leftovers == []
        log = srv.log()
        assert "recovered jobs after a restart" in log and "'requeued': 1" in log
    finally:
        srv.stop()


@pytest.mark.slow
def test_200_concurrent_submissions_queue_bound_and_disk_cap(tmp_path, artifex_home):
    """Through the launch script: the queue never holds more than --max-queue, every 429 carries
    Retry-After, every accepted job finishes, and the disk cap evicts the oldest videos first."""
    max_queue, cap = 6, 200_000
    srv = Server(tmp_path / "data", ["tiny-ti2v"], ["--max-queue", str(max_queue), "--max-disk", str(cap),
                                                    "--no-auth"],
                 command=["bash", str(REPO / "scripts" / "launch_artifexpro.sh")])
    srv.start()
    try:
        log = srv.log()
        assert '"level": "debug"' in log  # --debug from the launch script
        assert "expandable_segments:True" in log and "'TOKENIZERS_PARALLELISM': 'false'" in log
        for line in log.splitlines():
            if line.startswith("{"):
                json.loads(line)  # structured logs: one JSON object a line

        depths: list[int] = []
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                page = srv.get("/api/jobs?state=queued&limit=1", timeout=30).json()
                depths.append(page["total"])
                time.sleep(0.02)

        def submit(i: int) -> tuple[int, dict, dict]:
            r = srv.post("/api/jobs", json={"model": "tiny-ti2v", "prompt": f"clip number {i}", "steps": 2,
                                            "frames": 5}, timeout=60)
            return r.status_code, dict(r.headers), r.json()

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        with ThreadPoolExecutor(max_workers=40) as pool:
            results = list(pool.map(submit, range(200)))
        statuses = [s for s, _, _ in results]
        assert set(statuses) <= {201, 429}, set(statuses)
        accepted = [body["id"] for s, _, body in results if s == 201]
        rejected = [(h, body) for s, h, body in results if s == 429]
        assert len(accepted) >= max_queue and rejected
        for headers, body in rejected:
            assert int(headers["retry-after"]) >= 1
            assert body["error"]["code"] == "queue_full"

        deadline = time.monotonic() + 150
        final = {}
        while time.monotonic() < deadline and len(final) < len(accepted):
            for job_id in accepted:
                if job_id not in final:
                    job = srv.get(f"/api/jobs/{job_id}").json()
                    if job["state"] not in ("queued", "running"):
                        final[job_id] = job
            time.sleep(0.2)
        stop.set()
        poller.join(30)
        assert max(depths) <= max_queue and len(depths) > 10
        assert len(final) == len(accepted)  # every accepted job is accounted for
        assert {j["state"] for j in final.values()} <= {"succeeded", "expired"}, {j["state"] for j in final.values()}
        assert srv.get("/api/jobs?limit=1").json()["total"] == len(accepted)  # and nothing else was stored

        # the disk cap: kept videos fit it, the evicted ones are the oldest, and say so
        jobs = sorted(final.values(), key=lambda j: j["finished_at"])
        kept = [srv.get(f"/api/jobs/{j['id']}").json() for j in jobs]
        expired = [j for j in kept if j["state"] == "expired"]
        alive = [j for j in kept if j["state"] == "succeeded"]
        assert expired and alive, "the cap is small enough to evict and large enough to keep"
        assert max(j["finished_at"] for j in expired) <= min(j["finished_at"] for j in alive)
        assert sum(j["output_bytes"] for j in alive) <= cap or len(alive) == 1
        r = srv.get(f"/api/jobs/{expired[0]['id']}/video")
        assert r.status_code == 410 and r.json()["error"]["code"] == "video_expired"
        assert srv.get(f"/v1/videos/{expired[0]['id']}").json()["expires_at"] is not None
        assert frame_count(srv.get(f"/api/jobs/{alive[-1]['id']}/video").content, tmp_path)[0] == 5
        outputs = {p.stem for p in (srv.data_dir / "outputs").glob("*.mp4")}
        assert outputs == {j["id"] for j in alive}

        # without a token, only loopback names are answered (no DNS rebinding)
        r = requests.get(srv.url("/api/jobs"), headers={"Host": "attacker.example"}, timeout=10)
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    finally:
        srv.stop()


@pytest.mark.slow
def test_no_auth_is_refused_off_loopback_and_bad_settings_fail_fast(tmp_path):
    cases = [
        (["--host", "0.0.0.0", "--no-auth"], "no_auth: --no-auth is only allowed on a loopback address"),
        (["--max-queue", "0"], "max_queue: must be a positive integer"),
        (["--max-disk", "lots"], "max_disk: not a size"),
        (["--token-file", str(tmp_path / "nope")], "token_file:"),
    ]
    for args, message in cases:
        out = subprocess.run([sys.executable, "-m", "artifex", "serve", "--model", "tiny-ti2v", "--data-dir",
                              str(tmp_path / "d"), *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr


def test_store_retries_a_lost_attempt_then_gives_up_and_recover_does_the_same(tmp_path):
    """JobStore.retry (a worker died mid-job) and JobStore.recover (the server died): queued again in the old place
    while attempts are left, failed with the reason once they are spent, cancelled when that was asked."""
    from artifex.serve.jobs import JobStore

    store = JobStore(tmp_path / "jobs.db")

    def submit(prompt: str) -> str:
        job, _ = store.submit(model="tiny-ti2v", request={"prompt": prompt}, settings={}, warnings=[], image=None,
                              dedup_key=None, api="native", max_queue=10)
        return job.id

    lost = {"code": "worker_lost", "message": "the worker died"}
    first, second = submit("first"), submit("second")
    assert store.claim("tiny-ti2v").id == first
    assert store.retry(first, lost, max_attempts=2) == "queued"
    assert store.claim("tiny-ti2v").id == first  # its old place: before the second job
    assert store.retry(first, lost, max_attempts=2) == "failed"
    assert store.get(first).error == {"code": "worker_lost",
                                      "message": "the worker died (attempt 2 of 2; not trying again)"}
    assert store.retry(first, lost, max_attempts=2) is None  # not running any more
    assert store.claim("tiny-ti2v").id == second
    store.cancel(second)
    assert store.retry(second, lost, max_attempts=2) == "cancelled"

    third, fourth, fifth = submit("third"), submit("fourth"), submit("fifth")
    for _ in range(3):
        store.claim("tiny-ti2v")
    store.cancel(fifth)
    assert store.recover(max_attempts=1) == {"requeued": [], "cancelled": [fifth], "failed": [third, fourth]}
    assert store.get(third).error["code"] == "interrupted" and store.get(fifth).state == "cancelled"
    assert store.claim("tiny-ti2v") is None
    store.close()
