"""Request bodies -> the fields of a ``GenerationRequest`` (+ the uploaded files' bytes).

Two shapes arrive: Artifex's own (JSON or multipart form) and the OpenAI Videos API's
(``prompt``, ``model``, ``seconds``, ``size``, ``input_reference``). Both end in the same
typed request. Clients never name a file path: images, audio (S2V) and pose videos come as
uploads or data URLs and are stored under a name the server chooses (their SHA-256).
Uploads are checked by decoding them (images with Pillow, audio and video with PyAV, whose
demuxers are limited to self-contained formats), not by their name or declared type.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from artifex.errors import InvalidRequestError


class ApiError(Exception):
    """An HTTP error answer: status, a machine-readable code, the field at fault and what is allowed."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None, allowed: Any = None,
                 headers: dict[str, str] | None = None):
        self.status, self.code, self.message, self.param = status, code, message, param
        if allowed is not None and not isinstance(allowed, str):
            allowed = ", ".join(str(a) for a in allowed)
        self.allowed = allowed
        self.headers = headers or {}
        super().__init__(message)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "code": self.code, "param": self.param, "allowed": self.allowed}}


_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 409: "conflict_error",
          413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

# name -> kind; the order is the order of the OpenAPI documentation.
NATIVE_FIELDS: dict[str, type] = {
    "model": str, "prompt": str, "negative_prompt": str, "preset": str, "size": str, "width": int, "height": int,
    "frames": int, "steps": int, "guidance": float, "guidance_low": float, "shift": float, "seed": int,
    "sampler": str, "timesteps": list, "sigmas": list, "switch_step": int, "lora": str, "image": bytes,
    "audio": bytes, "pose_video": bytes,
}
OPENAI_FIELDS: dict[str, type] = {
    "model": str, "prompt": str, "seconds": float, "size": str, "input_reference": bytes,
    # Artifex extensions (the OpenAI client passes them through extra_body)
    "negative_prompt": str, "preset": str, "steps": int, "seed": int, "guidance": float, "guidance_low": float,
    "shift": float, "sampler": str, "timesteps": list, "sigmas": list, "switch_step": int, "lora": str,
    "audio": bytes, "pose_video": bytes,
}
# The fields that take a file (a multipart upload, or a data: URL in JSON), per door.
UPLOAD_FIELDS = {"artifex": ("image", "audio", "pose_video"), "openai": ("input_reference", "audio", "pose_video")}
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
_EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff"}


@dataclass
class Submission:
    fields: dict[str, Any]  # GenerationRequest fields (no image, audio, pose video or output)
    image: bytes | None
    api: str  # "artifex" or "openai"
    audio: bytes | None = None  # S2V: the driving audio's bytes, unchecked
    pose_video: bytes | None = None  # S2V: the pose video's bytes, unchecked


def parse_json(body: bytes) -> dict:
    if not body.strip():
        raise ApiError(400, "invalid_json", "body: the request body is empty; send a JSON object", "body")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # malformed, not UTF-8, an integer of over 4300 digits, too deep
        raise ApiError(400, "invalid_json", f"body: malformed JSON ({type(e).__name__}: {e})"[:500], "body") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", f"body: must be a JSON object, got {type(data).__name__}", "body")
    return data


def _coerce(name: str, value: Any, kind: type, from_form: bool) -> Any:
    """Check (JSON) or parse (form text) one field's value."""
    if value is None:
        return None
    if kind is bytes:
        return value
    if kind is list:  # a schedule: a JSON array, or in a form "1000, 937.5, 833.3"; resolve_request checks values
        if from_form and isinstance(value, str):
            if not value.strip():
                return None
            return [_coerce(name, v, float, True) for v in value.split(",")]
        if not isinstance(value, list):
            raise InvalidRequestError(name, f"must be a list of numbers, got {json.dumps(value)[:100]}")
        return [_coerce(name, v, float, False) for v in value]
    if from_form and isinstance(value, str):
        text = value.strip()
        if kind is str:
            return value
        if text == "":
            return None
        try:
            value = int(text) if kind is int else float(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise InvalidRequestError(name, f"must be {what}, got {value[:100]!r}") from None
        return value if kind is int else _finite(name, value)
    if kind is str:
        if not isinstance(value, str):
            raise InvalidRequestError(name, f"must be a string, got {json.dumps(value)[:100]}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequestError(name, f"must be an integer, got {json.dumps(value)[:100]}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(name, f"must be a number, got {json.dumps(value)[:100]}")
    return _finite(name, value)


def _finite(name: str, value: int | float) -> int | float:
    """A number field's value, if it is finite as a float. Python's JSON reader takes NaN, Infinity and 1e309
    (read as inf), and an integer can be too large for a float; none of them is a usable value."""
    try:
        finite = math.isfinite(value)
    except OverflowError:
        finite = False
    if not finite:
        shown = str(value) if isinstance(value, float) else f"an integer of {len(str(value))} digits"
        raise InvalidRequestError(name, f"must be a finite number, got {shown}", "finite numbers (no NaN or Infinity)")
    return value


def _check_fields(data: dict, allowed: dict[str, type], from_form: bool) -> dict:
    if "output" in data:
        raise InvalidRequestError("output", "the server decides where videos are written; clients cannot name paths")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise InvalidRequestError(unknown[0], "unknown field", list(allowed))
    return {k: _coerce(k, v, allowed[k], from_form) for k, v in data.items()}


def _size(value: str, name: str = "size") -> tuple[int, int]:
    try:
        w, h = value.lower().replace(" ", "").split("x")
        return int(w), int(h)
    except ValueError:
        raise InvalidRequestError(name, f"must look like WIDTHxHEIGHT (e.g. 1280x704), got {value!r}") from None


# What each upload field holds: (its noun in messages, the data: URL's media type).
_UPLOAD_KINDS = {"image": ("image", "image/png"), "input_reference": ("image", "image/png"),
                 "audio": ("audio", "audio/wav"), "pose_video": ("pose video", "video/mp4")}


def data_url_bytes(value: Any, name: str) -> bytes:
    """The bytes of a ``data:<type>;base64,...`` URL. Anything else (a path, a remote URL) is refused. The type the
    URL declares is not trusted: the bytes are decoded and checked later."""
    noun, mime = _UPLOAD_KINDS.get(name, ("file", "application/octet-stream"))
    if isinstance(value, dict) and name == "input_reference":  # OpenAI's JSON form: {"image_url": "data:..."}
        if set(value) - {"image_url"}:
            raise InvalidRequestError(name, "only {\"image_url\": \"data:...\"} is accepted here",
                                      "a data: URL, or a multipart file upload")
        value = value.get("image_url")
    if not isinstance(value, str) or not value.startswith("data:"):
        raise InvalidRequestError(name, f"send the {noun} as a multipart file upload or a base64 data: URL; "
                                        "file paths and remote URLs are not accepted",
                                  f"multipart file, data:{mime.split('/')[0]}/...;base64,...")
    head, _, payload = value.partition(",")
    if ";base64" not in head:
        raise InvalidRequestError(name, f"data: URL must be base64-encoded (data:{mime};base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(name, "data: URL holds invalid base64") from None


def _one_upload(in_body, uploaded: bytes | None, name: str) -> bytes | None:
    """The file of field ``name``: from the body (bytes or a data: URL) or the multipart upload; both is an error."""
    if in_body is None:
        return uploaded
    if uploaded is not None:
        raise InvalidRequestError(name, f"give the {_UPLOAD_KINDS.get(name, ('file',))[0]} once")
    return in_body if isinstance(in_body, bytes) else data_url_bytes(in_body, name)


def native_submission(data: dict, uploads: dict[str, bytes], from_form: bool) -> Submission:
    """Artifex's body -> a submission. ``uploads``: the multipart files by field (image, audio, pose_video)."""
    data = _check_fields(data, NATIVE_FIELDS, from_form)
    image = _one_upload(data.pop("image", None), uploads.get("image"), "image")
    media = {k: _one_upload(data.pop(k, None), uploads.get(k), k) for k in ("audio", "pose_video")}
    size = data.pop("size", None)
    if size is not None:
        if data.get("width") is not None or data.get("height") is not None:
            raise InvalidRequestError("size", "give size or width/height, not both")
        data["width"], data["height"] = _size(size)
    fields = {k: v for k, v in data.items() if v is not None}
    return Submission(fields=fields, image=image, api="artifex", **media)


def openai_submission(data: dict, uploads: dict[str, bytes], from_form: bool, default_model: str,
                      fps_of: Any) -> Submission:
    """The OpenAI Videos API body -> a submission. ``seconds`` becomes frames = seconds * fps + 1. ``uploads``: the
    multipart files by field (input_reference, and Artifex's audio and pose_video)."""
    if isinstance(data.get("seconds"), str):  # the OpenAI clients send seconds as a string ("4")
        data = {**data, "seconds": _coerce("seconds", data["seconds"], float, True)}
    data = _check_fields(data, OPENAI_FIELDS, from_form)
    image = _one_upload(data.pop("input_reference", None), uploads.get("input_reference"), "input_reference")
    media = {k: _one_upload(data.pop(k, None), uploads.get(k), k) for k in ("audio", "pose_video")}
    fields: dict[str, Any] = {k: v for k, v in data.items() if v is not None and k not in ("seconds", "size")}
    fields.setdefault("model", default_model)
    if data.get("size") is not None:
        fields["width"], fields["height"] = _size(data["size"])
    seconds = data.get("seconds")
    if seconds is not None:
        fps = fps_of(fields["model"])
        allowed = f"positive multiples of {4 / fps:g} s"
        if seconds <= 0:
            raise InvalidRequestError("seconds", f"must be positive, got {seconds:g}", allowed)
        frames = seconds * fps
        if not math.isfinite(frames) or abs(frames - round(frames)) > 1e-6 or round(frames) % 4:
            raise InvalidRequestError("seconds", f"{seconds:g} s at {fps} fps is not a whole number of 4-frame "
                                                 f"latent steps", allowed)
        fields["frames"] = int(round(frames)) + 1
    return Submission(fields=fields, image=image, api="openai", **media)


def check_image(data: bytes, max_bytes: int, max_pixels: int, name: str = "image") -> tuple[str, str]:
    """Decode an upload fully; returns (sha256, extension). Not an image, too big, too many pixels: an error."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InvalidRequestError(name, "the uploaded file is empty")
    if len(data) > max_bytes:
        raise ApiError(413, "upload_too_large", f"{name}: {len(data)} bytes is over this server's limit", name,
                       f"at most {max_bytes} bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or "?"
            if fmt not in IMAGE_FORMATS:
                raise InvalidRequestError(name, f"{fmt} images are not accepted", IMAGE_FORMATS)
            w, h = im.size
            if w * h > max_pixels:
                raise InvalidRequestError(name, f"{w}x{h} has too many pixels", f"at most {max_pixels} pixels")
            im.load()
    except InvalidRequestError:
        raise
    except UnidentifiedImageError:
        raise InvalidRequestError(name, "the upload is not an image in a format Pillow recognises",
                                  IMAGE_FORMATS) from None
    except Exception as e:  # any decoder failure on client bytes (truncated, corrupt, a decompression bomb)
        raise InvalidRequestError(name, f"the upload is not a readable image ({type(e).__name__}: "
                                        f"{_no_addresses(str(e))[:300]})", IMAGE_FORMATS) from None
    return hashlib.sha256(data).hexdigest(), _EXT[fmt]


def _no_addresses(text: str) -> str:
    """An error text without Python object reprs (``<_io.BytesIO object at 0x7f...>``): the client's upload."""
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the upload", text)


# -- audio and pose videos (S2V) ---------------------------------------------------------------------------
# The demuxers a media upload may be read with: self-contained formats only. ffmpeg probes a file by its content,
# and some demuxers it would pick (playlists such as HLS, concat lists) open other files or URLs named inside the
# upload: an upload that probes as one of those is refused before its header is read.
AUDIO_DEMUXERS = ("wav", "w64", "mp3", "flac", "ogg", "mov", "matroska", "aac", "aiff", "caf", "au", "amr", "ac3",
                  "eac3")
VIDEO_DEMUXERS = ("mov", "matroska", "avi", "gif", "mpegts", "mpeg", "flv", "ivf")
AUDIO_FORMATS = "wav, mp3, m4a/mp4, flac, ogg/opus, webm/mka, aac, aiff, caf, au, amr, ac3"
VIDEO_FORMATS = "mp4/mov, webm/mkv, avi, gif, mpeg-ts, mpeg, flv, ivf"


@dataclass(frozen=True)
class CheckedMedia:
    """An audio or pose-video upload that decoded: its SHA-256, the extension of its format, the temporary file
    beside the uploads that holds it (the caller moves it to its stored name or removes it), and what it holds
    (audio: seconds and clips; pose video: width, height, fps)."""

    sha256: str
    ext: str
    path: Path
    info: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.sha256}.{self.ext}"


def _message(e: InvalidRequestError) -> str:
    """An ``InvalidRequestError``'s message without its field and allowed values."""
    text = str(e)
    text = text.removeprefix(f"{e.field}: ")
    return text.removesuffix(f" (allowed: {e.allowed})") if e.allowed else text


def _clean(text: str, path: Path) -> str:
    """A decoder's or checker's text about the temporary file, as the client sees it: no server paths."""
    text = text.replace(f"'{path}'", "the upload").replace(str(path), "the upload").replace(path.name, "the upload")
    return _no_addresses(text)[:300]


def _ext(format_name: str, kind: str) -> str:
    first = format_name.split(",")[0]
    if first == "mov":
        return "m4a" if kind == "audio" else "mp4"
    if first == "matroska":
        return "mka" if kind == "audio" else "mkv"
    return re.sub(r"[^a-z0-9]", "", first.lower())[:8] or "bin"


def _stage(data: bytes, folder: Path, max_bytes: int, name: str, noun: str) -> tuple[str, Path]:
    """Size-check an upload and write it to a temporary file in ``folder``: (sha256, path)."""
    import uuid

    if not data:
        raise InvalidRequestError(name, f"the uploaded {noun} is empty")
    if len(data) > max_bytes:
        raise ApiError(413, "upload_too_large", f"{name}: {len(data)} bytes is over this server's limit", name,
                       f"at most {max_bytes} bytes")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".check-{uuid.uuid4().hex}"
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest(), path


def _open_media(path: Path, name: str, noun: str, demuxers: tuple[str, ...], formats: str):
    import av

    try:
        return av.open(str(path), options={"format_whitelist": ",".join(demuxers), "protocol_whitelist": "file"})
    except Exception as e:  # not a media file, or one of a format outside the list (FFmpeg says EINVAL)
        reason = "a format outside the list" if isinstance(e, av.error.ArgumentError) else _clean(str(e), path)
        raise InvalidRequestError(name, f"the upload is not {noun} in a format this server reads ({reason})",
                                  formats) from None


def _first_stream(container, kind: str, name: str, formats: str):
    """The container's first ``kind`` ("audio", "video") stream, or an error listing the streams it has."""
    streams = getattr(container.streams, kind)
    if not streams:
        kinds = ", ".join(sorted({s.type for s in container.streams})) or "none"
        raise InvalidRequestError(name, f"the upload has no {kind} stream (streams: {kinds})", formats)
    return streams[0]


def check_audio(data: bytes, folder: Path, max_bytes: int, max_seconds: float, name: str = "audio") -> CheckedMedia:
    """Decode an audio upload fully with ``load_audio`` (its checks: an audio stream, at least 25 ms, at most
    ``max_seconds``) after a size check and a probe limited to ``AUDIO_DEMUXERS``."""
    sha, path = _stage(data, folder, max_bytes, name, "audio")
    try:
        with _open_media(path, name, "audio", AUDIO_DEMUXERS, AUDIO_FORMATS) as container:
            fmt = container.format.name
            _first_stream(container, "audio", name, AUDIO_FORMATS)
        from artifex.models.s2v.audio import SAMPLE_RATE, clips_for_samples, load_audio

        try:
            samples = load_audio(path, max_seconds)
        except InvalidRequestError as e:  # its own words, with the server's cap where it says "shorter audio"
            allowed = f"at most {max_seconds:g} s" if e.allowed == "shorter audio" else e.allowed
            raise InvalidRequestError(name, _clean(_message(e), path), allowed) from None
        except Exception as e:  # any decoder failure on client bytes
            raise InvalidRequestError(name, f"the audio could not be decoded ({type(e).__name__}: "
                                            f"{_clean(str(e), path)})", AUDIO_FORMATS) from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return CheckedMedia(sha, _ext(fmt, "audio"), path, {"seconds": round(samples.size / SAMPLE_RATE, 3),
                                                        "clips": clips_for_samples(samples.size)})


def check_pose_video(data: bytes, folder: Path, max_bytes: int, max_pixels: int,
                     name: str = "pose_video") -> CheckedMedia:
    """Check a pose-video upload: size, a probe limited to ``VIDEO_DEMUXERS``, a video stream of at most
    ``max_pixels`` a frame whose first frame decodes."""
    sha, path = _stage(data, folder, max_bytes, name, "pose video")
    try:
        with _open_media(path, name, "a video", VIDEO_DEMUXERS, VIDEO_FORMATS) as container:
            fmt = container.format.name
            stream = _first_stream(container, "video", name, VIDEO_FORMATS)
            w, h = stream.codec_context.width or 0, stream.codec_context.height or 0
            if w * h > max_pixels:
                raise InvalidRequestError(name, f"{w}x{h} has too many pixels", f"at most {max_pixels} pixels")
            try:
                first = next(iter(container.decode(stream)), None)
            except Exception as e:  # any decoder failure on client bytes
                raise InvalidRequestError(name, f"the video could not be decoded ({type(e).__name__}: "
                                                f"{_clean(str(e), path)})", VIDEO_FORMATS) from None
            if first is None:
                raise InvalidRequestError(name, "the upload holds no decodable frames", VIDEO_FORMATS)
            if first.width * first.height > max_pixels:
                raise InvalidRequestError(name, f"{first.width}x{first.height} has too many pixels",
                                          f"at most {max_pixels} pixels")
            fps = float(stream.average_rate or stream.guessed_rate or 0) or None
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return CheckedMedia(sha, _ext(fmt, "video"), path, {"width": first.width, "height": first.height, "fps": fps})
