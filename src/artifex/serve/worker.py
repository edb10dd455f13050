"""Workers: one thread per engine, each loading it once, warming it up, then running jobs one at a time.

An engine lives where its executor puts it: in this process (``LocalExecutor``: one per
served model) or in a Ray actor (``artifex.distributed.ray_pool.RayExecutor``: one per GPU
group, several per model). Either way a ``ModelWorker`` thread drives it through a runner
with the same five methods (load, warm_up, run, health, restart) and a ``report`` (memory
and load) for the page and /metrics, pulls the oldest queued
job of its model whenever its engine is free, and writes the outcome to the job store. A
runner whose process died raises ``WorkerLost``: the attempt goes back to the store, which
queues the job again for another worker, and this worker brings up a fresh engine.

GPU work on one engine is serial; the HTTP side only reads the store and ``LiveProgress``.
Cancelling goes through the engine's own seam: the progress callback raises
``GenerationCancelled`` between steps and nothing is written.
"""

from __future__ import annotations

import logging
import os
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

ProgressFn = Callable[[str, int, int], None]  # (stage, step, total); may raise GenerationCancelled

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


class WorkerLost(Exception):
    """The process holding an engine is gone (a dead Ray actor, a lost node): the job did nothing wrong."""


# -- what runs next to an engine (this process, or a Ray actor) ----------------------------------
def run_generation(engine, fields: dict, on_progress: ProgressFn) -> dict:
    """One job's request on a loaded engine -> its outcome, a plain dict (it crosses Ray unchanged).

    ``{"state": "succeeded", "video", "sidecar", "timings", "output_bytes"}``, ``{"state": "cancelled"}``
    or ``{"state": "failed", "error": {code, message, param}}``. Only the death of the process escapes.
    """
    from artifex.engine.request import GenerationRequest

    try:
        request = GenerationRequest.from_dict(fields)
        result = engine.generate(request, on_event=lambda e: on_progress(e.stage, e.step, e.total))
    except GenerationCancelled:
        return {"state": "cancelled"}
    except ArtifexError as e:
        return {"state": "failed", "error": {"code": "invalid_request" if isinstance(e, InvalidRequestError)
                                             else "generation_error", "message": str(e),
                                             "param": getattr(e, "field", None)}}
    except Exception as e:  # out of memory, a kernel error...: the job fails, the worker lives on
        log.exception("job failed")
        return {"state": "failed", "error": {"code": "internal_error", "message": f"{type(e).__name__}: {e}"}}
    files = [p for p in (result.video_path, result.sidecar_path) if p is not None]
    return {"state": "succeeded", "video": str(result.video_path), "sidecar": str(result.sidecar_path),
            "timings": dict(result.timings), "output_bytes": sum(p.stat().st_size for p in files if p.exists())}


def warm_up_engine(engine, folder: Path, shapes, should_stop: Callable[[], bool]) -> None:
    """One two-step generation per shape: first-call costs (compile, kernels) paid before ready."""
    from artifex.engine.request import GenerationRequest, resolve_request

    spec = engine.spec
    for width, height, frames in shapes or ((None, None, None),):
        image = None
        if spec.image == "required":
            image = str(_warmup_image(folder / f"{spec.name}.png", width or 832, height or 480))
        req = GenerationRequest(model=spec.name, prompt="warm-up", image=image, width=width, height=height,
                                frames=frames, steps=2, seed=0, output=str(folder / f"{spec.name}.mp4"))
        resolve_request(req)
        if should_stop():
            return
        result = engine.generate(req)
        log.debug("warm-up %s: %s", spec.name, result.timings, extra={"model": spec.name})
        for p in (result.video_path, result.sidecar_path):
            Path(p).unlink(missing_ok=True)


def process_report(devices: list[int]) -> dict:
    """Memory and load of this process: resident memory, the node's load average, and per GPU (of
    ``devices``, CUDA indices as this process sees them) allocated / reserved / used / total bytes."""
    out: dict = {"pid": os.getpid(), "rss_bytes": None, "loadavg_1m": round(os.getloadavg()[0], 2), "gpus": []}
    try:
        with open("/proc/self/statm") as f:
            out["rss_bytes"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    if devices:
        import torch

        for i in devices:
            free, total = torch.cuda.mem_get_info(i)
            g = {"index": i, "name": torch.cuda.get_device_name(i), "allocated_bytes": torch.cuda.memory_allocated(i),
                 "reserved_bytes": torch.cuda.memory_reserved(i), "used_bytes": total - free, "total_bytes": total,
                 "utilization_percent": None}
            try:
                g["utilization_percent"] = torch.cuda.utilization(i)
            except Exception:  # no NVML (pip install artifex[gpu])
                pass
            out["gpus"].append(g)
    return out


# -- the local executor: the engine in this process -----------------------------------------------
class LocalRunner:
    """An engine in the server's own process (what ``artifex serve`` does without ``--ray``)."""

    def __init__(self, model: str, settings: ServeSettings, config: OptimizationConfig):
        self.model, self.settings, self.config = model, settings, config
        self.engine = None
        self.devices: list[int] = []  # the CUDA device of the engine, if any
        self.identity = {"kind": "local", "node": os.uname().nodename, "pid": os.getpid(), "gpus": []}

    def load(self) -> float:
        from artifex.engine.pipeline import Engine

        t0 = time.perf_counter()
        with _LOAD_LOCK:
            self.engine = Engine.load(self.model, checkpoint=self.settings.checkpoints.get(self.model),
                                      config=self.config)
        if self.engine.device.type == "cuda":
            self.devices = [self.engine.device.index or 0]
            self.identity["gpus"] = [str(i) for i in self.devices]
        log.info("loaded %s; plan: %s", self.model, self.engine.plan.to_dict(), extra={"model": self.model})
        return time.perf_counter() - t0

    def warm_up(self, should_stop: Callable[[], bool]) -> float:
        t0 = time.perf_counter()
        with _LOAD_LOCK:
            warm_up_engine(self.engine, self.settings.data_dir / "warmup", self.settings.warmup_shapes, should_stop)
        return time.perf_counter() - t0

    def run(self, job_id: str, fields: dict, on_progress: ProgressFn) -> dict:
        return run_generation(self.engine, fields, on_progress)

    def health(self) -> dict:
        return process_report(self.devices)

    @property
    def report(self) -> dict:
        """Memory and load now (this process: cheap to read at any time)."""
        return process_report(self.devices)

    def restart(self) -> None:
        raise RuntimeError("an engine in the server's own process cannot be restarted")

    def close(self) -> None:
        self.engine = None


class LocalExecutor:
    """One engine per served model, in this process."""

    kind = "local"

    def runners(self, model: str, settings: ServeSettings, config: OptimizationConfig) -> list[LocalRunner]:
        return [LocalRunner(model, settings, config)]

    def info(self) -> dict:
        return {"kind": self.kind, "dashboard": None}

    def shutdown(self) -> None:
        pass


# -- the job loop, the same for every executor -----------------------------------------------------
class ModelWorker:
    """Brings up one engine (through its runner) and runs its model's queued jobs, oldest first, on its own thread."""

    HEALTH_EVERY_S = 5.0  # an idle worker checks its engine's process this often
    RESTART_TRIES = 5  # a worker whose process keeps dying during start-up gives up after this many tries

    def __init__(self, model: str, index: int, runner, settings: ServeSettings, store: JobStore, live: LiveProgress,
                 metrics: Metrics, on_finished: Callable[[Job, str], None],
                 others_alive: Callable[[], bool] = lambda: False):
        self.model, self.index, self.runner, self.settings = model, index, runner, settings
        self.store, self.live, self.metrics, self.on_finished = store, live, metrics, on_finished
        self.others_alive = others_alive
        self.status = "starting"  # starting, loading, warming, ready, restarting, failed
        self.error: str | None = None
        self.load_s: float | None = None
        self.warmup_s: float | None = None
        self.current: str | None = None
        self.jobs_done = 0
        self.restarts = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"artifex-worker-{model}-{index}", daemon=True)

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
        self.runner.close()

    def view(self) -> dict:
        """What /api/workers shows of this worker."""
        return {"model": self.model, "index": self.index, **self.runner.identity, "status": self.status,
                "error": self.error, "busy": self.current is not None, "current_job": self.current,
                "jobs_done": self.jobs_done, "restarts": self.restarts, "load_s": self.load_s,
                "warmup_s": self.warmup_s, "report": self.runner.report}

    def _run(self) -> None:
        tries = 0
        while not self._stop.is_set():
            try:
                self._bring_up()
            except WorkerLost as e:  # the process died while loading: try a fresh one, a few times
                tries += 1
                log.warning("worker %s/%d lost while starting (%s); try %d of %d", self.model, self.index, e, tries,
                            self.RESTART_TRIES, extra={"model": self.model})
                if tries < self.RESTART_TRIES:
                    self._replace()
                    self._wake.wait(min(10.0, 0.5 * 2**tries))
                    continue
                self._fail(str(e))
                return
            except Exception as e:  # a model that cannot load fails its jobs; it never leaves them stuck
                self._fail(str(e) if isinstance(e, ArtifexError) else f"{type(e).__name__}: {e}")
                return
            tries = 0
            if self._serve() == "lost" and not self._stop.is_set():
                self._replace()

    def _bring_up(self) -> None:
        self.status = "loading"
        log.info("loading %s (worker %d)", self.model, self.index, extra={"model": self.model})
        self.load_s = round(self.runner.load(), 3)
        log.info("loaded %s (worker %d) in %.2fs", self.model, self.index, self.load_s, extra={"model": self.model})
        if self.settings.warmup:
            self.status = "warming"
            self.warmup_s = round(self.runner.warm_up(self._stop.is_set), 3)
            log.info("warmed up %s (worker %d) in %.2fs", self.model, self.index, self.warmup_s,
                     extra={"model": self.model})
        self.runner.health()
        self.status = "ready"

    def _replace(self) -> None:
        self.status = "restarting"
        self.restarts += 1
        self.metrics.count_restart(self.model)
        self.runner.restart()

    def _fail(self, error: str) -> None:
        self.status = "failed"
        self.error = error
        log.error("model %s failed to load: %s", self.model, self.error, extra={"model": self.model})
        self.runner.close()  # a Ray actor that cannot load gives its GPUs back
        while not self._stop.is_set():
            if not self.others_alive():  # another worker of this model may still run its jobs
                failed = self.store.fail_queued(self.model, {"code": "model_unavailable",
                                                              "message": f"{self.model} failed to load: {error}"})
                for job_id in failed:
                    self.live.touch(job_id)
            self._wake.wait(0.5)
            self._wake.clear()

    def _serve(self) -> str:
        """Run jobs until told to stop ("stopped") or the engine's process is gone ("lost")."""
        checked = time.monotonic()
        while not self._stop.is_set():
            job = self.store.claim(self.model)
            if job is None:
                if time.monotonic() - checked > self.HEALTH_EVERY_S:
                    checked = time.monotonic()
                    try:
                        self.runner.health()
                    except WorkerLost as e:
                        log.warning("worker %s/%d failed its health check (%s); replacing it", self.model,
                                    self.index, e, extra={"model": self.model})
                        return "lost"
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            if not self._run_job(job):
                return "lost"
        return "stopped"

    # -- one job ----------------------------------------------------------------------------
    def _run_job(self, job: Job) -> bool:
        """Run one claimed job to a final state (or back to the queue). False when the engine's process died."""
        settings = self.settings
        self.current = job.id
        self.live.begin(job.id, job.model)
        if job.cancel_requested:
            self.live.request_cancel(job.id)
        extra = {"job_id": job.id, "model": job.model}
        log.info("job started (attempt %d, worker %d)", job.attempts, self.index, extra=extra)
        fields = dict(job.request)
        fields["image"] = str(settings.uploads_dir / job.image) if job.image else None
        fields["output"] = str(settings.outputs_dir / f"{job.id}.mp4")

        def on_progress(stage: str, step: int, total: int) -> None:
            if stage != "done" and (self._stop.is_set() or self.live.cancelled(job.id)):
                raise GenerationCancelled(f"job {job.id} stopped at {stage}")
            self.live.update(job.id, stage, step, total)

        final_state, timings, lost = "failed", None, False
        try:
            outcome = self.runner.run(job.id, fields, on_progress)
        except WorkerLost as e:
            lost = True
            final_state = self.store.retry(job.id, {"code": "worker_lost", "message": f"the worker died: {e}"},
                                           settings.max_attempts) or "failed"
            log.warning("worker %d died during the job (%s); the job is %s", self.index, e, final_state, extra=extra)
        else:
            final_state, timings = self._record(job, outcome, extra)
        finally:
            self.current = None
            self.live.end(job.id)
        if final_state != "queued":
            self.jobs_done += 1
            self.metrics.observe_job(job.model, final_state, timings)
            self.on_finished(job, final_state)
        return not lost

    def _record(self, job: Job, outcome: dict, extra: dict) -> tuple[str, dict | None]:
        """Write a run's outcome to the store: (final state, timings)."""
        state = outcome["state"]
        if state == "cancelled":
            if self.live.cancelled(job.id) or not self._stop.is_set():
                self.store.finish(job.id, "cancelled")
                log.info("job cancelled", extra=extra)
                return "cancelled", None
            self.store.requeue(job.id)  # the server is stopping: the job runs again after the restart
            log.info("job interrupted by shutdown; queued again", extra=extra)
            return "queued", None
        if state == "failed":
            self.store.finish(job.id, "failed", error=outcome["error"])
            log.warning("job failed: %s", outcome["error"]["message"], extra=extra)
            return "failed", None
        timings = dict(outcome["timings"])
        if job.started_at is not None:
            timings["queue_wait"] = round(job.started_at - job.created_at, 4)
        done = self.store.finish(job.id, "succeeded", timings=timings, output_bytes=outcome["output_bytes"])
        if done is None or done.state != "succeeded":  # deleted while it ran
            for p in (outcome["video"], outcome["sidecar"]):
                Path(p).unlink(missing_ok=True)
            return "failed", timings
        log.info("job succeeded in %.2fs", outcome["timings"]["total"], extra=extra)
        return "succeeded", timings


class ModelPool:
    """The workers of one served model; its status is the best of theirs (ready while one is)."""

    _ORDER = ("ready", "warming", "loading", "restarting", "starting", "failed")

    def __init__(self, model: str, workers: list[ModelWorker]):
        self.model, self.workers = model, workers

    @property
    def status(self) -> str:
        return min((w.status for w in self.workers), key=self._ORDER.index)

    @property
    def error(self) -> str | None:
        return next((w.error for w in self.workers if w.error), None) if self.status == "failed" else None

    @property
    def load_s(self) -> float | None:
        return max((w.load_s for w in self.workers if w.load_s is not None), default=None)

    @property
    def warmup_s(self) -> float | None:
        return max((w.warmup_s for w in self.workers if w.warmup_s is not None), default=None)

    def alive_besides(self, worker: ModelWorker) -> bool:
        return any(w is not worker and w.status != "failed" for w in self.workers)

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def wake(self) -> None:
        for w in self.workers:
            w.wake()

    def stop(self) -> None:
        for w in self.workers:
            w._stop.set()
            w._wake.set()
        for w in self.workers:
            w.stop()
