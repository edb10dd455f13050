"""``artifex submit``: one generation on a running ``artifex serve``, from the terminal.

The server has imported the libraries, loaded the model and warmed it up once; a job sent to it costs its stages
only (text, denoise, decode, write), where a fresh ``artifex generate`` process first pays its imports and its
load. This client imports neither torch nor the model libraries: it posts the request (``POST /api/jobs``, inputs
as base64 data: URLs), follows the job (``GET /api/jobs/{id}``) with a line per stage and every 10% of the
denoise, downloads the mp4 (``GET /api/jobs/{id}/video``) and prints its path. Ctrl-C asks the server to cancel
the job. Exit status: 0 with the video written, 1 when the job failed or was cancelled, 2 for a request the
server refused or a server that cannot be reached.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from artifex.errors import ArtifexError

FINAL = ("succeeded", "failed", "cancelled", "expired")


class ClientError(ArtifexError):
    """A request the server refused, or a server that cannot be reached (the message says which and why)."""


class Client:
    """The server at ``base`` (e.g. http://127.0.0.1:8000), with ``token`` (None: a server run with --no-auth)."""

    def __init__(self, base: str, token: str | None, timeout: float = 30.0):
        self.base, self.token, self.timeout = base.rstrip("/"), token, timeout

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes, dict]:
        """(status, body, headers) of one request; an HTTP error status is returned, not raised."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), dict(e.headers)
        except (urllib.error.URLError, OSError) as e:
            raise ClientError(f"cannot reach {self.base}: {getattr(e, 'reason', e)}") from None

    def json(self, method: str, path: str, body: dict | None = None, ok: tuple[int, ...] = (200,)) -> dict:
        status, raw, headers = self.request(method, path, body)
        if status not in ok:
            raise ClientError(refusal(status, raw, headers, f"{method} {path}"))
        return json.loads(raw)


def refusal(status: int, raw: bytes, headers: dict, what: str) -> str:
    """The server's own words for a refused request: its error message, the field at fault and what it allows."""
    if status == 401:
        return (f"{what}: 401 unauthorized: give the server's API token (ARTIFEX_API_TOKEN, --token-file, or "
                "--data-dir of a server on this machine)")
    try:
        err = json.loads(raw).get("error") or {}
    except (ValueError, AttributeError):
        err = {}
    message = err.get("message") or raw[:300].decode(errors="replace") or f"HTTP {status}"
    if err.get("allowed") and str(err["allowed"]) not in message:  # the server's message may already say them
        message += f" (allowed: {err['allowed']})"
    if status == 429 and headers.get("Retry-After"):
        message += f"; retry after {headers['Retry-After']} s"
    return f"{what}: {status}: {message}"


def data_url(path: Path, field: str) -> str:
    """A file as a base64 data: URL (its type from its name), the JSON form of an upload."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ClientError(f"{field}: cannot read {path}: {e.strerror or e}") from None
    kind = mimetypes.guess_type(str(path))[0] or "application/octet-stream"
    return f"data:{kind};base64,{base64.b64encode(raw).decode()}"


def progress_line(job: dict) -> str:
    p = job.get("progress") or {}
    where = p.get("stage") or job["state"]
    if p.get("total"):
        where += f" {p.get('step')}/{p['total']}"
    if job["state"] == "queued" and job.get("queue_position") is not None:
        where += f" (queue position {job['queue_position']})"
    return where


def follow(client: Client, job: dict, out=sys.stderr, poll_s: float = 0.5) -> dict:
    """Poll ``job`` until it ends, printing a line per stage and every 10% of the denoise; the final job."""
    t0, last = time.monotonic(), None
    while job["state"] not in FINAL:
        p = job.get("progress") or {}
        mark = (job["state"], p.get("stage"), int((p.get("percent") or 0) // 10) if p.get("stage") == "denoise"
                else None)
        if mark != last:
            print(f"[{time.monotonic() - t0:7.2f}s] {progress_line(job)}", file=out, flush=True)
            last = mark
        time.sleep(poll_s)
        job = client.json("GET", f"/api/jobs/{job['id']}")
    return job


def run(client: Client, body: dict, output: Path | None, output_dir: Path, wait: bool = True,
        out=sys.stderr) -> int:
    """Submit ``body``, follow the job, download its mp4 to ``output`` (default: ``output_dir``/<job id>.mp4) and
    print the path on stdout; with ``wait`` False only print the job's id."""
    t0 = time.monotonic()
    job = client.json("POST", "/api/jobs", body, ok=(200, 201))
    if job.get("deduplicated"):
        print(f"{job['id']}: an identical earlier request (same inputs, settings and seed): its result", file=out)
    else:
        print(f"{job['id']} queued on {client.base}", file=out)
    if not wait:
        print(job["id"])
        return 0
    try:
        job = follow(client, job, out)
    except KeyboardInterrupt:
        client.request("POST", f"/api/jobs/{job['id']}/cancel")
        print(f"interrupted: asked {client.base} to cancel {job['id']}", file=out)
        return 130
    if job["state"] != "succeeded":
        err = job.get("error") or {}
        print(f"{job['id']} {job['state']}: {err.get('message') or err or 'no error given'}", file=out)
        return 1
    path = output or output_dir / f"{job['id']}.mp4"
    status, raw, headers = client.request("GET", f"/api/jobs/{job['id']}/video")
    if status != 200:
        raise ClientError(refusal(status, raw, headers, f"GET /api/jobs/{job['id']}/video"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    t = job.get("timings") or {}
    stages = ", ".join(f"{k} {t[k]:.2f}s" for k in ("encode_text", "denoise", "decode", "write") if k in t)
    print(f"{job['id']} succeeded: {stages}; {time.monotonic() - t0:.2f}s from the request to the mp4 here",
          file=out)
    print(path)
    return 0


__all__ = ["Client", "ClientError", "data_url", "follow", "refusal", "run"]
