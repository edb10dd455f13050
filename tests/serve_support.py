"""Helpers for the serve tests: a real ``artifex serve`` process on a free loopback port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``artifex serve`` (or the launch script) in a subprocess; its log goes to ``<data dir>/../serve-N.log``."""

    def __init__(self, data_dir: Path, models: list[str], args: list[str] | None = None, env: dict | None = None,
                 command: list[str] | None = None, token: str | None = None):
        self.data_dir, self.models, self.args = Path(data_dir), models, list(args or [])
        self.extra_env, self.command, self.token = env or {}, command, token
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.starts = 0
        self.log_path: Path | None = None

    # -- process -------------------------------------------------------------------------------
    def start(self, timeout: float = 150.0) -> Server:
        self.port = free_port()
        self.starts += 1
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-serve-{self.starts}.log"
        cmd = self.command or [sys.executable, "-m", "artifex", "serve"]
        cmd = [*cmd, "--port", str(self.port), "--data-dir", str(self.data_dir), *self.args]
        for m in self.models:
            cmd += ["--model", m]
        env = {**os.environ, **self.extra_env}
        env.setdefault("OMP_NUM_THREADS", "2")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.wait_ready(timeout)
        if self.token is None and (self.data_dir / "api_token").exists():
            self.token = (self.data_dir / "api_token").read_text().strip()
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = requests.get(self.url("/readyz"), timeout=2)
                if r.status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()}")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    # -- HTTP ----------------------------------------------------------------------------------
    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def headers(self, auth: bool = True) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if auth and self.token else {}

    def request(self, method: str, path: str, auth: bool = True, **kw) -> requests.Response:
        headers = {**self.headers(auth), **kw.pop("headers", {})}
        kw.setdefault("timeout", 30)
        return requests.request(method, self.url(path), headers=headers, **kw)

    def get(self, path: str, **kw) -> requests.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return self.request("POST", path, **kw)

    def submit(self, **fields) -> dict:
        r = self.post("/api/jobs", json=fields)
        assert r.status_code in (200, 201), r.text
        return r.json()

    def wait_job(self, job_id: str, states=("succeeded", "failed", "cancelled", "expired"), timeout: float = 120.0,
                 path: str = "/api/jobs/{}", key: str = "state") -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.get(path.format(job_id)).json()
            if job[key] in states:
                return job
            time.sleep(0.1)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout}s: {job}")

    def events(self, job_id: str, timeout: float = 120.0) -> list[tuple[str, dict]]:
        """Read the job's server-sent events until the stream ends: [(event, data), ...]."""
        out = []
        with self.get(f"/api/jobs/{job_id}/events", stream=True, timeout=timeout) as r:
            assert r.status_code == 200, r.text
            assert r.headers["content-type"].startswith("text/event-stream")
            name, data = None, []
            for line in r.iter_lines(decode_unicode=True):
                if line == "":
                    if data:
                        out.append((name or "message", json.loads("".join(data))))
                    name, data = None, []
                elif line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
        return out


def frame_count(data: bytes, tmp: Path) -> tuple[int, int, int]:
    """(frames, width, height) of an mp4, decoded with PyAV."""
    import av

    path = tmp / f"check-{time.monotonic_ns()}.mp4"
    path.write_bytes(data)
    with av.open(str(path)) as c:
        frames = list(c.decode(video=0))
    return len(frames), frames[0].width, frames[0].height
