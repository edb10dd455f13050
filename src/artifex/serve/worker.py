"""One worker thread per served model: load the engine once, warm it up, then run jobs one at a time.

GPU work is serial, so a model's jobs never overlap; the HTTP side only reads the store
and ``LiveProgress``. Cancelling goes through the engine's own seam: the progress
callback raises ``GenerationCancelled`` between steps and nothing is written.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from artifex.config import OptimizationConfig
from artifex.errors import ArtifexError, GenerationCancelled, InvalidRequestError
from artifex.serve.jobs import Job, JobStore
from artifex.serve.metrics import Metrics
from artifex.serve.settings import ServeSettings

log = logging.getLogger("artifex.serve")

# Share of a job's progress bar per stage (denoising takes the 5..90 span, step by step).
# Loading is not thread-safe (accelerate's empty-weights context patches torch globally), and two
# warm-ups (compile) at once would only slow each other: models load and warm up one at a time.
_LOAD_LOCK = threading.Lock()

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


def _warmup_image(path: Path, width: int, height: int) -> Path:
    """A structured synthetic picture for warming up image-conditioned models."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // max(width, 1), y * 255 // max(height, 1), ((x // 16 + y // 16) % 2) * 180], -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


class ModelWorker:
    """Loads one model and runs its queued jobs, oldest first, on its own thread."""

    def __init__(self, model: str, settings: ServeSettings, config: OptimizationConfig, store: JobStore,
                 live: LiveProgress, metrics: Metrics, on_finished: Callable[[Job, str], None]):
        self.model, self.settings, self.config = model, settings, config
        self.store, self.live, self.metrics, self.on_finished = store, live, metrics, on_finished
        self.status = "starting"  # starting, loading, warming, ready, failed
        self.error: str | None = None
        self.engine = None
        self.load_s: float | None = None
        self.warmup_s: float | None = None
        self.current: str | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"artifex-worker-{model}", daemon=True)

    # -- life ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            with _LOAD_LOCK:
                self._load()
        except Exception as e:  # a model that cannot load fails its jobs; it never leaves them stuck
            self.status = "failed"
            self.error = str(e) if isinstance(e, ArtifexError) else f"{type(e).__name__}: {e}"
            log.error("model %s failed to load: %s", self.model, self.error, extra={"model": self.model})
            while not self._stop.is_set():
                failed = self.store.fail_queued(self.model, {"code": "model_unavailable",
                                                              "message": f"{self.model} failed to load: {self.error}"})
                for job_id in failed:
                    self.live.touch(job_id)
                self._wake.wait(0.5)
                self._wake.clear()
            return
        while not self._stop.is_set():
            job = self.store.claim(self.model)
            if job is None:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            self._run_job(job)

    def _load(self) -> None:
        from artifex.engine.pipeline import Engine

        self.status = "loading"
        t0 = time.perf_counter()
        log.info("loading %s", self.model, extra={"model": self.model})
        self.engine = Engine.load(self.model, checkpoint=self.settings.checkpoints.get(self.model), config=self.config)
        self.load_s = round(time.perf_counter() - t0, 3)
        log.info("loaded %s in %.2fs; plan: %s", self.model, self.load_s, self.engine.plan.to_dict(),
                 extra={"model": self.model})
        if self.settings.warmup:
            self.status = "warming"
            t0 = time.perf_counter()
            self._warm_up()
            self.warmup_s = round(time.perf_counter() - t0, 3)
            log.info("warmed up %s in %.2fs", self.model, self.warmup_s, extra={"model": self.model})
        self.status = "ready"

    def _warm_up(self) -> None:
        """One two-step generation per configured shape: first-call costs (compile, kernels) paid before ready."""
        from artifex.engine.request import GenerationRequest, resolve_request

        spec = self.engine.spec
        folder = self.settings.data_dir / "warmup"
        shapes = self.settings.warmup_shapes or ((None, None, None),)
        for width, height, frames in shapes:
            image = None
            if spec.image == "required":
                image = str(_warmup_image(folder / f"{self.model}.png", width or 832, height or 480))
            req = GenerationRequest(model=self.model, prompt="warm-up", image=image, width=width, height=height,
                                    frames=frames, steps=2, seed=0, output=str(folder / f"{self.model}.mp4"))
            resolve_request(req)
            if self._stop.is_set():
                return
            result = self.engine.generate(req)
            log.debug("warm-up %s: %s", self.model, result.timings, extra={"model": self.model})
            for p in (result.video_path, result.sidecar_path):
                Path(p).unlink(missing_ok=True)

    # -- one job ----------------------------------------------------------------------------
    def _run_job(self, job: Job) -> None:
        from artifex.engine.request import GenerationRequest

        settings = self.settings
        self.current = job.id
        self.live.begin(job.id, job.model)
        if job.cancel_requested:
            self.live.request_cancel(job.id)
        extra = {"job_id": job.id, "model": job.model}
        log.info("job started (attempt %d)", job.attempts, extra=extra)
        video = settings.outputs_dir / f"{job.id}.mp4"
        fields = dict(job.request)
        fields["image"] = str(settings.uploads_dir / job.image) if job.image else None
        fields["output"] = str(video)

        def on_event(e) -> None:
            if e.stage != "done" and (self._stop.is_set() or self.live.cancelled(job.id)):
                raise GenerationCancelled(f"job {job.id} stopped at {e.stage}")
            self.live.update(job.id, e.stage, e.step, e.total)

        final_state = "failed"
        timings = None
        try:
            request = GenerationRequest.from_dict(fields)
            result = self.engine.generate(request, on_event=on_event)
        except GenerationCancelled:
            if self.live.cancelled(job.id) or not self._stop.is_set():
                final_state = "cancelled"
                self.store.finish(job.id, "cancelled")
                log.info("job cancelled", extra=extra)
            else:  # the server is stopping: the job goes back to the queue and runs after the restart
                final_state = "queued"
                self.store.requeue(job.id)
                log.info("job interrupted by shutdown; queued again", extra=extra)
        except ArtifexError as e:
            error = {"code": "invalid_request" if isinstance(e, InvalidRequestError) else "generation_error",
                     "message": str(e), "param": getattr(e, "field", None)}
            self.store.finish(job.id, "failed", error=error)
            log.warning("job failed: %s", e, extra=extra)
        except Exception as e:  # out of memory, a kernel error...: the job fails, the worker lives on
            log.exception("job failed", extra=extra)
            self.store.finish(job.id, "failed", error={"code": "internal_error", "message": f"{type(e).__name__}: {e}"})
        else:
            size = sum(p.stat().st_size for p in (result.video_path, result.sidecar_path) if p.exists())
            timings = dict(result.timings)
            if job.started_at is not None:
                timings["queue_wait"] = round(job.started_at - job.created_at, 4)
            done = self.store.finish(job.id, "succeeded", timings=timings, output_bytes=size)
            if done is None or done.state != "succeeded":  # deleted while it ran
                for p in (result.video_path, result.sidecar_path):
                    p.unlink(missing_ok=True)
            else:
                final_state = "succeeded"
            log.info("job succeeded in %.2fs", result.timings["total"], extra=extra)
        finally:
            self.current = None
            self.live.end(job.id)
        if final_state != "queued":
            self.metrics.observe_job(job.model, final_state, timings)
            self.on_finished(job, final_state)
