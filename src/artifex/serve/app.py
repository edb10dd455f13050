"""The FastAPI application: routes over ``Service``; no generation logic here.

Every error answer is JSON ``{"error": {message, type, code, param, allowed}}`` with a 4xx
status for anything the client can fix; the page and the API share one origin and never
send CORS headers, so other origins can neither read answers nor submit with the token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from artifex import __version__
from artifex.errors import ArtifexError, InvalidRequestError, NotSupportedYetError
from artifex.presets import PRESETS, pick_size
from artifex.serve import schemas
from artifex.serve.auth import is_loopback, token_matches
from artifex.serve.inputs import (
    UPLOAD_FIELDS,
    ApiError,
    Submission,
    native_submission,
    openai_submission,
    parse_json,
)
from artifex.serve.jobs import STATES, TERMINAL
from artifex.serve.service import Service

log = logging.getLogger("artifex.serve")

_PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
             "media-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
             "frame-ancestors 'none'")
_STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
# Routes that answer without the token. They hold nothing of a user's: the page (it asks for the token), liveness,
# readiness, what the page needs before it has a token, and the API's schema with its two viewers (the schema is the
# same for every server of this version, and a client reads it to learn how to authenticate). README says so too.
PUBLIC_ROUTES = ("/", "/static/*", "/healthz", "/readyz", "/api/info", "/openapi.json", "/docs", "/redoc")
_ERRORS = {400: {"model": schemas.ErrorOut}, 401: {"model": schemas.ErrorOut}, 404: {"model": schemas.ErrorOut}}


def _error(status: int, code: str, message: str, param: str | None = None, allowed=None,
           headers: dict | None = None) -> JSONResponse:
    e = ApiError(status, code, message, param, allowed, headers)
    return JSONResponse(e.body(), status_code=status, headers=e.headers)


def _strict(value) -> str:
    """JSON for the event stream, as strict as the JSON answers (which FastAPI encodes with allow_nan=False)."""
    return json.dumps(value, allow_nan=False)


def _static(name: str) -> str:
    return resources.files("artifex.serve").joinpath("static", name).read_text()


def create_app(service: Service) -> FastAPI:
    settings = service.settings

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        log.info("serving %s on http://%s:%d (data: %s, auth: %s)", ", ".join(settings.models), settings.host,
                 settings.port, settings.data_dir, "bearer token" if service.token else "off (loopback only)")
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    app = FastAPI(
        title="Artifex", version=__version__, lifespan=lifespan,
        description="Wan2.2 video generation: a persistent job queue with progress streaming, plus the OpenAI "
                    "Videos API shape under /v1/videos. Every route but " + ", ".join(PUBLIC_ROUTES) + " needs "
                    "`Authorization: Bearer <token>`; those hold no jobs, videos or server state (the page, health, "
                    "and this document, which describes the API's shape only).",
    )
    bearer = HTTPBearer(auto_error=False, description="the server's API token (ARTIFEX_API_TOKEN, --token-file, "
                                                      "or <data dir>/api_token)")

    def require_token(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if service.token is None:
            return
        header = f"{creds.scheme} {creds.credentials}" if creds else None
        if not token_matches(header, service.token):
            raise ApiError(401, "unauthorized", "a valid API token is required: send 'Authorization: Bearer <token>'",
                           "authorization", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(require_token)]

    # -- errors ------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(request: Request, e: InvalidRequestError):
        return _error(400, "invalid_request", str(e), e.field, e.allowed)

    @app.exception_handler(NotSupportedYetError)
    async def _not_supported(request: Request, e: NotSupportedYetError):
        return _error(400, "not_supported", str(e))

    @app.exception_handler(ArtifexError)
    async def _artifex(request: Request, e: ArtifexError):
        return _error(400, "invalid_request", str(e))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("query", "path", "body")]
        param = ".".join(loc) or None
        return _error(400, "invalid_request", f"{param or 'request'}: {first.get('msg', 'invalid')}", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return _error(e.status_code, code, f"{request.method} {request.url.path}: {e.detail}",
                      headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, "internal_error", f"internal error ({type(e).__name__}); the server log has details")

    # -- origin rules and security headers ---------------------------------------------------
    @app.middleware("http")
    async def guard(request: Request, call_next):
        host_header = request.headers.get("host", "")
        if service.token is None:  # no token: only loopback names may reach us (no DNS rebinding)
            host = host_header.rsplit(":", 1)[0] if not host_header.startswith("[") else host_header[1:].split("]")[0]
            if host and not is_loopback(host):
                return _error(403, "host_not_allowed", f"Host {host_header!r} is refused: without a token this "
                                                       "server answers only loopback names", "host",
                              ["localhost", "127.0.0.1", "[::1]"])
        origin = request.headers.get("origin")
        if origin and request.method not in ("GET", "HEAD") and origin != f"{request.url.scheme}://{host_header}":
            return _error(403, "cross_origin", f"requests from {origin} are refused; use this server's own page",
                          "origin")
        response = await call_next(request)
        h = response.headers
        h.setdefault("X-Content-Type-Options", "nosniff")
        h.setdefault("Referrer-Policy", "no-referrer")
        h.setdefault("X-Frame-Options", "DENY")
        h.setdefault("Cross-Origin-Resource-Policy", "same-origin")
        h.setdefault("Cross-Origin-Opener-Policy", "same-origin")
        if request.url.path == "/" or request.url.path.startswith("/static/"):
            h.setdefault("Content-Security-Policy", _PAGE_CSP)
        return response

    # -- page, health --------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(_static("index.html"), headers={"Cache-Control": "no-store"})

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in _STATIC:
            raise ApiError(404, "not_found", f"no static file {name!r}", "name", list(_STATIC))
        return Response(_static(name), media_type=_STATIC[name], headers={"Cache-Control": "no-store"})

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict:
        """The process answers (liveness)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz() -> JSONResponse:
        """200 once every served model is loaded and warmed up; 503 before (or if one failed to load)."""
        models = {n: {"status": w.status, "error": w.error, "load_s": w.load_s, "imports_s": w.imports_s,
                      "warmup_s": w.warmup_s,
                      "workers": [x.status for x in w.workers]} for n, w in service.workers.items()}
        ready = service.ready()
        return JSONResponse({"ready": ready, "models": models}, status_code=200 if ready else 503)

    @app.get("/api/info", tags=["health"])
    def info() -> dict:
        """What the page needs before it has a token."""
        return {"name": "artifex", "version": __version__, "auth_required": service.token is not None}

    @app.get("/metrics", dependencies=auth, tags=["health"], response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        """Prometheus text format: queue depth, jobs by state, stage durations, GPU figures (NVML)."""
        return PlainTextResponse(service.render_metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/api/workers", dependencies=auth, tags=["health"])
    def workers() -> dict:
        """Where the engines run (``executor``: local or ray, the Ray dashboard's address) and every worker:
        status, busy or not, jobs finished, restarts, node, pid, GPUs, and its last memory/load report."""
        return service.workers_view()

    # -- models ----------------------------------------------------------------------------------
    @app.get("/api/models", dependencies=auth, tags=["jobs"])
    def models() -> dict:
        """Served models: status, what they take, their presets, and this server's request limits."""
        out = []
        for name, w in service.workers.items():
            from artifex.models.registry import get_model

            spec = get_model(name)
            presets = {}
            for p in PRESETS.values():
                try:
                    sampling = p.sampling(spec)
                except InvalidRequestError:  # turbo on a model without a few-step schedule
                    continue
                pw, ph = pick_size(spec, p.size)
                presets[p.name] = {"steps": p.steps(spec), "width": pw, "height": ph, "frames": p.num_frames(spec),
                                   "sampler": sampling.sampler, "guidance": list(sampling.guidance),
                                   "description": p.description}
            dw, dh = pick_size(spec, "largest")
            s2v = spec.task == "s2v"
            out.append({"name": name, "status": w.status, "error": w.error, "task": spec.task, "image": spec.image,
                        "audio": "required" if s2v else "none", "pose_video": "optional" if s2v else "none",
                        "clip_frames": [spec.clip_video_frames(1), spec.clip_frames] if s2v else None,
                        "description": spec.description, "fps": spec.fps, "spatial_multiple": spec.spatial_multiple,
                        "sizes": [f"{a}x{b}" for a, b in spec.sizes], "base": spec.base, "weights": spec.weights,
                        "defaults": {"steps": spec.steps, "frames": spec.frames, "width": dw, "height": dh,
                                     "sampler": spec.sampler, "timesteps": list(spec.timesteps or []) or None,
                                     "guidance": list(spec.guidance), "switch_step": spec.switch_step},
                        "presets": presets,
                        "loras": ["default", *settings.loras],  # names only: the files are the server's
                        "lora_sets_loaded": [x.lora_set for x in w.workers],
                        "lora_switch_s": [x.lora_switch_s for x in w.workers]})
        return {"models": out, "limits": settings.limits()}

    # -- submission helpers ------------------------------------------------------------------
    async def read_body(request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "body_too_large", f"body: {declared} bytes is over this server's limit", "body",
                           f"at most {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "body_too_large", f"body: more than {limit} bytes", "body",
                               f"at most {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def parse_submission(request: Request, api: str) -> Submission:
        upload_fields = UPLOAD_FIELDS[api]
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await read_body(request, settings.max_body_bytes)
        uploads: dict[str, bytes] = {}
        if kind == "application/json":
            data = parse_json(body)
        elif kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
            async def replay():
                return {"type": "http.request", "body": body, "more_body": False}

            largest = max(settings.max_upload_bytes, settings.max_media_bytes)
            try:  # max_part_size: a text part, which may hold a data: URL (base64)
                form = await Request(request.scope, replay).form(max_files=len(upload_fields), max_fields=64,
                                                                 max_part_size=largest * 4 // 3 + 2**16)
            except Exception as e:  # malformed multipart
                raise ApiError(400, "invalid_form", f"body: malformed form data ({e})", "body") from None
            data = {}
            for key, value in form.multi_items():
                if key in data or key in uploads:
                    raise InvalidRequestError(key, "given more than once")
                if isinstance(value, UploadFile):
                    if key not in upload_fields:
                        raise InvalidRequestError(key, "file uploads are accepted only here", upload_fields)
                    uploads[key] = await value.read()
                    continue
                data[key] = value
        else:
            raise ApiError(415, "unsupported_media_type", f"content-type: {kind or 'none'} is not accepted",
                           "content-type", ["application/json", "multipart/form-data"])
        from_form = kind != "application/json"
        if api == "openai":
            default = next(iter(service.workers))
            return openai_submission(data, uploads, from_form, default, service.fps_of)
        return native_submission(data, uploads, from_form)

    # -- Artifex API -----------------------------------------------------------------------------
    @app.post("/api/jobs", dependencies=auth, tags=["jobs"], status_code=201,
              openapi_extra=schemas.body_doc(schemas.JobCreate, *UPLOAD_FIELDS["artifex"]),
              responses={201: {"model": schemas.JobOut}, 200: {"model": schemas.JobOut}, 413: {}, 429: {}, **_ERRORS})
    async def create_job(request: Request) -> JSONResponse:
        """Queue a generation (JSON, or multipart with ``image``, ``audio`` and ``pose_video`` files; in JSON each is
        a base64 data: URL). S2V models need ``image`` and ``audio``; the video follows the audio's length. 201
        with the job; 200 with the stored job when an identical request (same model, inputs, settings, explicit
        seed) was made before; 429 with Retry-After when the queue is full."""
        sub = await parse_submission(request, "artifex")
        job, created = await run_in_threadpool(service.submit, sub)
        view = await run_in_threadpool(service.job_view, job)
        view["deduplicated"] = not created
        return JSONResponse(view, status_code=201 if created else 200, headers={"Location": f"/api/jobs/{job.id}"})

    @app.get("/api/jobs", dependencies=auth, tags=["jobs"], response_model=schemas.JobList, responses=_ERRORS)
    def list_jobs(limit: int = Query(20, ge=1, le=200), offset: int = Query(0, ge=0), state: str | None = None,
                  model: str | None = None) -> dict:
        """Jobs, newest first, a page at a time (``limit``, ``offset``), optionally of one state or model;
        ``counts``: how many jobs there are in each state (of ``model``, if given), whatever the page shows."""
        if state is not None and state not in STATES:
            raise InvalidRequestError("state", f"unknown state {state!r}", STATES)
        jobs, total = service.store.list_jobs(state=state, model=model, limit=limit, offset=offset)
        return {"jobs": [service.job_view(j) for j in jobs], "total": total, "limit": limit, "offset": offset,
                "counts": service.store.counts(model=model)}

    @app.get("/api/jobs/{job_id}", dependencies=auth, tags=["jobs"], response_model=schemas.JobOut,
             responses=_ERRORS)
    def get_job(job_id: str) -> dict:
        """State, progress (stage, step/total, percent), ETA, timings, error."""
        return service.job_view(service.get(job_id))

    @app.post("/api/jobs/{job_id}/cancel", dependencies=auth, tags=["jobs"], response_model=schemas.JobOut,
              responses={409: {"model": schemas.ErrorOut}, **_ERRORS})
    def cancel_job(job_id: str) -> JSONResponse:
        """Queued: cancelled at once. Running: stopped before its next step (202 until then)."""
        job = service.get(job_id)
        if job.state in TERMINAL:
            raise ApiError(409, "job_finished", f"the job is already {job.state}", "job_id", ["queued", "running"])
        job = service.cancel(job_id)
        return JSONResponse(service.job_view(job), status_code=202 if job.state == "running" else 200)

    @app.delete("/api/jobs/{job_id}", dependencies=auth, tags=["jobs"], responses=_ERRORS)
    def delete_job(job_id: str) -> dict:
        """Remove a job and its files (a running job is stopped first)."""
        job = service.delete(job_id)
        return {"id": job.id, "deleted": True, "state": job.state}

    @app.get("/api/jobs/{job_id}/video", dependencies=auth, tags=["jobs"],
             responses={200: {"content": {"video/mp4": {}}}, 409: {"model": schemas.ErrorOut},
                        410: {"model": schemas.ErrorOut}, **_ERRORS})
    def job_video(job_id: str, download: bool = False) -> FileResponse:
        """The mp4 (HTTP range requests supported). ``download=true`` asks the browser to save it."""
        job = service.get(job_id)
        return FileResponse(service.video_path(job), media_type="video/mp4", filename=f"{job.id}.mp4",
                            content_disposition_type="attachment" if download else "inline")

    @app.get("/api/jobs/{job_id}/events", dependencies=auth, tags=["jobs"],
             responses={200: {"content": {"text/event-stream": {}}}, **_ERRORS})
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        """Server-sent events: ``progress`` (the job, on every change) until one ``done`` (the final job)."""
        await run_in_threadpool(service.get, job_id)

        async def stream():
            yield "retry: 1000\n\n"
            seen_version, seen_view, last_read, last_sent = -1, None, 0.0, time.monotonic()
            while True:
                version = service.live.version(job_id)
                now = time.monotonic()
                if version != seen_version or now - last_read > 1.0:
                    seen_version, last_read = version, now
                    job = await run_in_threadpool(service.store.get, job_id)
                    if job is None:
                        yield f"event: deleted\ndata: {json.dumps({'id': job_id})}\n\n"
                        return
                    view = await run_in_threadpool(service.job_view, job)
                    if job.state in TERMINAL:
                        yield f"event: done\ndata: {_strict(view)}\n\n"
                        return
                    key = (view["state"], view["progress"], view["queue_position"])
                    if key != seen_view:
                        seen_view, last_sent = key, now
                        yield f"event: progress\ndata: {_strict(view)}\n\n"
                if now - last_sent > 15:
                    last_sent = now
                    yield ": keep-alive\n\n"
                if service.stopping or await request.is_disconnected():
                    return
                await asyncio.sleep(0.1)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- OpenAI Videos API -----------------------------------------------------------------------
    @app.post("/v1/videos", dependencies=auth, tags=["openai"],
              openapi_extra=schemas.body_doc(schemas.VideoCreate, *UPLOAD_FIELDS["openai"]),
              responses={200: {"model": schemas.VideoOut}, 429: {}, **_ERRORS})
    async def create_video(request: Request) -> JSONResponse:
        """OpenAI ``videos.create``: JSON or multipart (``input_reference`` file; for S2V models also ``audio``
        and an optional ``pose_video``, as files or data: URLs)."""
        sub = await parse_submission(request, "openai")
        job, _ = await run_in_threadpool(service.submit, sub)
        return JSONResponse(await run_in_threadpool(service.openai_view, job))

    @app.get("/v1/videos", dependencies=auth, tags=["openai"], response_model=schemas.VideoList,
             responses=_ERRORS)
    def list_videos(limit: int = Query(20, ge=1, le=100), after: str | None = None,
                    order: str = Query("desc", pattern="^(asc|desc)$")) -> dict:
        """OpenAI ``videos.list``: cursor paging with ``after`` (an id) and ``order``."""
        after_seq = None
        if after is not None:
            after_seq = service.get(after).seq
        jobs, _ = service.store.list_jobs(limit=limit + 1, after_seq=after_seq, newest_first=order == "desc")
        page = jobs[:limit]
        return {"object": "list", "data": [service.openai_view(j) for j in page],
                "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
                "has_more": len(jobs) > limit}

    @app.get("/v1/videos/{video_id}", dependencies=auth, tags=["openai"], response_model=schemas.VideoOut,
             responses=_ERRORS)
    def get_video(video_id: str) -> dict:
        """OpenAI ``videos.retrieve``."""
        return service.openai_view(service.get(video_id))

    @app.get("/v1/videos/{video_id}/content", dependencies=auth, tags=["openai"],
             responses={200: {"content": {"video/mp4": {}}}, **_ERRORS})
    def video_content(video_id: str, variant: str = "video") -> FileResponse:
        """OpenAI ``videos.download_content`` (variant ``video``; range requests supported)."""
        if variant != "video":
            raise InvalidRequestError("variant", f"{variant!r} is not available here", ["video"])
        job = service.get(video_id)
        return FileResponse(service.video_path(job), media_type="video/mp4", filename=f"{job.id}.mp4",
                            content_disposition_type="inline")

    @app.delete("/v1/videos/{video_id}", dependencies=auth, tags=["openai"], response_model=schemas.VideoDeleted,
                responses=_ERRORS)
    def delete_video(video_id: str) -> dict:
        """OpenAI ``videos.delete``."""
        job = service.delete(video_id)
        return {"id": job.id, "object": "video.deleted", "deleted": True}

    return app
