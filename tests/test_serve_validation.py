"""Every door's numbers are checked before anything is stored, in an in-process app (no engine loads).

The app runs under Starlette's TestClient without its lifespan, so the workers never start: an
accepted job stays queued, which is all these tests need. Property-based tests (hypothesis) send
generated bodies to every submission route and check that each gets a 2xx or a 4xx, never a 5xx,
that a refusal leaves the job store as it was, and that every answer is strict JSON.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from starlette.testclient import TestClient

from artifex.config import OptimizationConfig
from artifex.serve.app import create_app
from artifex.serve.service import Service
from artifex.serve.settings import ServeSettings

MODELS = ("tiny-t2v-moe", "tiny-ti2v", "tiny-i2v-moe")
TOKEN = "t" * 43
FAST = {"model": "tiny-t2v-moe", "size": "128x64", "frames": 9, "steps": 4}
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                            HealthCheck.too_slow])


@pytest.fixture(scope="module")
def app(tmp_path_factory, artifex_home):
    data = tmp_path_factory.mktemp("serve-validation") / "data"
    serve = ServeSettings(models=MODELS, data_dir=data, max_steps=400, max_frames=33, max_width=256, max_height=256,
                          max_upload_bytes=2**18, max_queue=500, warmup=False)
    service = Service(serve, OptimizationConfig(), TOKEN)
    client = TestClient(create_app(service), headers={"Authorization": f"Bearer {TOKEN}"})
    yield client, service
    client.close()
    service.store.close()


def strict(text: str):
    """json.loads that refuses NaN and Infinity, as strict readers (browsers, jq, Go, Rust) do."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def total(service) -> int:
    return sum(service.store.counts().values())


def png_bytes(width: int = 160, height: int = 96) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // width, y * 255 // height, ((x // 8 + y // 8) % 2) * 200], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def post_json(client, path: str, body) -> object:
    """Post ``body`` as Python's json writes it: NaN, Infinity and -Infinity included, as a careless client would."""
    return client.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})


def check_answer(service, r, before: int) -> dict:
    """The property every submission answer has; returns the parsed body."""
    assert r.status_code < 500, (r.status_code, r.text)
    body = strict(r.text)
    if r.status_code >= 400:
        assert total(service) == before, r.text  # nothing refused is stored
        err = body["error"]
        assert err["message"] and err["code"]
    else:
        job_id = body["id"]
        stored = service.store.get(job_id)
        assert stored is not None
        strict(json.dumps(stored.request, allow_nan=False))  # what was stored is finite
        strict(json.dumps(stored.settings, allow_nan=False))
        service.delete(job_id)  # keep the store small and the queue open for the next example
    return body


# -- the non-finite numbers of the issue, at each door ------------------------------------------------
NON_FINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("field", ["guidance", "guidance_low", "shift"])
@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused_before_anything_is_stored(app, field, value):
    client, service = app
    before = total(service)
    for path, body in (("/api/jobs", {**FAST, "prompt": "x", field: value}),
                       ("/v1/videos", {"model": "tiny-t2v-moe", "prompt": "x", "size": "128x64", field: value})):
        r = post_json(client, path, body)
        assert r.status_code == 400, (path, r.status_code, r.text)
        err = strict(r.text)["error"]
        assert err["param"] == field and "finite" in err["message"], err
        assert total(service) == before
    # 1e309 is read as inf by Python's JSON reader
    raw = '{"model": "tiny-t2v-moe", "prompt": "x", "' + field + '": 1e309}'
    r = client.post("/api/jobs", content=raw.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and strict(r.text)["error"]["param"] == field
    # a form sends text
    r = client.post("/api/jobs", data={**{k: str(v) for k, v in FAST.items()}, "prompt": "x", field: str(value)})
    assert r.status_code == 400 and strict(r.text)["error"]["param"] == field, r.text
    assert total(service) == before


@pytest.mark.parametrize("body, param, allowed", [
    ({**FAST, "prompt": "x", "guidance": 1000}, "guidance", "0 to 100"),
    ({**FAST, "prompt": "x", "shift": 1e6}, "shift", "0.01 to 100"),
    ({**FAST, "prompt": "x", "guidance": 10**400}, "guidance", "finite"),
    ({**FAST, "prompt": "x", "size": "99999x99999"}, "width", "multiples of 16 up to 256"),
    ({**FAST, "prompt": "x", "size": "250x64"}, "width", "multiples of 16 up to 256"),
    ({**FAST, "prompt": "x", "frames": 100001}, "frames", "4n+1 up to 33"),
    ({**FAST, "prompt": "x", "steps": 10**30}, "steps", "1..400"),
    ({**FAST, "prompt": "nul \x00 in the prompt"}, "prompt", "tab, newline"),
    ({**FAST, "prompt": "x", "negative_prompt": "bell \x07"}, "negative_prompt", "tab, newline"),
    ({**FAST, "prompt": "x", "negative_prompt": "n" * 5000}, "negative_prompt", "at most 4000"),
])
def test_refusals_name_the_field_and_a_range_within_the_servers_limits(app, body, param, allowed):
    client, service = app
    before = total(service)
    r = post_json(client, "/api/jobs", body)
    assert r.status_code == 400, r.text
    err = strict(r.text)["error"]
    assert err["param"] == param and allowed in (err["allowed"] or "") + err["message"], err
    assert total(service) == before


def test_size_hints_never_exceed_the_servers_limit(app):
    """250 is not a multiple of 16; the model's nearest valid sizes are 240 and 256, both within the limit of 256;
    254 would suggest 256 but nothing above it."""
    client, _ = app
    err = strict(post_json(client, "/api/jobs", {**FAST, "prompt": "x", "size": "250x64"}).text)["error"]
    assert "nearest valid: 240, 256" in err["message"]
    err = strict(post_json(client, "/api/jobs", {**FAST, "prompt": "x", "size": "99999x64"}).text)["error"]
    assert "over this server's limit" in err["message"] and "99968" not in err["message"] + err["allowed"]


def test_negative_seconds_are_refused_for_being_negative(app):
    client, _ = app
    for seconds in ("-1", -1, "0", 0):
        r = post_json(client, "/v1/videos", {"prompt": "x", "seconds": seconds})
        err = strict(r.text)["error"]
        assert r.status_code == 400 and err["param"] == "seconds", r.text
        assert "must be positive" in err["message"] and "not a whole number" not in err["message"], err
    for seconds in ("nan", "inf", float("nan")):
        r = post_json(client, "/v1/videos", {"prompt": "x", "seconds": seconds})
        assert r.status_code == 400 and strict(r.text)["error"]["param"] == "seconds", r.text


def test_an_undecodable_upload_is_described_without_python_object_addresses(app):
    client, service = app
    before = total(service)
    for payload in (b"this is not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, b"GIF89a" + b"\0" * 40):
        r = client.post("/api/jobs", data={"model": "tiny-i2v-moe", "prompt": "x"},
                        files={"image": ("x.png", payload, "image/png")})
        err = strict(r.text)["error"]
        assert r.status_code == 400 and err["param"] == "image", r.text
        assert " at 0x" not in err["message"] and "BytesIO" not in err["message"], err
    assert total(service) == before


def test_huge_and_deep_json_is_a_400_not_a_500(app):
    client, _ = app
    for raw in (b'{"model": "tiny-t2v-moe", "prompt": "x", "steps": ' + b"9" * 5000 + b"}", b"[" * 100_000):
        r = client.post("/api/jobs", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and strict(r.text)["error"]["param"] == "body", r.text


def test_openapi_and_docs_are_public_as_documented_the_rest_needs_the_token(app):
    client, _ = app
    from artifex.serve.app import PUBLIC_ROUTES

    assert {"/openapi.json", "/docs", "/redoc", "/healthz", "/readyz", "/api/info"} <= set(PUBLIC_ROUTES)
    for path in ("/openapi.json", "/docs", "/redoc", "/healthz", "/api/info"):
        assert client.get(path, headers={"Authorization": ""}).status_code == 200, path
    doc = client.get("/openapi.json").json()
    assert "/openapi.json" in doc["info"]["description"]  # the document says which routes are public
    for path in ("/api/jobs", "/api/models", "/metrics", "/v1/videos", "/api/workers"):
        assert client.get(path, headers={"Authorization": ""}).status_code == 401, path


def test_retry_after_comes_from_measured_job_times_per_model_and_workers(app, tmp_path):
    """A queue of 10 jobs of a model whose recent jobs took 11 s each, on one worker: about 110 s, whatever the
    other models' jobs took (the old estimate mixed every model's mean and divided by every worker)."""
    client, _ = app
    serve = ServeSettings(models=("tiny-t2v-moe", "tiny-ti2v"), data_dir=tmp_path / "data", max_queue=10,
                          warmup=False)
    service = Service(serve, OptimizationConfig(), None)
    try:
        store = service.store

        def ran(model: str, seconds: float) -> None:
            job, _ = store.submit(model=model, request={}, settings={}, warnings=[], image=None, dedup_key=None,
                                  api="artifex", max_queue=100)
            store.claim(model)
            store.finish(job.id, "succeeded")
            store._db.execute("UPDATE jobs SET started_at = 1000.0, finished_at = ? WHERE id = ?",
                              (1000.0 + seconds, job.id))

        for _ in range(3):
            ran("tiny-t2v-moe", 11.0)
        ran("tiny-ti2v", 300.0)  # a slow model with nothing queued does not slow the estimate
        for _ in range(10):
            store.submit(model="tiny-t2v-moe", request={}, settings={}, warnings=[], image=None, dedup_key=None,
                         api="artifex", max_queue=100)
        assert service.retry_after() == 110
        r = TestClient(create_app(service), base_url="http://127.0.0.1").post("/api/jobs", json={**FAST, "prompt": "one too many"})
        assert r.status_code == 429 and r.headers["retry-after"] == "110", r.text
        assert "110 s" in strict(r.text)["error"]["message"]
        assert store.queue_depth() == 10
    finally:
        service.store.close()


# -- property-based: any body gets a 2xx or a 4xx ------------------------------------------------------
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=1),
)
EDGE_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 5e-324, 1e308, -1.0, 1e6])
# A value that should be accepted, and values on or past the edges of what is allowed, per field.
VALID = {
    "width": st.sampled_from([64, 128, 160]), "height": st.sampled_from([64, 96]),
    "frames": st.sampled_from([1, 5, 9, 17]), "steps": st.integers(1, 6),
    "guidance": st.floats(0, 10), "guidance_low": st.floats(0, 10), "shift": st.floats(0.5, 20),
    "seed": st.integers(0, 2**32 - 1), "negative_prompt": st.sampled_from(["blurry", "é 漢字"]),
    "preset": st.sampled_from(["draft", "preview"]), "size": st.sampled_from(["128x64", "64x128"]),
}
EDGES = {
    "width": st.integers(-300, 20000), "height": st.integers(-300, 20000), "frames": st.integers(-5, 200_000),
    "steps": st.integers(-5, 10**6), "guidance": EDGE_FLOATS, "guidance_low": EDGE_FLOATS, "shift": EDGE_FLOATS,
    "seed": st.integers(-(2**70), 2**70), "negative_prompt": st.text(max_size=20),
    "preset": st.sampled_from(["production", "cinema", "ultra", ""]),
    "size": st.one_of(st.sampled_from(["99999x99999", "0x0", "big", "-64x64", "1e3x64"]), st.text(max_size=10)),
    "model": st.sampled_from([*MODELS, "t2v-a14b", "nope", " TINY-TI2V "]),
    "prompt": st.one_of(st.sampled_from(["a kite", "  ", "", "nul\x00", "é 漢字"]), st.text(max_size=20)),
}


def bodies(names: list[str], seconds: bool = False) -> st.SearchStrategy:
    """Bodies of two kinds. Near-valid ones: a served model, a plain prompt, valid values for some other fields and
    one field on or past an edge (NaN, infinities, huge, negative), so that this one value decides the answer. And
    anything: every field optional, of its kind or not."""
    valid = {k: VALID[k] for k in names if k in VALID}
    edges = {k: EDGES[k] for k in names if k in EDGES}
    if seconds:
        valid["seconds"] = st.sampled_from(["0.25", "0.5", 0.25])
        edges["seconds"] = st.one_of(st.sampled_from(["-1", "0", "nan", "inf", "10", "1e309"]), EDGE_FLOATS)
    others = {k: v for k, v in valid.items() if k not in ("width", "height", "size")}  # sizes: one way at a time

    def near(bad: str) -> st.SearchStrategy:
        fixed = {"model": st.sampled_from(MODELS[:2]), "prompt": st.just("a kite"), bad: edges[bad]}
        if bad in ("width", "height"):
            fixed["height" if bad == "width" else "width"] = valid["height" if bad == "width" else "width"]
        return st.fixed_dictionaries(fixed, optional={k: v for k, v in others.items() if k not in fixed})

    near_valid = st.sampled_from(sorted(k for k in edges if k not in ("model", "prompt"))).flatmap(near)
    anything = st.fixed_dictionaries({}, optional={k: st.one_of(valid.get(k, v), v, JUNK) for k, v in edges.items()})
    return st.one_of(near_valid, near_valid, anything)


NATIVE = bodies(["model", "prompt", "negative_prompt", "preset", "size", "width", "height", "frames", "steps",
                 "guidance", "guidance_low", "shift", "seed"])
OPENAI = bodies(["model", "prompt", "negative_prompt", "preset", "size", "steps", "guidance", "guidance_low",
                 "shift", "seed"], seconds=True)


@PROPERTY
@given(body=NATIVE, extra=st.dictionaries(st.sampled_from(["bogus", "output", "image", "audio", "pose_video"]), JUNK,
                                         max_size=1))
def test_property_native_json_bodies_get_2xx_or_4xx_and_refusals_store_nothing(app, body, extra):
    client, service = app
    before = total(service)
    check_answer(service, post_json(client, "/api/jobs", {**body, **extra}), before)


@PROPERTY
@given(body=NATIVE)
def test_property_native_form_bodies_get_2xx_or_4xx_and_refusals_store_nothing(app, body):
    client, service = app
    before = total(service)
    form = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in body.items()}
    check_answer(service, client.post("/api/jobs", data=form), before)


@PROPERTY
@given(body=OPENAI, as_form=st.booleans())
def test_property_openai_bodies_get_2xx_or_4xx_and_refusals_store_nothing(app, body, as_form):
    client, service = app
    before = total(service)
    if as_form:
        r = client.post("/v1/videos", data={k: (v if isinstance(v, str) else json.dumps(v)) for k, v in body.items()})
    else:
        r = post_json(client, "/v1/videos", body)
    out = check_answer(service, r, before)
    if r.status_code < 400:
        assert out["object"] == "video"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=NATIVE, width=st.integers(1, 300), height=st.integers(1, 300))
def test_property_uploads_get_2xx_or_4xx(app, body, width, height):
    client, service = app
    before = total(service)
    form = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in body.items() if k != "image"}
    r = client.post("/api/jobs", data=form, files={"image": ("i.png", png_bytes(width, height), "image/png")})
    check_answer(service, r, before)


def test_a_valid_body_is_stored_with_finite_values(app):
    client, service = app
    before = total(service)
    r = post_json(client, "/api/jobs", {**FAST, "prompt": "a kite", "guidance": 4.5, "shift": 7, "seed": 1})
    assert r.status_code == 201, r.text
    job = strict(r.text)
    assert job["settings"]["guidance"] == [4.5, 3.0] and job["settings"]["shift"] == 7
    assert math.isfinite(job["settings"]["shift"]) and total(service) == before + 1
    service.delete(job["id"])


def test_monitor_shows_step_counts_only_for_denoising():
    """The bar is the job's overall percent; a step count beside it is the denoising steps, not a stage's 0/1."""
    from artifex.serve.monitor import render

    def line(progress: dict) -> str:
        snap = {"samples": [], "ready": {"models": {}}, "queued": [], "queued_total": 0,
                "running": [{"id": "video_1", "model": "tiny-ti2v", "progress": progress, "eta_s": 1.0}]}
        return next(x for x in render("http://x", snap).splitlines() if "video_1" in x)

    decode = line({"stage": "decode", "step": 0, "total": 1, "percent": 92.0})
    assert "92.0%" in decode and "0/1" not in decode
    denoise = line({"stage": "denoise", "step": 3, "total": 40, "percent": 11.4})
    assert "step 3/40" in denoise


def test_the_job_list_counts_every_state_beyond_its_page(app):
    """The page's table shows the newest jobs only; the list says how many there are of each state."""
    client, service = app
    ids = [strict(post_json(client, "/api/jobs", {**FAST, "prompt": f"job {i}"}).text)["id"] for i in range(3)]
    try:
        service.cancel(ids[0])
        page = client.get("/api/jobs?limit=1").json()
        assert len(page["jobs"]) == 1 and page["total"] == sum(page["counts"].values())
        assert page["counts"]["queued"] >= 2 and page["counts"]["cancelled"] >= 1
        assert set(page["counts"]) == {"queued", "running", "succeeded", "failed", "cancelled", "expired"}
        assert client.get("/api/jobs?limit=1&model=tiny-ti2v").json()["counts"]["queued"] == 0
    finally:
        for job_id in ids:
            service.delete(job_id)


# -- S2V uploads: audio and pose video ------------------------------------------------------------------
S2V_MODELS = ("tiny-s2v", "tiny-ti2v")
MEDIA_CAP = 200_000  # bytes; a 2 s wav at 16 kHz mono is 64 kB, at 44.1 kHz stereo 353 kB


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, bytes]:
    from tests.media_support import write_video, write_wav

    d = tmp_path_factory.mktemp("serve-media")
    write_wav(d / "speech.wav", 2.0, rate=16000, channels=1)  # one clip
    write_wav(d / "big.wav", 2.0)  # over MEDIA_CAP
    write_wav(d / "long.wav", 5.0, rate=8000, channels=1)  # over the 4 s cap below, under MEDIA_CAP
    write_wav(d / "blip.wav", 0.01, rate=16000, channels=1)  # 160 samples: under one wav2vec2 frame
    write_video(d / "pose.mp4", 20, 64, 64)
    (d / "playlist.m3u8").write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\n{d / 'speech.wav'}\n"
                                     "#EXT-X-ENDLIST\n")
    return {p.stem: p.read_bytes() for p in d.iterdir()}


@pytest.fixture(scope="module")
def s2v_app(tmp_path_factory, artifex_home):
    data = tmp_path_factory.mktemp("serve-s2v") / "data"
    serve = ServeSettings(models=S2V_MODELS, data_dir=data, max_media_bytes=MEDIA_CAP, max_audio_seconds=4,
                          max_frames=157, warmup=False)
    service = Service(serve, OptimizationConfig(), TOKEN)
    client = TestClient(create_app(service), headers={"Authorization": f"Bearer {TOKEN}"})
    yield client, service
    client.close()
    service.store.close()


def data_url(data: bytes, kind: str) -> str:
    import base64

    return f"data:{kind};base64," + base64.b64encode(data).decode()


def uploads(service) -> list[str]:
    return sorted(p.name for p in service.settings.uploads_dir.iterdir())


def test_s2v_audio_and_pose_uploads_are_checked_stored_by_content_and_kept_while_the_job_lives(s2v_app, media):
    import hashlib

    from artifex.serve.worker import request_fields

    client, service = s2v_app
    png = png_bytes(160, 96)
    sha = {k: hashlib.sha256(v).hexdigest() for k, v in media.items()}
    r = client.post("/api/jobs", data={"model": "tiny-s2v", "prompt": "hello there"},
                    files={"image": ("face.png", png, "image/png"), "audio": ("speech.wav", media["speech"])})
    assert r.status_code == 201, r.text
    multipart = strict(r.text)
    assert multipart["audio_sha256"] == sha["speech"] and multipart["pose_video_sha256"] is None
    s = multipart["settings"]
    assert (s["audio_seconds"], s["clips"], s["frames"]) == (2.0, 1, 77)  # the video follows the audio
    assert str(service.settings.data_dir) not in r.text  # no server path in the answer
    assert not {"audio", "pose_video", "image"} & set(s)

    # JSON data: URLs, a pose video too; the audio's bytes are the same file as the first job's
    r = client.post("/api/jobs", json={"model": "tiny-s2v", "prompt": "hello again", "image": data_url(png, "image/png"),
                                       "audio": data_url(media["speech"], "audio/wav"),
                                       "pose_video": data_url(media["pose"], "video/mp4")})
    assert r.status_code == 201, r.text
    posed = strict(r.text)
    assert posed["audio_sha256"] == sha["speech"] and posed["pose_video_sha256"] == sha["pose"]
    assert uploads(service) == sorted([f"{sha['speech']}.wav", f"{sha['pose']}.mp4", f"{posed['image_sha256']}.png"])

    # what the worker hands the engine: the stored files, by path, as the request's audio and pose video
    job = service.store.get(posed["id"])
    assert (job.audio, job.pose_video) == (f"{sha['speech']}.wav", f"{sha['pose']}.mp4")
    fields = request_fields(job, service.settings)
    assert fields["audio"] == str(service.settings.uploads_dir / job.audio)
    assert fields["pose_video"] == str(service.settings.uploads_dir / job.pose_video)

    # a restart: a job interrupted while running is queued again, and the start-up sweep keeps what it needs
    assert service.store.claim("tiny-s2v").id == multipart["id"]
    (service.settings.uploads_dir / ".check-leftover").write_bytes(b"a crash mid-check")
    assert service.store.recover(max_attempts=3)["requeued"] == [multipart["id"]]
    service._sweep_files()
    assert uploads(service) == sorted([f"{sha['speech']}.wav", f"{sha['pose']}.mp4", f"{posed['image_sha256']}.png"])
    assert request_fields(service.store.get(multipart["id"]), service.settings)["audio"] == fields["audio"]

    # the shared audio stays until its last job is gone
    service.delete(posed["id"])
    assert uploads(service) == sorted([f"{sha['speech']}.wav", f"{multipart['image_sha256']}.png"])
    service.delete(multipart["id"])
    assert uploads(service) == []


def test_s2v_seconds_are_whole_clips_at_the_openai_door(s2v_app, media):
    client, service = s2v_app
    body = {"model": "tiny-s2v", "prompt": "x", "input_reference": {"image_url": data_url(png_bytes(), "image/png")},
            "audio": data_url(media["speech"], "audio/wav")}
    r = client.post("/v1/videos", json={**body, "seconds": "4.75"})  # 77 frames: one clip
    assert r.status_code == 200, r.text
    assert strict(r.text)["seconds"] == "4.75"
    service.delete(strict(r.text)["id"])
    before = total(service)
    r = client.post("/v1/videos", json={**body, "seconds": "5"})
    err = strict(r.text)["error"]
    assert r.status_code == 400 and err["param"] == "seconds" and "4.75 + 5n" in err["allowed"], err
    r = client.post("/v1/videos", json={**body, "seconds": "9.75"})  # two clips: longer than the audio
    err = strict(r.text)["error"]
    assert r.status_code == 400 and err["param"] == "seconds" and "the audio (2.0 s) makes 1" in err["message"], err
    assert total(service) == before and uploads(service) == []


def _s2v_refusals(media: dict[str, bytes]) -> list[tuple]:
    png = ("face.png", png_bytes(), "image/png")
    s2v = {"model": "tiny-s2v", "prompt": "x"}
    wav = ("speech.wav", media["speech"])
    return [  # (path, form fields, files, JSON body, status, param, in allowed or message)
        ("/api/jobs", s2v, {"image": png}, None, 400, "audio", "wav, mp3"),
        ("/api/jobs", s2v, {"audio": wav}, None, 400, "image", "reference image"),
        ("/api/jobs", {"model": "tiny-ti2v", "prompt": "x"}, {"audio": wav}, None, 400, "audio",
         "models served here that do: tiny-s2v"),
        ("/api/jobs", {"model": "tiny-ti2v", "prompt": "x"}, {"pose_video": ("p.mp4", media["pose"])}, None, 400,
         "pose_video", "tiny-s2v"),
        ("/api/jobs", s2v, {"image": png, "audio": ("a.wav", b"RIFF\x00\x00 not really a wave file")}, None, 400,
         "audio", "wav, mp3"),
        ("/api/jobs", s2v, {"image": png, "audio": ("a.wav", png_bytes())}, None, 400, "audio",
         "outside the list"),  # an image: PyAV would open it (png_pipe), the demuxer list does not
        ("/api/jobs", s2v, {"image": png, "audio": ("a.m3u8", media["playlist"])}, None, 400, "audio", "wav"),
        ("/api/jobs", s2v, {"image": png, "audio": ("a.wav", b"")}, None, 400, "audio", "empty"),
        ("/api/jobs", s2v, {"image": png, "audio": ("a.wav", media["big"])}, None, 413, "audio",
         f"at most {MEDIA_CAP} bytes"),
        ("/api/jobs", s2v, {"image": png, "audio": ("a.wav", media["long"])}, None, 400, "audio", "at most 4 s"),
        ("/api/jobs", s2v, {"image": png, "audio": ("a.wav", media["blip"])}, None, 400, "audio", "at least 400"),
        ("/api/jobs", s2v, {"image": png, "audio": ("p.mp4", media["pose"])}, None, 400, "audio",
         "no audio stream"),
        ("/api/jobs", s2v, {"image": png, "audio": wav, "pose_video": ("p.mp4", media["speech"])}, None, 400,
         "pose_video", "mp4/mov"),
        ("/api/jobs", s2v, {"image": png, "audio": wav, "soundtrack": ("s.wav", media["speech"])}, None, 400,
         "soundtrack", "image, audio, pose_video"),
        ("/api/jobs", None, None, {**s2v, "image": data_url(png_bytes(), "image/png"), "audio": "/etc/passwd"}, 400,
         "audio", "data:audio/...;base64"),
        ("/api/jobs", None, None, {**s2v, "image": data_url(png_bytes(), "image/png"),
                                   "audio": "https://example.com/a.wav"}, 400, "audio", "data:audio"),
        ("/api/jobs", None, None, {**s2v, "image": data_url(png_bytes(), "image/png"), "audio": "data:audio/wav,x"},
         400, "audio", "base64-encoded"),
        ("/v1/videos", s2v, {"audio": wav}, None, 400, "input_reference", "reference image"),
        ("/v1/videos", {"model": "tiny-ti2v", "prompt": "x"}, {"audio": wav}, None, 400, "audio", "tiny-s2v"),
    ]


def test_s2v_refusals_name_the_field_and_what_would_work(s2v_app, media):
    client, service = s2v_app
    before = total(service)
    for path, form, files, body, status, param, hint in _s2v_refusals(media):
        r = client.post(path, data=form, files=files) if body is None else client.post(path, json=body)
        assert r.status_code == status, (path, form, list(files or body), r.text)
        err = strict(r.text)["error"]
        assert err["param"] == param, (list(files or body), err)
        assert hint in (err["allowed"] or "") + err["message"], (list(files or body), err)
        assert str(service.settings.data_dir) not in r.text and ".check-" not in r.text, err
    assert total(service) == before and uploads(service) == []  # refused uploads leave nothing behind


def test_media_limits_are_server_settings_within_what_the_engine_reads(tmp_path):
    from artifex.errors import InvalidRequestError
    from artifex.models.s2v.audio import DEFAULT_MAX_SECONDS
    from artifex.serve.settings import ENGINE_MAX_AUDIO_SECONDS

    assert ENGINE_MAX_AUDIO_SECONDS == DEFAULT_MAX_SECONDS
    base = ServeSettings(models=("tiny-s2v",), data_dir=tmp_path)
    assert base.merged({"max_media_bytes": "2M"}).max_media_bytes == 2 * 2**20
    assert {"max_media_bytes", "max_audio_seconds"} <= set(base.limits())
    with pytest.raises(InvalidRequestError, match="max_audio_seconds: 601 is over the 600 s"):
        base.merged({"max_audio_seconds": 601})
    with pytest.raises(InvalidRequestError, match="max_media_bytes: must be a positive integer"):
        base.merged({"max_media_bytes": 0})


def test_a_jobs_table_of_an_older_server_gains_the_upload_columns(tmp_path):
    import sqlite3

    from artifex.serve.jobs import _SCHEMA, JobStore

    old = _SCHEMA.replace(",\n    audio TEXT,\n    pose_video TEXT", "")
    assert "audio" not in old
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    db.executescript(old)
    db.execute("INSERT INTO jobs (id, model, state, request, settings, created_at) VALUES "
               "('video_old', 'tiny-ti2v', 'queued', '{}', '{}', 1.0)")
    db.commit()
    db.close()
    store = JobStore(tmp_path / "jobs.sqlite3")
    try:
        assert store.get("video_old").audio is None and store.active_uploads() == set()
        job, _ = store.submit(model="tiny-s2v", request={}, settings={}, warnings=[], image="i.png", dedup_key=None,
                              api="artifex", max_queue=5, audio="a.wav", pose_video="p.mp4")
        assert (job.audio, job.pose_video) == ("a.wav", "p.mp4") and store.upload_in_use("a.wav")
        assert store.active_uploads() == {"i.png", "a.wav", "p.mp4"}
    finally:
        store.close()


MEDIA_MAGIC = [b"", b"RIFF\x24\x00\x00\x00WAVEfmt ", b"ID3\x03\x00", b"fLaC", b"OggS\x00\x02", b"\x00\x00\x00\x18ftypM4A ",
               b"\x1aE\xdf\xa3", b"#EXTM3U\n", b"ffconcat version 1.0\nfile ", b"\xff\xfb\x90\x00"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(magic=st.sampled_from(MEDIA_MAGIC), tail=st.binary(max_size=3000), field=st.sampled_from(["audio", "pose_video"]))
def test_property_media_uploads_of_any_bytes_get_2xx_or_4xx_and_leave_nothing(s2v_app, media, magic, tail, field):
    """Bytes that look like the start of a media file (or a playlist) and mostly are not one: a 4xx naming the field
    (or a 2xx, should they decode), never a 5xx, nothing kept of a refusal, no temporary file left."""
    client, service = s2v_app
    before = total(service)
    files = {"image": ("i.png", png_bytes(), "image/png"), "audio": ("a.wav", media["speech"]), field: ("x", magic + tail)}
    r = client.post("/api/jobs", data={"model": "tiny-s2v", "prompt": "x"}, files=files)
    body = check_answer(service, r, before)
    if r.status_code >= 400:
        assert body["error"]["param"] == field, body
    assert uploads(service) == []
