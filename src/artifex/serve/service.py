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
import os
import threading
import time
from pathlib import Path

from artifex.config import OptimizationConfig
from artifex.engine.executor import ExecutorPool, LocalPool
from artifex.engine.outputs import write_atomic
from artifex.engine.request import GenerationRequest, resolve_request
from artifex.errors import InvalidRequestError
from artifex.models.registry import get_model
from artifex.serve.inputs import (
    AUDIO_FORMATS,
    ApiError,
    CheckedMedia,
    Submission,
    check_audio,
    check_image,
    check_pose_video,
)
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
        active = self.store.active_uploads()  # images, audio, pose videos of queued and running jobs: kept
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
        """Validate, store, queue. Returns (job, created); created is False for a de-duplicated request.

        Uploads (image, audio, pose video) are decoded and checked first, then stored under their SHA-256 in the
        uploads directory, where they stay while a queued or running job names them (across restarts too)."""
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
        self._check_upload_fields(model, sub, image_field)
        names: dict[str, str] = {}  # column -> stored file name
        shas: dict[str, str] = {}
        if sub.image is not None:
            shas["image"], ext = check_image(sub.image, s.max_upload_bytes, s.max_image_pixels, image_field)
            names["image"] = f"{shas['image']}.{ext}"
        staged: dict[str, CheckedMedia] = {}
        try:
            if sub.audio is not None:
                staged["audio"] = check_audio(sub.audio, s.uploads_dir, s.max_media_bytes, s.max_audio_seconds)
            if sub.pose_video is not None:
                staged["pose_video"] = check_pose_video(sub.pose_video, s.uploads_dir, s.max_media_bytes,
                                                        s.max_image_pixels)
            for key, media in staged.items():
                shas[key], names[key] = media.sha256, media.name
            with self._upload_lock:
                paths = {key: s.uploads_dir / name for key, name in names.items()}
                try:
                    for key, path in paths.items():
                        if path.exists():
                            continue
                        if key in staged:
                            os.replace(staged[key].path, path)  # the checked bytes, under their stored name
                        else:
                            write_atomic(path, sub.image)
                    job, created = self._validate_and_store(fields, paths, shas, sub.api, image_field)
                finally:
                    for path in paths.values():
                        if not self.store.upload_in_use(path.name):
                            path.unlink(missing_ok=True)
        finally:
            for media in staged.values():
                media.path.unlink(missing_ok=True)
        if created:
            worker.wake()
        return job, created

    def _check_upload_fields(self, model: str, sub: Submission, image_field: str) -> None:
        """Before any upload is decoded: the uploads the model takes, and the ones it needs, are the ones given."""
        s = self.settings
        spec = get_model(model)
        takes_audio = spec.task == "s2v"
        if not takes_audio:
            for key, noun in (("audio", "audio"), ("pose_video", "pose video")):
                if getattr(sub, key) is not None:
                    others = [n for n in self.workers if get_model(n).task == "s2v"]
                    raise InvalidRequestError(key, f"{model} takes no {noun}; only speech-to-video (s2v) models do",
                                              f"models served here that do: {', '.join(others)}" if others else
                                              "none of the models served here takes one")
            return
        if spec.image == "required" and sub.image is None:
            raise InvalidRequestError(image_field, f"{model} animates a reference image: send it as the multipart "
                                                   f"file field '{image_field}' or a data:image/...;base64 URL")
        if sub.audio is None:
            raise InvalidRequestError("audio", f"{model} makes video from speech or other audio: send it as the "
                                               "multipart file field 'audio' or a data:audio/...;base64 URL; the "
                                               "video is as long as the audio (in clips of 5 s) unless frames or "
                                               "seconds say less",
                                      f"{AUDIO_FORMATS}; at most {s.max_media_bytes} bytes and "
                                      f"{s.max_audio_seconds} s")

    def _validate_and_store(self, fields: dict, uploads: dict[str, Path], shas: dict[str, str], api: str,
                            image_field: str) -> tuple[Job, bool]:
        """``uploads``: the stored files by request field (image, audio, pose_video); ``shas``: their SHA-256."""
        s = self.settings
        fields = dict(fields)
        lora_set = self.lora_set(fields.pop("lora", None))
        request = GenerationRequest.from_dict({**fields, **{k: str(p) for k, p in uploads.items()}})
        try:
            spec, settings, _ = resolve_request(request, limits=s.request_limits())
        except InvalidRequestError as e:
            e = _without_paths(e, uploads)
            if e.field == "image" and image_field != "image":
                raise InvalidRequestError(image_field, _message(e), e.allowed) from None
            if e.field == "frames" and api == "openai":  # OpenAI requests give the length as seconds
                fps = get_model(fields["model"]).fps
                frames = fields.get("frames")
                length = f"{(frames - 1) / fps:g} s" if isinstance(frames, int) else "the preset's length"
                spec = get_model(fields["model"])
                if spec.clip_frames and "over this server's limit" not in str(e):  # S2V: whole clips, in seconds
                    first, step = spec.clip_video_frames(1) - 1, spec.clip_frames
                    raise InvalidRequestError("seconds", f"{length} is {frames} frames at {fps} fps: {_message(e)}",
                                              f"{first / fps:g} + {step / fps:g}n ({first / fps:g}, "
                                              f"{(first + step) / fps:g}, ...) within the audio's length") from None
                raise InvalidRequestError("seconds", f"{length} is over this server's limit",
                                          f"at most {(s.max_frames - 1) / fps:g}") from None
            raise e from None
        stored = {k: v for k, v in request.to_dict().items() if k not in ("image", "audio", "pose_video", "output")}
        stored["seed"] = settings.seed  # a random seed is drawn once: a re-run after a crash makes the same video
        stored["lora"] = lora_set
        view = settings.to_dict()
        view["lora"] = lora_set
        view.pop("output", None)
        view.pop("warnings", None)
        for key in ("image", "audio", "pose_video"):  # the uploads by content, never by server path
            view[key] = shas.get(key)
        dedup = None
        if fields.get("seed") is not None:  # only an explicit seed makes two requests the same video
            key = {"settings": {k: v for k, v in view.items() if k not in ("preset",)}, "config": self.config.hash(),
                   "checkpoint": s.checkpoints.get(spec.name)}
            dedup = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        names = {k: p.name for k, p in uploads.items()}
        try:
            job, created = self.store.submit(model=spec.name, request=stored, settings=view,
                                             warnings=settings.warnings, image=names.get("image"), dedup_key=dedup,
                                             api=api, max_queue=s.max_queue, audio=names.get("audio"),
                                             pose_video=names.get("pose_video"))
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
                self._release_uploads(job)
        return job

    def delete(self, job_id: str) -> Job:
        job = self.store.delete(job_id)
        if job is None:
            raise ApiError(404, "job_not_found", f"job_id: no job {job_id!r}", "job_id")
        if job.state == "running":
            self.live.request_cancel(job_id)
        self._remove_outputs(job)
        self._release_uploads(job)
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
        settings = {k: v for k, v in job.settings.items() if k not in ("image", "audio", "pose_video")}
        return {
            "id": job.id, "object": "job", "model": job.model, "state": job.state,
            "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at,
            "expired_at": job.expired_at, "queue_position": position, "progress": progress, "eta_s": eta,
            "attempts": job.attempts, "cancel_requested": job.cancel_requested, "timings": job.timings,
            "error": job.error, "warnings": job.warnings, "settings": settings,
            "image_sha256": job.settings.get("image"), "audio_sha256": job.settings.get("audio"),
            "pose_video_sha256": job.settings.get("pose_video"), "api": job.api,
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
        self._release_uploads(job)
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

    def _release_uploads(self, job: Job) -> None:
        """Remove the job's uploads (image, audio, pose video) that no queued or running job needs any more."""
        if not job.uploads:
            return
        with self._upload_lock:
            for name in job.uploads:
                if not self.store.upload_in_use(name):
                    (self.settings.uploads_dir / name).unlink(missing_ok=True)

    # -- metrics -----------------------------------------------------------------------------
    def render_metrics(self) -> str:
        return self.metrics.render(states=self.store.counts(), queue_depth=self.store.queue_depth(),
                                   max_queue=self.settings.max_queue, models=self.models_status(),
                                   stored_bytes=self.store.stored_bytes(), max_disk=self.settings.max_disk,
                                   uptime_s=time.time() - self.started, workers=self.workers_view())


def _message(e: InvalidRequestError) -> str:
    """An ``InvalidRequestError``'s message without its field and allowed values."""
    text = str(e).removeprefix(f"{e.field}: ")
    return text.removesuffix(f" (allowed: {e.allowed})") if e.allowed else text


def _without_paths(e: InvalidRequestError, uploads: dict[str, Path]) -> InvalidRequestError:
    """``e`` as a client may read it: the stored uploads' server paths replaced by what they are."""
    text, allowed = _message(e), e.allowed
    for key, path in uploads.items():
        what = "the uploaded " + key.replace("_", " ")
        text = text.replace(str(path), what)
        allowed = allowed.replace(str(path), what) if allowed else allowed
    if text == _message(e) and allowed == e.allowed:
        return e
    return InvalidRequestError(e.field, text, allowed)


def _besides(pool: ModelPool, index: int):
    """Whether a worker of ``pool`` other than number ``index`` may still run the model's jobs."""
    return lambda: pool.alive_besides(pool.workers[index])


__all__ = ["Service", "ACTIVE"]
