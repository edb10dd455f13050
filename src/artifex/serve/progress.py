"""Live progress of running jobs: stage, step, percent, ETA and cancel flags, in memory (the store keeps the rest).

The worker threads write it; the HTTP side (job views, server-sent events) reads it. Every update bumps a
per-job version that SSE listeners wait on.
"""

from __future__ import annotations

import threading
import time

# Share of a job's progress bar per stage (denoising takes the 5..90 span, step by step).
_STAGE_PERCENT = {"starting": 0, "load": 1, "encode_text": 2, "encode_image": 4, "denoise": 5, "decode": 92,
                  "write": 98, "done": 100}


class LiveProgress:
    """In-memory progress of running jobs, cancel flags, and a version per job that changes on every update."""

    def __init__(self):
        self._lock = threading.Lock()
        self._live: dict[str, dict] = {}
        self._versions: dict[str, int] = {}
        self._cancel: set[str] = set()
        self._post_s: dict[str, float] = {}  # model -> seconds of decode + write last time (for ETAs)

    def _bump(self, job_id: str) -> None:
        self._versions[job_id] = self._versions.get(job_id, 0) + 1

    def touch(self, job_id: str) -> None:
        """Tell listeners (SSE) that the stored job changed."""
        with self._lock:
            self._bump(job_id)

    def version(self, job_id: str) -> int:
        with self._lock:
            return self._versions.get(job_id, 0)

    def begin(self, job_id: str, model: str) -> None:
        with self._lock:
            now = time.monotonic()
            self._live[job_id] = {"model": model, "stage": "starting", "step": 0, "total": None, "percent": 0,
                                  "started": now, "denoise_start": None, "eta_s": None}
            self._bump(job_id)

    def update(self, job_id: str, stage: str, step: int, total: int) -> None:
        with self._lock:
            p = self._live.get(job_id)
            if p is None:
                return
            now = time.monotonic()
            if stage == "denoise" and p["denoise_start"] is None:
                p["denoise_start"] = now - 1e-6
            if stage in ("decode", "write") and p.get("post_start") is None:
                p["post_start"] = now
            p.update(stage=stage, step=step, total=total)
            if stage == "denoise" and total:
                p["percent"] = round(5 + 85 * step / total, 1)
                per_step = (now - p["denoise_start"]) / max(step, 1)
                p["eta_s"] = round(per_step * (total - step) + self._post_s.get(p["model"], 0.0), 2) if step else None
            else:
                p["percent"] = _STAGE_PERCENT.get(stage, p["percent"])
                if stage in ("decode", "write"):
                    p["eta_s"] = round(max(0.0, self._post_s.get(p["model"], 0.0) - (now - p["post_start"])), 2)
            if stage == "done" and p.get("post_start") is not None:
                self._post_s[p["model"]] = now - p["post_start"]
            self._bump(job_id)

    def end(self, job_id: str) -> None:
        with self._lock:
            self._live.pop(job_id, None)
            self._cancel.discard(job_id)
            self._bump(job_id)

    def get(self, job_id: str) -> dict | None:
        with self._lock:
            p = self._live.get(job_id)
            return dict(p) if p else None

    def request_cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancel.add(job_id)
            self._bump(job_id)

    def cancelled(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancel
