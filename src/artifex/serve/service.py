"""The server's state and its operations, independent of HTTP: submit, view, cancel, delete, evict.

``Service`` owns the job store, the live progress, the metrics, the executor (engines in
this process, or Ray actors) and a ``ModelPool`` of workers per served model. The FastAPI
app (app.py) is a thin layer of routes over it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from pathlib import Path

from artifex.config import OptimizationConfig
from artifex.engine.executor import ExecutorPool, LocalPool
from artifex.engine.outputs import write_atomic
from artifex.engine.request import GenerationRequest, resolve_request
from artifex.errors import InvalidRequestError
from artifex.models.registry import get_model
from artifex.serve.inputs import ApiError, Submission, check_image
from artifex.serve.jobs import ACTIVE, Job, JobStore, QueueFull
from artifex.serve.metrics import Metrics
from artifex.serve.progress import LiveProgress
from artifex.serve.settings import DEFAULT_LORA_SET, ServeSettings
from artifex.serve.worker import ModelPool, ModelWorker

log = logging.getLogger("artifex.serve")


class Service:
    def __init__(self, settings: ServeSettings, config: OptimizationConfig, token: str | None,
                 pool: ExecutorPool | None = None):
        """``pool``: where engines run (default: this process, ``LocalPool``); a Ray or world pool must be started."""
        self.settings, self.config, self.token = settings, config, token
        self.pool = pool or LocalPool()
        self.started = time.time()
        for d in (settings.data_dir, settings.outputs_dir, settings.uploads_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(settings.db_path)
        self.live = LiveProgress()
        self.metrics = Metrics()
        self._upload_lock = threading.Lock()
        self.workers: dict[str, ModelPool] = {}
        for name in settings.models:
            spec = get_model(name)
            pool = ModelPool(spec.name, [])
            for i, executor in enumerate(self.pool.executors(spec.name)):
                pool.workers.append(ModelWorker(spec.name, i, executor, settings, config, self.store, self.live,
                                                self.metrics, self._job_finished, others_alive=_besides(pool, i)))
            self.workers[spec.name] = pool
        self.stopping = False

    # -- life ------------------------------------------------------------------------------
    def start(self) -> None:
        recovered = self.store.recover(self.settings.max_attempts)
        if any(recovered.values()):
            log.info("recovered jobs after a restart: %s", {k: len(v) for k, v in recovered.items()})
        self._sweep_files()
        self._evict()
        for w in self.workers.values():
            w.start()

    def stop(self) -> None:
        self.stopping = True
        for w in self.workers.values():
            w.stop()
        self.pool.shutdown()
        self.store.close()

    def _sweep_files(self) -> None:
        """Remove what a crash can leave behind: partial files, outputs and uploads no job refers to."""
        for p in self.settings.outputs_dir.glob(".*partial*"):
            p.unlink(missing_ok=True)
        active = self.store.active_images()
        for p in self.settings.uploads_dir.iterdir():
            if p.name not in active:
                p.unlink(missing_ok=True)

    # -- readiness -------------------------------------------------------------------------
    def models_status(self) -> dict[str, str]:
        return {name: w.status for name, w in self.workers.items()}

    def ready(self) -> bool:
        """Every model has a ready worker."""
        return all(w.status == "ready" for w in self.workers.values())

    def workers_view(self) -> dict:
        """Where the engines run and each worker's state, memory and load (/api/workers, the web page)."""
        return {"executor": self.pool.info(),
                "workers": [w.view() for pool in self.workers.values() for w in pool.workers]}

    # -- submission ------------------------------------------------------------------------
    def fps_of(self, model: str) -> int:
        return get_model(self._served(model)).fps

    def _served(self, model: str) -> str:
        key = model.strip().lower() if isinstance(model, str) else model
        if key not in self.workers:
            raise InvalidRequestError("model", f"{model!r} is not served here", list(self.workers))
        return key

    def submit(self, sub: Submission) -> tuple[Job, bool]:
        """Validate, store, queue. Returns (job, created); created is False for a de-duplicated request."""
        s = self.settings
        fields = dict(sub.fields)
        if "model" not in fields:
            raise InvalidRequestError("model", "is required", list(self.workers))
        if "prompt" not in fields:
            raise InvalidRequestError("prompt", "is required")
        fields["model"] = model = self._served(fields["model"])
        worker = self.workers[model]
        if worker.status == "failed":
            raise ApiError(503, "model_unavailable", f"model: {model} failed to load: {worker.error}", "model")
        for name in ("prompt", "negative_prompt"):
            text = fields.get(name)
            if isinstance(text, str) and len(text) > s.max_prompt_chars:
                raise InvalidRequestError(name, f"{len(text)} characters is too long", f"at most {s.max_prompt_chars}")
        image_field = "input_reference" if sub.api == "openai" else "image"
        image_name = image_sha = None
        if sub.image is not None:
            image_sha, ext = check_image(sub.image, s.max_upload_bytes, s.max_image_pixels, image_field)
            image_name = f"{image_sha}.{ext}"
        with self._upload_lock:
            image_path = None
            if image_name:
                image_path = s.uploads_dir / image_name
                if not image_path.exists():
                    write_atomic(image_path, sub.image)
            try:
                job, created = self._validate_and_store(fields, image_path, image_name, image_sha, sub.api,
                                                        image_field)
            finally:
                if image_path is not None and not self.store.image_in_use(image_name):
                    image_path.unlink(missing_ok=True)
        if created:
            worker.wake()
        return job, created

    def _validate_and_store(self, fields: dict, image_path: Path | None, image_name: str | None,
                            image_sha: str | None, api: str, image_field: str) -> tuple[Job, bool]:
        s = self.settings
        fields = dict(fields)
        lora_set = self.lora_set(fields.pop("lora", None))
        request = GenerationRequest.from_dict({**fields, "image": str(image_path) if image_path else None})
        try:
            spec, settings, _ = resolve_request(request, limits=s.request_limits())
        except InvalidRequestError as e:
            if e.field == "image" and image_field != "image":
                raise InvalidRequestError(image_field, str(e).split(": ", 1)[-1]) from None
            if e.field == "frames" and api == "openai":  # OpenAI requests give the length as seconds
                fps = get_model(fields["model"]).fps
                frames = fields.get("frames")
                length = f"{(frames - 1) / fps:g} s" if isinstance(frames, int) else "the preset's length"
                raise InvalidRequestError("seconds", f"{length} is over this server's limit",
                                          f"at most {(s.max_frames - 1) / fps:g}") from None
            raise
        stored = {k: v for k, v in request.to_dict().items() if k not in ("image", "output")}
        stored["seed"] = settings.seed  # a random seed is drawn once: a re-run after a crash makes the same video
        stored["lora"] = lora_set
        view = settings.to_dict()
        view["lora"] = lora_set
        view.pop("output", None)
        view.pop("warnings", None)
        view["image"] = image_sha
        dedup = None
        if fields.get("seed") is not None:  # only an explicit seed makes two requests the same video
            key = {"settings": {k: v for k, v in view.items() if k not in ("preset",)}, "config": self.config.hash(),
                   "checkpoint": s.checkpoints.get(spec.name)}
            dedup = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        try:
            job, created = self.store.submit(model=spec.name, request=stored, settings=view,
                                             warnings=settings.warnings, image=image_name, dedup_key=dedup, api=api,
                                             max_queue=s.max_queue)
        except QueueFull as e:
            self.metrics.count_submission("rejected_queue_full")
            retry = self.retry_after(e.depth)
            raise ApiError(429, "queue_full", f"the queue is full ({e.depth} jobs waiting); retry in about "
                                              f"{retry} s", None, headers={"Retry-After": str(retry)}) from None
        self.metrics.count_submission("accepted" if created else "deduplicated")
        if created:
            log.info("job queued", extra={"job_id": job.id, "model": job.model})
        return job, created

    def lora_set(self, name) -> str:
        """The LoRA set a request names (``lora``), checked against this server's; none named: "default"."""
        if name is None or name == DEFAULT_LORA_SET:
            return DEFAULT_LORA_SET
        if not isinstance(name, str) or name not in self.settings.loras:
            raise InvalidRequestError("lora", f"no LoRA set {name!r} on this server",
                                      [DEFAULT_LORA_SET, *self.settings.loras])
        return name

    # Seconds per job assumed for a model none of whose jobs has run yet (and no other model's either).
    UNMEASURED_JOB_S = 5.0

    def retry_after(self, depth: int | None = None) -> int:
        """Seconds until the queue has drained, from measured job times: per model, its queued jobs times the
        mean wall time of its recent jobs (the store's last ``RECENT_JOBS``, started to finished), over its
        workers that can run them; the models drain side by side, so the slowest sets it. ``depth`` is unused
        (the store is asked per model), kept for callers that pass the total."""
        queued = self.store.queued_by_model()
        means = {m: self.store.mean_recent_seconds(m) for m in self.workers}
        known = [v for v in means.values() if v]
        fallback = max(known) if known else self.UNMEASURED_JOB_S
        drain = 0.0
        for model, pool in self.workers.items():
            n = queued.get(model, 0)
            if not n:
                continue
            workers = sum(1 for w in pool.workers if w.status != "failed") or 1
            drain = max(drain, n * (means[model] or fallback) / workers)
        return int(min(3600, max(1, math.ceil(drain))))

    # -- one job -----------------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        job = self.store.get(job_id) if isinstance(job_id, str) and len(job_id) < 100 else None
        if job is None:
            raise ApiError(404, "job_not_found", f"job_id: no job {job_id!r}", "job_id")
        return job

    def cancel(self, job_id: str) -> Job:
        self.get(job_id)
        job = self.store.cancel(job_id)
        if job is None:
            raise ApiError(404, "job_not_found", f"job_id: no job {job_id!r}", "job_id")
        if job.state == "running":
            self.live.request_cancel(job_id)
        else:
            self.live.touch(job_id)
            if job.state == "cancelled":
                self._release_image(job)
        return job

    def delete(self, job_id: str) -> Job:
        job = self.store.delete(job_id)
        if job is None:
            raise ApiError(404, "job_not_found", f"job_id: no job {job_id!r}", "job_id")
        if job.state == "running":
            self.live.request_cancel(job_id)
        self._remove_outputs(job)
        self._release_image(job)
        self.live.touch(job_id)
        return job

    def video_path(self, job: Job) -> Path:
        if job.state == "expired":
            raise ApiError(410, "video_expired", "the video was removed to keep the data directory under its "
                                                 "disk cap (oldest first)", "job_id")
        if job.state != "succeeded":
            raise ApiError(409, "video_not_ready", f"the job is {job.state}; the video exists once it has "
                                                   "succeeded", "job_id", ["succeeded"])
        path = self.settings.outputs_dir / f"{job.id}.mp4"
        if not path.is_file():
            raise ApiError(410, "video_missing", "the video file is no longer in the data directory", "job_id")
        return path

    # -- views -------------------------------------------------------------------------------
    def progress(self, job: Job) -> tuple[dict, float | None, int | None]:
        """(progress, eta_s, queue_position) of a job."""
        if job.state == "running":
            live = self.live.get(job.id)
            if live:
                return ({"stage": live["stage"], "step": live["step"], "total": live["total"],
                         "percent": live["percent"]}, live["eta_s"], None)
            return {"stage": "starting", "step": 0, "total": job.settings.get("steps"), "percent": 0}, None, None
        if job.state == "queued":
            position = self.store.queue_position(job)
            mean = self.metrics.mean_job_seconds(job.model)
            eta = round(mean * (position + 1), 2) if mean else None
            return {"stage": "queued", "step": 0, "total": job.settings.get("steps"), "percent": 0}, eta, position
        if job.state in ("succeeded", "expired"):
            steps = job.settings.get("steps")
            return {"stage": "done", "step": steps, "total": steps, "percent": 100}, 0.0, None
        return {"stage": job.state, "step": None, "total": job.settings.get("steps"), "percent": None}, None, None

    def job_view(self, job: Job) -> dict:
        progress, eta, position = self.progress(job)
        settings = {k: v for k, v in job.settings.items() if k != "image"}
        return {
            "id": job.id, "object": "job", "model": job.model, "state": job.state,
            "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at,
            "expired_at": job.expired_at, "queue_position": position, "progress": progress, "eta_s": eta,
            "attempts": job.attempts, "cancel_requested": job.cancel_requested, "timings": job.timings,
            "error": job.error, "warnings": job.warnings, "settings": settings,
            "image_sha256": job.settings.get("image"), "api": job.api,
            "video_url": f"/api/jobs/{job.id}/video" if job.state == "succeeded" else None,
            "output_bytes": job.output_bytes or None,
        }

    def openai_view(self, job: Job) -> dict:
        progress, _, _ = self.progress(job)
        status = {"queued": "queued", "running": "in_progress", "succeeded": "completed", "expired": "completed",
                  "failed": "failed", "cancelled": "failed"}[job.state]
        error = None
        if job.state == "failed":
            error = {"code": (job.error or {}).get("code", "generation_error"),
                     "message": (job.error or {}).get("message", "the generation failed")}
        elif job.state == "cancelled":
            error = {"code": "cancelled", "message": "the job was cancelled"}
        st = job.settings
        return {
            "id": job.id, "object": "video", "model": job.model, "status": status,
            "progress": int(progress["percent"] or 0) if status != "failed" else 0,
            "created_at": int(job.created_at),
            "completed_at": int(job.finished_at) if job.finished_at and status == "completed" else None,
            "expires_at": int(job.expired_at) if job.expired_at else None,
            "prompt": st.get("prompt"), "size": f"{st.get('width')}x{st.get('height')}",
            "seconds": f"{(st.get('frames', 1) - 1) / st.get('fps', 1):g}", "quality": "standard",
            "remixed_from_video_id": None, "error": error,
        }

    # -- after a job -------------------------------------------------------------------------
    def _job_finished(self, job: Job, state: str) -> None:
        self._release_image(job)
        if state == "succeeded":
            self._evict(keep=job.id)
        self.live.touch(job.id)

    def _evict(self, keep: str | None = None) -> None:
        if not self.settings.max_disk:
            return
        for old in self.store.evict(self.settings.max_disk, keep=keep):
            self._remove_outputs(old)
            self.live.touch(old.id)
            log.info("evicted the video of %s (disk cap %d bytes)", old.id, self.settings.max_disk,
                     extra={"job_id": old.id})

    def _remove_outputs(self, job: Job) -> None:
        for suffix in (".mp4", ".json"):
            (self.settings.outputs_dir / f"{job.id}{suffix}").unlink(missing_ok=True)

    def _release_image(self, job: Job) -> None:
        if not job.image:
            return
        with self._upload_lock:
            if not self.store.image_in_use(job.image):
                (self.settings.uploads_dir / job.image).unlink(missing_ok=True)

    # -- metrics -----------------------------------------------------------------------------
    def render_metrics(self) -> str:
        return self.metrics.render(states=self.store.counts(), queue_depth=self.store.queue_depth(),
                                   max_queue=self.settings.max_queue, models=self.models_status(),
                                   stored_bytes=self.store.stored_bytes(), max_disk=self.settings.max_disk,
                                   uptime_s=time.time() - self.started, workers=self.workers_view())


def _besides(pool: ModelPool, index: int):
    """Whether a worker of ``pool`` other than number ``index`` may still run the model's jobs."""
    return lambda: pool.alive_besides(pool.workers[index])


__all__ = ["Service", "ACTIVE"]
