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
@given(body=NATIVE, extra=st.dictionaries(st.sampled_from(["bogus", "output", "image"]), JUNK, max_size=1))
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
