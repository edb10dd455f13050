"""Workers: one thread per executor, each loading its engine once, warming it up, then running jobs one at a time.

An engine lives where its executor puts it (``artifex.engine.executor``): in this process
(``LocalExecutor``), in ranks this server started (``WorldExecutor``: a multi-GPU layout),
or in a Ray actor (``artifex.ray.RayExecutor``: one per GPU group, several per model). A
``ModelWorker`` thread drives one executor through the same methods (load, warm_up,
generate, health, restart), pulls the oldest queued job of its model whenever its engine
is free, and writes the outcome to the job store. An executor whose process died raises
``ExecutorLost``: the attempt goes back to the store, which queues the job again for another
worker, and this worker brings up a fresh engine.

GPU work on one engine is serial; the HTTP side only reads the store and ``LiveProgress``.
Cancelling goes through the engine's own seam: the progress callback raises
``GenerationCancelled`` between steps and nothing is written.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from artifex.config import OptimizationConfig
from artifex.engine.executor import Executor, ExecutorLost, describe_error
from artifex.errors import ArtifexError, GenerationCancelled
from artifex.serve.jobs import Job, JobStore
from artifex.serve.metrics import Metrics
from artifex.serve.progress import LiveProgress
from artifex.serve.settings import DEFAULT_LORA_SET, ServeSettings

ProgressFn = Callable[[str, int, int], None]  # (stage, step, total); may raise GenerationCancelled
WorkerLost = ExecutorLost  # the name the job loop has always used

log = logging.getLogger("artifex.serve")


def run_job(executor: Executor, fields: dict, on_progress: ProgressFn) -> dict:
    """One job's request on a loaded executor -> its outcome, a plain dict.

    ``{"state": "succeeded", "video", "sidecar", "timings", "output_bytes"}``, ``{"state": "cancelled"}``
    or ``{"state": "failed", "error": {code, message, param}}``. Only ``ExecutorLost`` escapes.
    """
    from artifex.engine.request import GenerationRequest

    try:
        request = GenerationRequest.from_dict(fields)
        result = executor.generate(request, on_event=lambda e: on_progress(e.stage, e.step, e.total))
    except GenerationCancelled:
        return {"state": "cancelled"}
    except ExecutorLost:
        raise
    except Exception as e:  # out of memory, a kernel error...: the job fails, the worker lives on
        if not isinstance(e, ArtifexError):
            log.exception("job failed")
        return {"state": "failed", "error": describe_error(e)}
    files = [p for p in (result.video_path, result.sidecar_path) if p is not None]
    text_cache = ((getattr(result, "sidecar", None) or {}).get("text_cache") or {}).get("hit")
    return {"state": "succeeded", "video": str(result.video_path), "sidecar": str(result.sidecar_path),
            "timings": dict(result.timings), "output_bytes": sum(p.stat().st_size for p in files if p.exists()),
            "text_cache": text_cache}


def request_fields(job: Job, settings: ServeSettings) -> dict:
    """A stored job -> the fields of its ``GenerationRequest`` (``lora`` still among them): the stored request plus
    the server's paths of its uploads (image, audio, pose video) and of its mp4."""
    fields = dict(job.request)
    for key in ("image", "audio", "pose_video"):
        name = getattr(job, key)
        fields[key] = str(settings.uploads_dir / name) if name else None
    fields["output"] = str(settings.outputs_dir / f"{job.id}.mp4")
    return fields


class ModelWorker:
    """Brings up one engine (through its executor) and runs its model's queued jobs, oldest first, on its own thread."""

    HEALTH_EVERY_S = 5.0  # an idle worker checks its engine's process this often
    RESTART_TRIES = 5  # a worker whose process keeps dying during start-up gives up after this many tries

    def __init__(self, model: str, index: int, executor: Executor, settings: ServeSettings,
                 config: OptimizationConfig, store: JobStore, live: LiveProgress, metrics: Metrics,
                 on_finished: Callable[[Job, str], None], others_alive: Callable[[], bool] = lambda: False):
        self.model, self.index, self.executor, self.settings, self.config = model, index, executor, settings, config
        self.store, self.live, self.metrics, self.on_finished = store, live, metrics, on_finished
        self.others_alive = others_alive
        self.status = "starting"  # starting, loading, warming, ready, restarting, failed
        self.error: str | None = None
        self.load_s: float | None = None
        self.imports_s: float | None = None  # the part of load_s that imported the libraries (None: not known)
        self.warmup_s: float | None = None
        self.current: str | None = None
        self.jobs_done = 0
        self.restarts = 0
        self.lora_set: str | None = None  # the LoRA set fused into the loaded engine; None: no engine loaded
        self.lora_switch_s: float | None = None  # what the last switch took
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
        self.executor.close()

    def view(self) -> dict:
        """What /api/workers shows of this worker."""
        return {"model": self.model, "index": self.index, **self.executor.identity, "status": self.status,
                "error": self.error, "busy": self.current is not None, "current_job": self.current,
                "jobs_done": self.jobs_done, "restarts": self.restarts, "load_s": self.load_s,
                "imports_s": self.imports_s,
                "warmup_s": self.warmup_s, "lora_set": self.lora_set, "lora_switch_s": self.lora_switch_s,
                "report": self.executor.report}

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
        self.lora_set = None
        log.info("loading %s (worker %d)", self.model, self.index, extra={"model": self.model})
        self.load_s = round(self.executor.load(self.model, checkpoint=self.settings.checkpoints.get(self.model),
                                               config=self.config), 3)
        self.imports_s = self.executor.imports_s
        self.lora_set = DEFAULT_LORA_SET
        log.info("loaded %s (worker %d) in %.2fs%s", self.model, self.index, self.load_s,
                 "" if self.imports_s is None else f" (imports {self.imports_s:.2f}s)", extra={"model": self.model})
        if self.settings.warmup:
            self.status = "warming"
            self.warmup_s = round(self.executor.warm_up(self.settings.warmup_shapes, self._stop.is_set), 3)
            log.info("warmed up %s (worker %d) in %.2fs", self.model, self.index, self.warmup_s,
                     extra={"model": self.model})
        self.executor.health()
        self.status = "ready"

    def _use_lora_set(self, name: str) -> float | None:
        """Make ``name`` the LoRA set fused into this worker's engine; the seconds the switch took (None: no switch).

        A switch loads the engine again from the checkpoint with the set's LoRAs fused at load (before fp8 and the
        q/k/v fusion, as at start-up): exact, where unfusing bf16 weights would leave rounding behind, and one copy
        of the weights in memory at a time (the old engine is freed first). Its cost is the load's."""
        if name == self.lora_set:
            return None
        specs = self.config.lora if name == DEFAULT_LORA_SET else self.settings.loras[name]
        log.info("switching %s (worker %d) to LoRA set %s: %s", self.model, self.index, name, specs or "none",
                 extra={"model": self.model})
        self.status = "switching"
        self.lora_set = None  # until the load succeeds: a failed switch leaves no engine behind
        t0 = time.perf_counter()
        try:
            self.executor.close()
            self.executor.load(self.model, checkpoint=self.settings.checkpoints.get(self.model),
                               config=self.config.merged({"lora": specs}))
        finally:
            self.status = "ready"
        self.lora_set = name
        self.lora_switch_s = round(time.perf_counter() - t0, 3)
        log.info("switched %s (worker %d) to LoRA set %s in %.2fs", self.model, self.index, name,
                 self.lora_switch_s, extra={"model": self.model})
        return self.lora_switch_s

    def _replace(self) -> None:
        self.status = "restarting"
        self.restarts += 1
        self.metrics.count_restart(self.model)
        self.executor.restart()

    def _fail(self, error: str) -> None:
        self.status = "failed"
        self.error = error
        log.error("model %s failed to load: %s", self.model, self.error, extra={"model": self.model})
        self.executor.close()  # a Ray actor that cannot load gives its GPUs back
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
                        self.executor.health()
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
        fields = request_fields(job, settings)
        lora_set = fields.pop("lora", None) or DEFAULT_LORA_SET

        def on_progress(stage: str, step: int, total: int) -> None:
            if stage != "done" and (self._stop.is_set() or self.live.cancelled(job.id)):
                raise GenerationCancelled(f"job {job.id} stopped at {stage}")
            self.live.update(job.id, stage, step, total)

        final_state, timings, lost = "failed", None, False
        try:
            try:
                switch_s = self._use_lora_set(lora_set)
            except WorkerLost:
                raise
            except Exception as e:  # the set's LoRA does not fit this model...: the job fails, the worker lives on
                outcome = {"state": "failed", "error": describe_error(e)}
            else:
                outcome = run_job(self.executor, fields, on_progress)
                if switch_s is not None and outcome["state"] == "succeeded":
                    outcome["timings"] = {**outcome["timings"], "lora_switch": switch_s}
        except WorkerLost as e:
            lost = True
            final_state = self.store.retry(job.id, {"code": "worker_lost", "message": f"the worker died: {e}"},
                                           settings.max_attempts) or "failed"
            log.warning("worker %d died during the job (%s); the job is %s", self.index, e, final_state, extra=extra)
        else:
            final_state, timings = self._record(job, outcome, extra)
            self.metrics.observe_text_cache(job.model, outcome.get("text_cache"))
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

    _ORDER = ("ready", "switching", "warming", "loading", "restarting", "starting", "failed")

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
    def imports_s(self) -> float | None:
        """The slowest-loading worker's imports (the part of ``load_s`` that imported the libraries)."""
        slowest = max((w for w in self.workers if w.load_s is not None), key=lambda w: w.load_s, default=None)
        return None if slowest is None else slowest.imports_s

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
