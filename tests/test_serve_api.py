"""``artifex serve`` end to end: a real server process on a loopback port with tiny models.

Submit -> progress events -> playable mp4 (range requests too), uploads, de-duplication,
cancel, every bad input, the OpenAI Videos shape, metrics, ``artifex monitor`` and ``artifex submit``, the
OpenAPI document, auth and origin rules, and the web page in headless Chromium. One
speech-to-video job (tiny-s2v: audio and a reference image in, an mp4 with sound out) is
shared by the tests that need one (``s2v_job``).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from media_support import write_wav
from PIL import Image
from serve_support import Server, frame_count

MODELS = ["tiny-t2v-moe", "tiny-ti2v", "tiny-i2v-moe", "tiny-s2v"]
# 77 frames: one tiny-s2v clip
LIMITS = ["--max-steps", "400", "--max-frames", "77", "--max-width", "256", "--max-height", "256",
          "--max-upload-mb", "0.25", "--max-queue", "50"]
MEDIA_CAP = 200_000  # bytes of audio or pose video ([serve] max_media_bytes)
FAST = {"model": "tiny-t2v-moe", "size": "128x64", "frames": 9, "steps": 4}


@pytest.fixture(scope="module")
def server(tmp_path_factory, artifex_home):
    data = tmp_path_factory.mktemp("serve-api") / "data"
    config = data.parent / "serve.toml"
    config.write_text(f"[serve]\nmax_media_bytes = {MEDIA_CAP}\n")
    srv = Server(data, MODELS, [*LIMITS, "--config", str(config)])
    srv.start()
    yield srv
    srv.stop()


def png_bytes(width: int = 160, height: int = 96) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // width, y * 255 // height, ((x // 8 + y // 8) % 2) * 200], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(tmp: Path, seconds: float, **kw) -> bytes:
    write_wav(tmp / "speech.wav", seconds, **kw)
    return (tmp / "speech.wav").read_bytes()


def data_url(data: bytes, kind: str) -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


# The speech-to-video request both the API test and the page send: the page's form fields, its default size (the
# 160x96 image's aspect in tiny-s2v's area: 128x64), 2 s of audio (one clip: 77 frames), a seed (so that the same
# request again is the same job).
S2V_FORM = {"model": "tiny-s2v", "prompt": "a person says hello", "steps": "2", "seed": "23"}


@pytest.fixture(scope="module")
def s2v_media(tmp_path_factory) -> dict[str, bytes]:
    return {"image": png_bytes(160, 96), "audio": wav_bytes(tmp_path_factory.mktemp("s2v"), 2.0, rate=16000,
                                                            channels=1)}


@pytest.fixture(scope="module")
def s2v_job(server, s2v_media) -> dict:
    """The one tiny-s2v generation of this module: a multipart upload of the image and the audio, run to the end."""
    r = server.post("/api/jobs", data=S2V_FORM, files={"image": ("face.png", s2v_media["image"], "image/png"),
                                                       "audio": ("speech.wav", s2v_media["audio"], "audio/wav")})
    assert r.status_code == 201, r.text
    job = r.json()
    done = server.wait_job(job["id"], timeout=600)
    assert done["state"] == "succeeded", done
    return done


def error_of(r) -> dict:
    assert r.headers["content-type"].startswith("application/json"), (r.status_code, r.text)
    return r.json()["error"]


# -- auth --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_token_is_generated_stored_and_required(server):
    token_file = server.data_dir / "api_token"
    assert token_file.exists() and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 32 and token in server.log()  # printed on the first start
    assert server.get("/healthz", auth=False).json() == {"status": "ok"}
    assert server.get("/readyz", auth=False).json()["ready"] is True
    assert server.get("/api/info", auth=False).json()["auth_required"] is True
    for method, path in [("GET", "/api/jobs"), ("POST", "/api/jobs"), ("GET", "/api/models"), ("GET", "/metrics"),
                         ("GET", "/v1/videos"), ("POST", "/v1/videos"), ("GET", "/api/jobs/video_x/video")]:
        r = server.request(method, path, auth=False, json={"model": "tiny-t2v-moe", "prompt": "x"})
        assert r.status_code == 401, (method, path, r.status_code)
        assert r.headers["www-authenticate"] == "Bearer"
        assert error_of(r)["code"] == "unauthorized"
        r = server.request(method, path, auth=False, headers={"Authorization": "Bearer " + "x" * 43})
        assert r.status_code == 401
    assert server.get("/api/jobs").status_code == 200


# -- the main path -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_submit_progress_events_and_playable_download_with_ranges(server, tmp_path):
    r = server.post("/api/jobs", json={**FAST, "prompt": "a red kite over a beach", "steps": 60})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] in ("queued", "running") and job["id"].startswith("video_")
    assert r.headers["location"] == f"/api/jobs/{job['id']}"
    assert job["settings"]["steps"] == 60 and job["settings"]["frames"] == 9

    events = server.events(job["id"])
    names = [n for n, _ in events]
    assert names[-1] == "done" and names.count("done") == 1
    assert events[-1][1]["state"] == "succeeded"
    denoise = [d["progress"] for n, d in events if n == "progress" and d["progress"]["stage"] == "denoise"]
    assert denoise, names  # live step progress arrived before the end
    steps = [p["step"] for p in denoise]
    assert steps == sorted(steps) and all(p["total"] == 60 for p in denoise)
    assert all(0 < p["percent"] <= 100 for p in denoise)

    done = server.get(f"/api/jobs/{job['id']}").json()
    assert done["state"] == "succeeded" and done["progress"]["percent"] == 100
    assert {"encode_text", "denoise", "decode", "write", "total"} <= set(done["timings"])
    assert done["attempts"] == 1 and done["error"] is None

    video = server.get(done["video_url"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert video.headers["accept-ranges"] == "bytes"
    assert frame_count(video.content, tmp_path) == (9, 128, 64)

    size = len(video.content)
    head = server.get(done["video_url"], headers={"Range": "bytes=0-99"})
    assert head.status_code == 206 and head.headers["content-range"] == f"bytes 0-99/{size}"
    tail = server.get(done["video_url"], headers={"Range": "bytes=100-"})
    assert tail.status_code == 206 and head.content + tail.content == video.content
    bad = server.get(done["video_url"], headers={"Range": f"bytes={size + 10}-"})
    assert bad.status_code == 416
    attach = server.get(done["video_url"] + "?download=true")
    assert attach.headers["content-disposition"].startswith("attachment")


@pytest.mark.slow
def test_image_uploads_multipart_and_data_url(server, tmp_path):
    png = png_bytes(160, 96)
    r = server.post("/api/jobs", data={"model": "tiny-i2v-moe", "prompt": "the picture comes alive", "steps": "3",
                                       "frames": "5"}, files={"image": ("photo.png", png, "image/png")})
    assert r.status_code == 201, r.text
    i2v = r.json()
    assert i2v["image_sha256"] and (i2v["settings"]["width"], i2v["settings"]["height"]) == (160, 96)
    url = "data:image/png;base64," + base64.b64encode(png_bytes(128, 80)).decode()
    r = server.post("/api/jobs", json={"model": "tiny-ti2v", "prompt": "a first frame", "steps": 2, "frames": 5,
                                       "image": url})
    assert r.status_code == 201, r.text
    ti2v = r.json()
    for job, shape in ((i2v, (5, 160, 96)), (ti2v, (5, 256, 160))):
        done = server.wait_job(job["id"])
        assert done["state"] == "succeeded", done
        assert frame_count(server.get(done["video_url"]).content, tmp_path) == shape
    # uploads are stored under server-chosen names and removed once no job needs them
    assert list((server.data_dir / "uploads").iterdir()) == []


@pytest.mark.slow
def test_identical_requests_with_a_seed_return_the_stored_result(server):
    body = {**FAST, "prompt": "a lighthouse in fog", "seed": 1234}
    first = server.post("/api/jobs", json=body)
    assert first.status_code == 201
    second = server.post("/api/jobs", json=body)
    assert second.status_code == 200 and second.json()["deduplicated"] is True
    assert second.json()["id"] == first.json()["id"]
    server.wait_job(first.json()["id"])
    third = server.post("/api/jobs", json={**body, "size": None, "width": 128, "height": 64})
    assert third.status_code == 200 and third.json()["id"] == first.json()["id"]  # same settings, spelled apart
    assert third.json()["state"] == "succeeded"
    other_seed = server.post("/api/jobs", json={**body, "seed": 1235})
    no_seed_1 = server.post("/api/jobs", json={k: v for k, v in body.items() if k != "seed"})
    no_seed_2 = server.post("/api/jobs", json={k: v for k, v in body.items() if k != "seed"})
    ids = {first.json()["id"], other_seed.json()["id"], no_seed_1.json()["id"], no_seed_2.json()["id"]}
    assert len(ids) == 4  # a different seed, or none given, is a new video
    for job_id in ids:
        assert server.wait_job(job_id)["state"] == "succeeded"


@pytest.mark.slow
def test_cancel_queued_and_running_jobs(server):
    slow = server.submit(model="tiny-t2v-moe", prompt="a long one", size="160x96", frames=17, steps=400, shift=1.0)
    queued = server.submit(**FAST, prompt="waits behind it")
    r = server.post(f"/api/jobs/{queued['id']}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"

    running = server.wait_job(slow["id"], states=("running",))
    while running["progress"]["stage"] != "denoise" or not running["progress"]["step"]:
        time.sleep(0.05)
        running = server.get(f"/api/jobs/{slow['id']}").json()
        assert running["state"] == "running", running
    assert running["eta_s"] is not None and running["progress"]["total"] == 400
    r = server.post(f"/api/jobs/{slow['id']}/cancel")
    assert r.status_code == 202 and r.json()["cancel_requested"] is True
    done = server.wait_job(slow["id"], timeout=60)
    assert done["state"] == "cancelled" and done["video_url"] is None
    events = server.events(slow["id"])
    assert events[-1][0] == "done" and events[-1][1]["state"] == "cancelled"
    for job_id in (slow["id"], queued["id"]):
        assert not (server.data_dir / "outputs" / f"{job_id}.mp4").exists()
        r = server.get(f"/api/jobs/{job_id}/video")
        assert r.status_code == 409 and error_of(r)["code"] == "video_not_ready"
        r = server.post(f"/api/jobs/{job_id}/cancel")
        assert r.status_code == 409 and error_of(r)["param"] == "job_id"
    # the worker lives on: the next job runs
    assert server.wait_job(server.submit(**FAST, prompt="after the cancel")["id"])["state"] == "succeeded"


# -- bad input -----------------------------------------------------------------------------------------
BAD_JSON = [
    ({"model": "wan9", "prompt": "x"}, 400, "model", "tiny-t2v-moe, tiny-ti2v, tiny-i2v-moe, tiny-s2v"),
    ({"model": "t2v-a14b", "prompt": "x"}, 400, "model", "tiny-t2v-moe"),  # known, but not served here
    ({"prompt": "x"}, 400, "model", "tiny-t2v-moe"),
    ({"model": "tiny-t2v-moe"}, 400, "prompt", None),
    ({"model": "tiny-t2v-moe", "prompt": "   "}, 400, "prompt", None),
    ({"model": "tiny-t2v-moe", "prompt": 5}, 400, "prompt", None),
    ({"model": 7, "prompt": "x"}, 400, "model", None),
    ({**FAST, "prompt": "x", "preset": "ultra"}, 400, "preset", "draft, preview, production, cinema, turbo"),
    ({**FAST, "prompt": "x", "size": "100x64"}, 400, "width", None),
    ({**FAST, "prompt": "x", "size": "big"}, 400, "size", None),
    ({**FAST, "prompt": "x", "frames": 10}, 400, "frames", None),
    ({**FAST, "prompt": "x", "frames": 81}, 400, "frames", "up to 77"),
    ({**FAST, "prompt": "x", "steps": 0}, 400, "steps", None),
    ({**FAST, "prompt": "x", "steps": 500, "shift": 1.0}, 400, "steps", "1..400"),  # the server's own limit
    ({**FAST, "prompt": "x", "steps": "many"}, 400, "steps", None),
    ({**FAST, "prompt": "x", "steps": 2.5}, 400, "steps", None),
    ({**FAST, "prompt": "x", "size": "512x64"}, 400, "width", "up to 256"),
    ({**FAST, "prompt": "x", "seed": -1}, 400, "seed", None),
    ({**FAST, "prompt": "x", "guidance": -3}, 400, "guidance", None),
    ({**FAST, "prompt": "x", "bogus": 1}, 400, "bogus", "model, prompt"),
    ({**FAST, "prompt": "x", "output": "/tmp/evil.mp4"}, 400, "output", None),
    ({**FAST, "prompt": "x", "image": "/etc/passwd"}, 400, "image", "data:image"),
    ({**FAST, "prompt": "x", "image": "data:image/png;base64,!!!"}, 400, "image", None),
    ({**FAST, "prompt": "x" * 5000}, 400, "prompt", "at most 4000"),
    ({"model": "tiny-i2v-moe", "prompt": "x", "steps": 2}, 400, "image", None),
    ({"model": "tiny-s2v", "prompt": "x", "image": "data:image/png;base64," + base64.b64encode(png_bytes()).decode()},
     400, "audio", "wav, mp3"),
    ({**FAST, "prompt": "x", "audio": "data:audio/wav;base64,UklGRg=="}, 400, "audio", "tiny-s2v"),
    ({"model": "tiny-s2v", "prompt": "x", "audio": "/etc/passwd"}, 400, "audio", "data:audio"),
]


@pytest.mark.slow
@pytest.mark.parametrize("body,status,param,allowed", BAD_JSON, ids=[f"{i}-{c[2]}" for i, c in enumerate(BAD_JSON)])
def test_bad_json_requests_are_4xx_naming_the_field(server, body, status, param, allowed):
    r = server.post("/api/jobs", json=body)
    assert r.status_code == status, r.text
    err = error_of(r)
    assert err["param"] == param, err
    assert err["message"]
    if allowed:
        assert allowed in (err["allowed"] or ""), err


@pytest.mark.slow
def test_bad_bodies_uploads_and_ids(server):
    before = server.get("/api/jobs?limit=1").json()["total"]
    cases = [
        (dict(data="{bad json", headers={"Content-Type": "application/json"}), 400, "body"),
        (dict(data="[1, 2]", headers={"Content-Type": "application/json"}), 400, "body"),
        (dict(data="", headers={"Content-Type": "application/json"}), 400, "body"),
        (dict(data="model=x", headers={"Content-Type": "text/plain"}), 415, "content-type"),
        (dict(data={"model": "tiny-i2v-moe", "prompt": "x"},
              files={"image": ("cat.png", b"this is not an image at all", "image/png")}), 400, "image"),
        (dict(data={"model": "tiny-i2v-moe", "prompt": "x"},
              files={"image": ("big.png", b"\x89PNG" + os.urandom(300_000), "image/png")}), 413, "image"),
        (dict(data={"model": "tiny-t2v-moe", "prompt": "x"},
              files={"image": ("p.png", png_bytes(), "image/png")}), 400, "image"),  # t2v takes no image
        (dict(data={"model": "tiny-i2v-moe", "prompt": "x"},
              files={"other": ("p.png", png_bytes(), "image/png")}), 400, "other"),
        (dict(data={**{k: str(v) for k, v in FAST.items()}, "prompt": "x", "steps": "abc"}), 400, "steps"),
        # speech-to-video: the audio is needed, checked, capped, and refused where a model takes none
        (dict(data={"model": "tiny-s2v", "prompt": "x"}, files={"image": ("p.png", png_bytes(), "image/png")}),
         400, "audio"),
        (dict(data={"model": "tiny-s2v", "prompt": "x"}, files={"image": ("p.png", png_bytes(), "image/png"),
                                                                 "audio": ("a.wav", b"RIFF junk, no wave", "audio/wav")}),
         400, "audio"),
        (dict(data={"model": "tiny-s2v", "prompt": "x"}, files={"image": ("p.png", png_bytes(), "image/png"),
                                                                 "audio": ("a.wav", os.urandom(MEDIA_CAP + 1))}),
         413, "audio"),
        (dict(data={"model": "tiny-ti2v", "prompt": "x"}, files={"audio": ("a.wav", b"RIFF", "audio/wav")}), 400,
         "audio"),
    ]
    for kw, status, param in cases:
        r = server.post("/api/jobs", **kw)
        assert r.status_code == status, (kw.get("data"), r.status_code, r.text)
        assert error_of(r)["param"] == param, (kw.get("data"), r.text)
    r = server.post("/api/jobs", data={"model": "tiny-i2v-moe", "prompt": "x"},
                    files={"image": ("a.txt", io.BytesIO(b"GIF89a" + b"\0" * 40), "text/plain")})
    assert r.status_code == 400 and error_of(r)["param"] == "image"

    for method, path in [("GET", "/api/jobs/video_nope"), ("GET", "/api/jobs/video_nope/video"),
                         ("GET", "/api/jobs/video_nope/events"), ("POST", "/api/jobs/video_nope/cancel"),
                         ("DELETE", "/api/jobs/video_nope"), ("GET", "/v1/videos/nope"),
                         ("GET", "/v1/videos/nope/content"), ("DELETE", "/v1/videos/nope"),
                         ("GET", "/api/jobs/" + "x" * 300)]:
        r = server.request(method, path)
        assert r.status_code == 404, (method, path, r.text)
        assert error_of(r)["param"] == "job_id"
    for path, param in [("/api/jobs?limit=0", "limit"), ("/api/jobs?limit=abc", "limit"),
                        ("/api/jobs?state=bogus", "state"), ("/v1/videos?order=sideways", "order")]:
        r = server.get(path)
        assert r.status_code == 400 and error_of(r)["param"] == param, (path, r.text)
    r = server.get("/no/such/route")
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    r = server.request("PUT", "/api/jobs")
    assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"
    assert server.get("/api/jobs?limit=1").json()["total"] == before  # nothing was queued by bad input
    assert server.get("/healthz").status_code == 200


# -- artifex submit: the terminal client -------------------------------------------------------------------
SUBMIT = ("import sys; from artifex.cli import main; rc = main(sys.argv[1:]); "
          "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(rc)")


def submit(server, *args: str, token: str | None = None) -> subprocess.CompletedProcess:
    """``artifex submit`` against the test server, as a process (token from ARTIFEX_API_TOKEN)."""
    env = {**os.environ, "ARTIFEX_API_TOKEN": server.token if token is None else token}
    return subprocess.run([sys.executable, "-c", SUBMIT, "submit", "--url", server.url(""), *args], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_submit_generates_on_the_server_and_downloads_the_mp4(server, tmp_path):
    """The image goes up as a data: URL, progress comes per stage, the mp4 lands where --output says and its path
    on stdout; the client never imports torch."""
    image = tmp_path / "cond.png"
    image.write_bytes(png_bytes(160, 96))
    out = tmp_path / "kite.mp4"
    p = submit(server, "--model", "tiny-ti2v", "--prompt", "a red kite", "--image", str(image), "--size", "160x96",
               "--frames", "9", "--steps", "3", "--seed", "5", "--output", str(out))
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [str(out), "no torch"]
    assert frame_count(out.read_bytes(), tmp_path) == (9, 160, 96)
    assert "queued on" in p.stderr and "denoise" in p.stderr
    assert re.search(r"succeeded: encode_text [\d.]+s, denoise [\d.]+s, decode [\d.]+s, write [\d.]+s", p.stderr)
    job_id = p.stderr.split()[0]
    job = server.get(f"/api/jobs/{job_id}").json()
    assert job["state"] == "succeeded" and job["image_sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert job["settings"]["steps"] == 3 and job["settings"]["seed"] == 5

    again = submit(server, "--model", "tiny-ti2v", "--prompt", "a red kite", "--image", str(image), "--size",
                   "160x96", "--frames", "9", "--steps", "3", "--seed", "5", "--no-wait")
    assert again.returncode == 0 and again.stdout.splitlines()[0] == job_id  # the same request: the stored job
    assert "identical earlier request" in again.stderr


@pytest.mark.slow
def test_ctrl_c_in_submit_cancels_the_job_on_the_server(server):
    import signal

    env = {**os.environ, "ARTIFEX_API_TOKEN": server.token}
    proc = subprocess.Popen([sys.executable, "-m", "artifex", "submit", "--url", server.url(""), "--model",
                             "tiny-t2v-moe", "--prompt", "a long one", "--size", "256x256", "--frames", "33", "--steps",
                             "80"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()  # "<id> queued on <url>"
        assert " queued on " in first, first + proc.stderr.read()
        job_id = first.split()[0]
        deadline = time.monotonic() + 120
        while server.get(f"/api/jobs/{job_id}").json()["progress"].get("stage") != "denoise":
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
        assert f"asked {server.url('')} to cancel {job_id}" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert server.wait_job(job_id, timeout=120)["state"] == "cancelled"


@pytest.mark.slow
def test_submit_names_what_the_server_refused(server, tmp_path):
    p = submit(server, "--model", "tiny-ti2v", "--prompt", "x", "--frames", "10")
    assert p.returncode == 2 and "frames" in p.stderr and "POST /api/jobs: 400" in p.stderr, p.stderr
    p = submit(server, "--model", "tiny-t2v-moe", "--prompt", "x", "--steps", "400")  # allowed: said once
    assert p.returncode == 2 and p.stderr.count("at most 84 at this shift") == 1, p.stderr
    p = submit(server, "--model", "tiny-ti2v", "--prompt", "x", token="y" * 43)
    assert p.returncode == 2 and "401 unauthorized: give the server's API token" in p.stderr
    p = submit(server, "--model", "tiny-ti2v", "--prompt", "x", "--image", str(tmp_path / "missing.png"))
    assert p.returncode == 2 and "image: cannot read" in p.stderr
    p = subprocess.run([sys.executable, "-m", "artifex", "submit", "--url", "http://127.0.0.1:9", "--model",
                        "tiny-ti2v", "--prompt", "x"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "cannot reach http://127.0.0.1:9" in p.stderr


# -- speech-to-video ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_audio_uploads_multipart_and_data_url_make_an_mp4_with_sound(server, s2v_job, s2v_media, tmp_path):
    import av

    sha = hashlib.sha256(s2v_media["audio"]).hexdigest()
    assert s2v_job["audio_sha256"] == sha and s2v_job["image_sha256"]
    s = s2v_job["settings"]
    assert (s["audio_seconds"], s["clips"], s["frames"], s["width"], s["height"]) == (2.0, 1, 77, 128, 64)
    assert str(server.data_dir) not in json.dumps(s2v_job)  # no server path in what clients see
    video = server.get(s2v_job["video_url"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    (tmp_path / "s2v.mp4").write_bytes(video.content)
    with av.open(str(tmp_path / "s2v.mp4")) as c:
        kinds = {st.type: st for st in c.streams}
        assert set(kinds) == {"video", "audio"}
        assert kinds["audio"].codec_context.name == "aac"
        assert kinds["video"].codec_context.width == 128 and kinds["video"].frames == 77
        assert sum(f.samples for f in c.decode(audio=0)) > 0  # the audio track holds sound

    # the same request as data: URLs (native JSON and the OpenAI door): the same bytes, so the same job
    body = {**S2V_FORM, "steps": 2, "seed": 23, "image": data_url(s2v_media["image"], "image/png"),
            "audio": data_url(s2v_media["audio"], "audio/wav")}
    r = server.post("/api/jobs", json=body)
    assert r.status_code == 200 and r.json()["id"] == s2v_job["id"] and r.json()["deduplicated"] is True, r.text
    openai_body = {k: v for k, v in body.items() if k != "image"}
    r = server.post("/v1/videos", json={**openai_body, "input_reference": {"image_url": body["image"]}})
    assert r.status_code == 200 and r.json()["id"] == s2v_job["id"], r.text
    assert r.json()["status"] == "completed" and r.json()["seconds"] == "4.75"  # 77 frames at 16 fps
    # the uploads went once the job was done; the repeated ones were never kept
    assert list((server.data_dir / "uploads").iterdir()) == []

    models = {m["name"]: m for m in server.get("/api/models").json()["models"]}
    assert (models["tiny-s2v"]["audio"], models["tiny-s2v"]["pose_video"]) == ("required", "optional")
    assert models["tiny-s2v"]["clip_frames"] == [77, 80] and models["tiny-ti2v"]["audio"] == "none"
    assert server.get("/api/models").json()["limits"]["max_media_bytes"] == MEDIA_CAP


# -- the OpenAI Videos API shape -------------------------------------------------------------------------
@pytest.mark.slow
def test_openai_videos_api(server, tmp_path):
    r = server.post("/v1/videos", json={"model": "tiny-t2v-moe", "prompt": "a paper boat", "seconds": "0.5",
                                        "size": "128x64", "steps": 3})
    assert r.status_code == 200, r.text
    video = r.json()
    assert video["object"] == "video" and video["status"] in ("queued", "in_progress")
    assert video["size"] == "128x64" and video["seconds"] == "0.5" and video["model"] == "tiny-t2v-moe"
    assert isinstance(video["created_at"], int) and video["error"] is None

    done = server.wait_job(video["id"], states=("completed", "failed"), path="/v1/videos/{}", key="status")
    assert done["status"] == "completed" and done["progress"] == 100 and done["completed_at"] >= done["created_at"]
    content = server.get(f"/v1/videos/{video['id']}/content")
    assert content.status_code == 200 and frame_count(content.content, tmp_path) == (9, 128, 64)  # 0.5 s * 16 + 1
    ranged = server.get(f"/v1/videos/{video['id']}/content", headers={"Range": "bytes=0-9"})
    assert ranged.status_code == 206 and len(ranged.content) == 10
    r = server.get(f"/v1/videos/{video['id']}/content?variant=thumbnail")
    assert r.status_code == 400 and error_of(r)["param"] == "variant"

    r = server.post("/v1/videos", data={"model": "tiny-i2v-moe", "prompt": "from a photo", "steps": "2",
                                        "seconds": "0.25"},
                    files={"input_reference": ("ref.png", png_bytes(96, 160), "image/png")})
    assert r.status_code == 200, r.text
    portrait = server.wait_job(r.json()["id"], states=("completed", "failed"), path="/v1/videos/{}", key="status")
    assert portrait["status"] == "completed" and portrait["size"] == "96x160"

    # the default model is the first one served; OpenAI's own names are refused clearly
    r = server.post("/v1/videos", json={"prompt": "x", "model": "sora-2"})
    assert r.status_code == 400 and error_of(r)["param"] == "model" and "tiny-t2v-moe" in error_of(r)["allowed"]
    r = server.post("/v1/videos", json={"prompt": "x", "seconds": "0.3"})
    assert r.status_code == 400 and error_of(r)["param"] == "seconds"
    r = server.post("/v1/videos", json={"prompt": "x", "seconds": "10", "size": "128x64"})
    assert r.status_code == 400 and error_of(r)["param"] == "seconds"  # over the frame limit
    r = server.post("/v1/videos", data={"model": "tiny-i2v-moe", "prompt": "x"},
                    files={"input_reference": ("x.png", b"nope", "image/png")})
    assert r.status_code == 400 and error_of(r)["param"] == "input_reference"

    page = server.get("/v1/videos?limit=1").json()
    assert page["object"] == "list" and len(page["data"]) == 1 and page["has_more"] is True
    assert page["data"][0]["id"] == portrait["id"] and page["first_id"] == page["last_id"] == portrait["id"]
    after = server.get(f"/v1/videos?limit=1&after={page['last_id']}").json()
    assert after["data"][0]["id"] == video["id"]
    everything = server.get("/v1/videos?limit=100&order=asc").json()["data"]
    assert [v["created_at"] for v in everything] == sorted(v["created_at"] for v in everything)

    r = server.request("DELETE", f"/v1/videos/{video['id']}")
    assert r.json() == {"id": video["id"], "object": "video.deleted", "deleted": True}
    assert server.get(f"/v1/videos/{video['id']}").status_code == 404
    assert not (server.data_dir / "outputs" / f"{video['id']}.mp4").exists()


# -- observability -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_metrics_and_monitor(server):
    server.wait_job(server.submit(**FAST, prompt="for the metrics")["id"])
    r = server.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for line in ("artifex_queue_depth 0", "artifex_queue_capacity 50", 'artifex_jobs{state="queued"} 0',
                 'artifex_model_ready{model="tiny-ti2v",status="ready"} 1', "# TYPE artifex_stage_duration_seconds "
                 "histogram"):
        assert line in text, line
    succeeded = [ln for ln in text.splitlines() if ln.startswith('artifex_jobs{state="succeeded"}')]
    assert int(succeeded[0].split()[-1]) >= 1
    count = [ln for ln in text.splitlines()
             if ln.startswith('artifex_stage_duration_seconds_count{model="tiny-t2v-moe",stage="denoise"}')]
    assert count and int(count[0].split()[-1]) >= 1
    # the prompt-embedding cache: the default negative prompt was encoded once, by the warm-up or the first job
    assert 'artifex_text_cache_lookups_total{model="tiny-t2v-moe",text="negative_prompt",result="hit"}' in text
    assert "artifex_gpu_" not in text  # no GPU on the test machine: the NVML series are absent, not zero

    env = {**os.environ, "ARTIFEX_API_TOKEN": ""}
    out = subprocess.run([sys.executable, "-m", "artifex", "monitor", "--once", "--url", server.url(""),
                          "--data-dir", str(server.data_dir)], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert "queue: 0 / 50" in out.stdout and "tiny-i2v-moe ready" in out.stdout
    assert "succeeded" in out.stdout and "denoise" in out.stdout
    assert "engines: in the server's process" in out.stdout and "worker tiny-ti2v/0 on " in out.stdout
    out = subprocess.run([sys.executable, "-m", "artifex", "monitor", "--once", "--url", server.url(""),
                          "--token-file", str(server.data_dir / "missing")], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 1 and "401" in out.stderr


@pytest.mark.slow
def test_openapi_document(server):
    doc = server.get("/openapi.json", auth=False).json()
    paths = doc["paths"]
    for p in ("/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/cancel", "/api/jobs/{job_id}/video",
              "/api/jobs/{job_id}/events", "/v1/videos", "/v1/videos/{video_id}", "/v1/videos/{video_id}/content",
              "/healthz", "/readyz", "/metrics"):
        assert p in paths, p
    create = paths["/api/jobs"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(create)
    assert "prompt" in create["application/json"]["schema"]["properties"]
    for route, image in (("/api/jobs", "image"), ("/v1/videos", "input_reference")):
        body = paths[route]["post"]["requestBody"]["content"]
        form = body["multipart/form-data"]["schema"]["properties"]
        for name in (image, "audio", "pose_video"):
            assert form[name]["format"] == "binary", (route, name)
        audio_doc = body["application/json"]["schema"]["properties"]["audio"]["description"]
        assert "data:audio/" in audio_doc and "S2V" in audio_doc, route
    assert "audio_sha256" in doc["components"]["schemas"]["JobOut"]["properties"]
    assert "HTTPBearer" in doc["components"]["securitySchemes"]


@pytest.mark.slow
def test_page_and_origin_rules(server):
    r = server.get("/", auth=False)
    assert r.status_code == 200 and "<title>Artifex</title>" in r.text
    assert server.token not in r.text
    csp = r.headers["content-security-policy"]
    assert "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert server.get("/static/app.js", auth=False).status_code == 200
    assert server.get("/static/../api_token", auth=False).status_code == 404
    # no CORS: other origins can neither read answers nor send the token in a preflighted call
    r = server.get("/api/jobs", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in {k.lower() for k in r.headers}
    r = server.request("OPTIONS", "/api/jobs", auth=False, headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization"})
    assert "access-control-allow-origin" not in {k.lower() for k in r.headers}
    r = server.post("/api/jobs", json={**FAST, "prompt": "x"}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and error_of(r)["code"] == "cross_origin"
    r = server.post("/api/jobs", json={**FAST, "prompt": "from the page itself", "steps": 2},
                    headers={"Origin": server.url("")})
    assert r.status_code == 201


# -- the web page in a real browser ----------------------------------------------------------------------------
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.mark.slow
def _wait_video_ready(page, timeout: float = 20.0) -> None:
    """Until the result video has its first frame (readyState >= 2), polled from the test: playwright's
    wait_for_function can poll with an eval in the page, which the page's CSP (script-src 'self') refuses (seen in
    CI as an EvalError whenever the video was not ready at the first check)."""
    end = time.monotonic() + timeout
    while page.evaluate("document.querySelector('#result-video').readyState") < 2:
        assert time.monotonic() < end, "the result video did not load"
        time.sleep(0.1)


def test_web_page_in_headless_chromium(server, s2v_job, s2v_media, tmp_path):
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but /usr/bin/chromium is missing: run scripts/install_test_deps.sh")
        pytest.skip("chromium is not installed (scripts/install_test_deps.sh installs it)")
    from playwright.sync_api import expect, sync_playwright

    png = tmp_path / "first.png"
    png.write_bytes(png_bytes(160, 96))
    (tmp_path / "face.png").write_bytes(s2v_media["image"])
    (tmp_path / "speech.wav").write_bytes(s2v_media["audio"])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(accept_downloads=True)
            page = context.new_page()
            requests_seen: list[str] = []
            page.on("request", lambda req: requests_seen.append(req.url))
            page.goto(server.url("/"))
            expect(page.locator("#token-box")).to_be_visible()
            page.fill("#token", "wrong-token-wrong-token")
            page.click("#token-save")
            expect(page.locator("#error")).to_contain_text("token")
            page.fill("#token", server.token)
            page.click("#token-save")
            expect(page.locator("#app")).to_be_visible()
            expect(page.locator("#ready")).to_have_text("ready", timeout=15000)
            # each model's load and warm-up seconds, as /readyz reports them (measured by the server: present and
            # numeric, whatever their values)
            ready = server.get("/readyz").json()["models"]
            startup = page.locator("#startup")
            expect(startup).to_contain_text("warm-up")
            shown = {name: (float(load), float(imports), float(warm)) for name, load, imports, warm in
                     re.findall(r"([\w-]+): load (\d+\.\d\d) s \(imports (\d+\.\d\d) s\), warm-up (\d+\.\d\d) s",
                                startup.text_content())}
            assert set(shown) == set(ready) == set(MODELS), (startup.text_content(), ready)
            for name, m in ready.items():
                assert all(isinstance(m[k], float) for k in ("load_s", "imports_s", "warmup_s")), m
                assert 0 <= m["imports_s"] <= m["load_s"], m  # a part of the load
                assert shown[name] == pytest.approx((m["load_s"], m["imports_s"], m["warmup_s"]), abs=0.0051), m
            rows = page.locator("#workers tbody tr")
            expect(rows).to_have_count(len(MODELS))
            for i in range(len(MODELS)):
                cells = rows.nth(i).locator("td")
                for col in (8, 9):  # loaded in, warm-up
                    assert re.fullmatch(r"\d+\.\d\d s", cells.nth(col).text_content()), cells.nth(col).text_content()

            # image-to-video: the image field appears for a model that takes one
            page.select_option("#model", "tiny-i2v-moe")
            expect(page.locator("#image-label")).to_be_visible()
            page.select_option("#model", "tiny-t2v-moe")
            expect(page.locator("#image-label")).to_be_hidden()
            page.select_option("#model", "tiny-i2v-moe")
            page.set_input_files("#image", str(png))
            page.fill("#prompt", "a browser-made clip")
            page.select_option("#preset", "draft")
            page.click("summary")
            page.fill("#steps", "150")
            page.click("#submit")
            expect(page.locator("#job-state")).to_have_text("succeeded", timeout=90000)
            assert int(page.locator("#progress").get_attribute("data-updates")) >= 2  # live updates, not one jump
            assert page.locator("#progress").evaluate("el => el.value") == 100
            video = page.locator("#result-video")
            expect(video).to_be_visible()
            _wait_video_ready(page)
            assert page.evaluate("document.querySelector('#result-video').duration") > 0
            assert page.evaluate("document.querySelector('#result-video').videoWidth") == 128
            job_id = video.get_attribute("data-job")
            expect(page.locator(f"#queue tr[data-id='{job_id}']")).to_contain_text("succeeded")
            with page.expect_download() as info:
                page.click("#download")
            saved = tmp_path / "downloaded.mp4"
            info.value.save_as(saved)
            assert frame_count(saved.read_bytes(), tmp_path) == (5, 128, 64)  # draft: short clip, smallest size

            # a bad request shows the server's message naming the field
            page.fill("#steps", "999")
            page.click("#submit")
            expect(page.locator("#error")).to_contain_text("steps")
            # the token never travels in a URL
            assert all(server.token not in u for u in requests_seen)
            job = json.loads(server.get(f"/api/jobs/{job_id}").text)
            assert job["settings"]["preset"] == "draft" and job["settings"]["steps"] == 150

            # few-step: the turbo preset with the page's sampler fields, on a two-expert model
            page.select_option("#model", "tiny-t2v-moe")
            expect(page.locator("#guidance-low-label")).to_be_visible()
            page.select_option("#preset", "turbo")
            page.fill("#steps", "")
            page.select_option("#size", "128x64")
            page.fill("#timesteps", "1000, 800, 500")
            page.select_option("#sampler", "euler")
            page.click("#submit")
            # the page shows the previous job until the new one is created: wait for a new job's result
            expect(page.locator("#job-id")).not_to_have_text(job_id, timeout=20000)
            expect(page.locator("#job-state")).to_have_text("succeeded", timeout=90000)
            new_id = page.locator("#job-id").text_content()
            turbo = json.loads(server.get(f"/api/jobs/{new_id}").text)
            assert turbo["settings"]["sampler"] == "euler" and turbo["settings"]["timesteps"] == [1000, 800, 500]
            assert turbo["settings"]["guidance"] == [1.0, 1.0] and turbo["settings"]["steps"] == 3

            # speech-to-video: the audio and pose pickers appear for a model that takes audio, and only then
            expect(page.locator("#audio-label")).to_be_hidden()
            expect(page.locator("#pose-label")).to_be_hidden()
            page.select_option("#model", "tiny-s2v")
            expect(page.locator("#audio-label")).to_be_visible()
            expect(page.locator("#pose-label")).to_be_visible()
            expect(page.locator("#image-need")).to_have_text("(required)")
            assert page.locator("#audio").get_attribute("accept").startswith("audio/")
            assert (page.locator("#frames").get_attribute("min"), page.locator("#frames").get_attribute("step")) \
                == ("77", "80")
            page.select_option("#model", "tiny-ti2v")
            expect(page.locator("#audio-label")).to_be_hidden()
            page.select_option("#model", "tiny-s2v")
            # the page sends the audio with the job: the same request as s2v_job's, so the server answers with that
            # finished job (no second generation) and the page plays its mp4, sound on
            page.select_option("#preset", "")
            page.fill("#timesteps", "")
            page.select_option("#sampler", "")
            page.fill("#steps", S2V_FORM["steps"])
            page.fill("#seed", S2V_FORM["seed"])
            page.fill("#prompt", S2V_FORM["prompt"])
            page.set_input_files("#image", str(tmp_path / "face.png"))
            page.set_input_files("#audio", str(tmp_path / "speech.wav"))
            expect(page.locator("#audio-picked")).to_have_text("2.0 s of audio")
            page.click("#submit")
            expect(page.locator("#job-id")).to_have_text(s2v_job["id"], timeout=20000)
            expect(page.locator("#job-state")).to_have_text("succeeded")
            expect(page.locator("#job-audio")).to_contain_text("audio: 2.0 s → 1 clip, 77 frames")
            video = page.locator("#result-video")
            expect(video).to_have_attribute("data-job", s2v_job["id"], timeout=20000)
            _wait_video_ready(page)
            assert video.get_attribute("muted") is None and video.get_attribute("controls") is not None
            assert page.evaluate("document.querySelector('#result-video').muted") is False
            assert page.evaluate("document.querySelector('#result-video').duration") > 4
        finally:
            browser.close()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the client warns about OpenAI's own Sora service
def test_the_openai_python_client_works_unchanged(server, tmp_path):
    """The official ``openai`` package, pointed at this server, creates, polls, downloads, lists, deletes."""
    import openai

    client = openai.OpenAI(api_key=server.token, base_url=server.url("/v1"), max_retries=0)
    video = client.videos.create(prompt="an origami crane", model="tiny-t2v-moe", seconds="0.5", size="128x64",
                                 extra_body={"steps": 3, "seed": 11})
    assert video.id.startswith("video_") and video.status in ("queued", "in_progress")
    video = client.videos.poll(video.id, poll_interval_ms=100)
    assert video.status == "completed" and video.progress == 100
    content = client.videos.download_content(video.id)
    assert frame_count(content.read(), tmp_path) == (9, 128, 64)
    with (tmp_path / "ref.png").open("wb") as f:
        f.write(png_bytes(160, 96))
    with (tmp_path / "ref.png").open("rb") as f:
        i2v = client.videos.create(prompt="a photo moves", model="tiny-i2v-moe", input_reference=f, seconds="0.25",
                                   extra_body={"steps": 2})
    assert client.videos.poll(i2v.id, poll_interval_ms=100).status == "completed"
    ids = [v.id for v in client.videos.list(limit=100)]
    assert video.id in ids and i2v.id in ids
    assert client.videos.delete(i2v.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(i2v.id)
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(prompt="x", model="sora-2")
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="not-the-token-" + "z" * 30, base_url=server.url("/v1"), max_retries=0).videos.list()
