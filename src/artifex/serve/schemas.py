"""Pydantic shapes for the OpenAPI document. Validation itself is Artifex's own (inputs.py,
``resolve_request``), so errors name fields and allowed values the same way at every door."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

AUDIO_DOC = ("S2V (required there; other models refuse it): the speech or other audio that drives the video. JSON: "
             "a data:audio/...;base64 URL; multipart: a file field. Decoded and checked by the server (wav, mp3, "
             "m4a/mp4, flac, ogg/opus, webm/mka, aac, aiff, ...; at least 25 ms; at most the server's "
             "max_media_bytes and max_audio_seconds, GET /api/models -> limits). The video follows its length: "
             "clips of 80 frames at 16 fps (the first 77), unless frames (or seconds) ask for fewer")
POSE_DOC = ("S2V, optional: a pose video that drives the body (its first frames, sampled at 16 fps). JSON: a "
            "data:video/...;base64 URL; multipart: a file field (mp4/mov, webm/mkv, avi, gif, ...; at most "
            "max_media_bytes)")


class FewStepFields(BaseModel):
    """The sampler and LoRA fields both submission routes take."""

    sampler: Literal["unipc", "euler", "dmd"] | None = Field(None, description="default: the model's (unipc; "
                                                                        "distilled profiles: euler or dmd)")
    timesteps: list[float] | None = Field(None, description="euler/dmd: the schedule as the model sees it, "
                                                            "decreasing in (0, 1000]; defines the steps")
    sigmas: list[float] | None = Field(None, description="euler/dmd: the schedule as sigmas in (0, 1] "
                                                         "(instead of timesteps)")
    switch_step: int | None = Field(None, description="A14B: the first step of the low-noise expert (instead of "
                                                      "the boundary)")
    lora: str | None = Field(None, description="a LoRA set this server registered (GET /api/models); "
                                               "default: the one it loaded with")


class JobCreate(FewStepFields):
    """A generation request. Unset fields come from the preset, then from the model's defaults."""

    model: str = Field(description="a model this server serves (GET /api/models)")
    prompt: str
    negative_prompt: str | None = None
    preset: Literal["draft", "preview", "production", "cinema", "turbo"] | None = None
    size: str | None = Field(None, description="WIDTHxHEIGHT, e.g. 1280x704 (or width and height)")
    width: int | None = None
    height: int | None = None
    frames: int | None = Field(None, description="4n+1")
    steps: int | None = None
    guidance: float | None = Field(None, description="CFG scale (the high-noise expert's for A14B)")
    guidance_low: float | None = Field(None, description="CFG scale of the low-noise expert (A14B)")
    shift: float | None = None
    seed: int | None = Field(None, description="with a seed, an identical earlier request returns its stored result")
    image: str | None = Field(None, description="JSON: a data:image/...;base64 URL. Multipart: a file field. "
                                                "TI2V optional, I2V and S2V (the reference image) required")
    audio: str | None = Field(None, description=AUDIO_DOC)
    pose_video: str | None = Field(None, description=POSE_DOC)


class Progress(BaseModel):
    stage: str
    step: int | None = None
    total: int | None = None
    percent: float | None = None


class JobOut(BaseModel):
    id: str
    object: Literal["job"] = "job"
    model: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled", "expired"]
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    expired_at: float | None = None
    queue_position: int | None = None
    progress: Progress
    eta_s: float | None = None
    attempts: int = Field(description="runs started (more than 1 after a crash interrupted the job)")
    cancel_requested: bool = False
    timings: dict[str, float] | None = None
    error: dict[str, Any] | None = None
    warnings: list[str] = []
    settings: dict[str, Any]
    image_sha256: str | None = Field(None, description="SHA-256 of the conditioning image, if any")
    audio_sha256: str | None = Field(None, description="S2V: SHA-256 of the audio (settings.audio_seconds, "
                                                        "settings.clips: its length and the clips it makes)")
    pose_video_sha256: str | None = Field(None, description="S2V: SHA-256 of the pose video, if any")
    api: str = Field("artifex", description="the door it came in by: artifex or openai")
    video_url: str | None = None
    output_bytes: int | None = Field(None, description="bytes on disk: the mp4 and its JSON sidecar")
    deduplicated: bool | None = Field(None, description="on create: true when an identical request's job is returned")


class JobList(BaseModel):
    jobs: list[JobOut]
    total: int
    limit: int
    offset: int
    counts: dict[str, int] = Field(default_factory=dict, description="jobs in each state (of the model, if given)")


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str
    param: str | None = Field(None, description="the field at fault")
    allowed: str | None = Field(None, description="the values that would work")


class ErrorOut(BaseModel):
    error: ErrorDetail


class VideoCreate(FewStepFields):
    """OpenAI Videos API body (plus Artifex's optional fields, which OpenAI clients send as extra_body)."""

    prompt: str
    model: str | None = Field(None, description="default: the first model this server serves")
    seconds: str | None = Field(None, description="clip length; frames = seconds * fps + 1")
    size: str | None = Field(None, description="WIDTHxHEIGHT")
    input_reference: Any | None = Field(None, description="multipart file, or {\"image_url\": \"data:...\"}")
    audio: str | None = Field(None, description="Artifex extension. " + AUDIO_DOC)
    pose_video: str | None = Field(None, description="Artifex extension. " + POSE_DOC)
    negative_prompt: str | None = None
    preset: str | None = None
    steps: int | None = None
    seed: int | None = None
    guidance: float | None = None
    guidance_low: float | None = None
    shift: float | None = None


class VideoOut(BaseModel):
    id: str
    object: Literal["video"] = "video"
    model: str
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    prompt: str | None = None
    size: str
    seconds: str
    quality: str = "standard"
    remixed_from_video_id: str | None = None
    error: dict[str, Any] | None = None


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoOut]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool


def body_doc(model: type[BaseModel], *file_fields: str) -> dict:
    """openapi_extra for an endpoint that takes JSON or a multipart form with files (``file_fields``)."""
    schema = model.model_json_schema()
    files = {}
    for name in file_fields:
        doc = schema["properties"].get(name, {}).get("description")
        files[name] = {"type": "string", "format": "binary", **({"description": doc} if doc else {})}
    form = {**schema, "properties": {**schema["properties"], **files}}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema},
                                                          "multipart/form-data": {"schema": form}}}}
