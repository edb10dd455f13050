"""The server's named LoRA sets and few-step request fields, on real workers of an in-process service.

A request names a set (``lora``); the worker reloads its engine with that set fused and says what the switch
cost (the job's ``lora_switch`` timing, ``/api/workers``); the default set is the config's own. The schedule
fields (sampler, timesteps, switch_step) reach the engine from a JSON body and from a form.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import save_file
from starlette.testclient import TestClient

from artifex.config import OptimizationConfig
from artifex.errors import InvalidRequestError
from artifex.models.lora import original_name
from artifex.serve.app import create_app
from artifex.serve.service import Service
from artifex.serve.settings import ServeSettings

MODEL = "tiny-t2v-moe"
FAST = {"model": MODEL, "size": "128x64", "frames": 5, "prompt": "a kite", "seed": 11}


def lora_file(path, seed: int) -> str:
    """A rank-2 original-Wan-format LoRA on every block linear of the tiny transformer (diffusion_model.* keys)."""
    from artifex.models.registry import get_model
    from artifex.models.tiny import build_components

    expert = build_components(get_model(MODEL))["transformer"]
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in expert.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("blocks."):
            orig = f"diffusion_model.{original_name(name)}"
            sd[f"{orig}.lora_down.weight"] = torch.randn(2, m.in_features, generator=g) * 0.3
            sd[f"{orig}.lora_up.weight"] = torch.randn(m.out_features, 2, generator=g) * 0.3
    save_file(sd, str(path))
    return str(path)


@pytest.fixture(scope="module")
def served(tmp_path_factory, artifex_home):
    tmp = tmp_path_factory.mktemp("serve-lora")
    fast = lora_file(tmp / "fast.safetensors", 1)
    serve = ServeSettings(models=(MODEL,), data_dir=tmp / "data", warmup=False, loras={"fast": [f"high={fast}"]})
    service = Service(serve, OptimizationConfig(), None)
    service.start()
    client = TestClient(create_app(service), base_url="http://127.0.0.1")
    deadline = time.monotonic() + 120
    while not service.ready():
        assert time.monotonic() < deadline, service.workers_view()
        time.sleep(0.2)
    yield client, service
    client.close()
    service.stop()


def wait(client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise TimeoutError(job)


def sidecar(service, job_id: str) -> dict:
    return json.loads((service.settings.outputs_dir / f"{job_id}.json").read_text())


def test_lora_sets_switch_and_report_their_cost(served):
    client, service = served
    base = wait(client, client.post("/api/jobs", json={**FAST, "steps": 2}).json()["id"])
    assert base["state"] == "succeeded" and "lora_switch" not in base["timings"]
    assert sidecar(service, base["id"])["lora"] == []

    fast = wait(client, client.post("/api/jobs", json={**FAST, "steps": 2, "lora": "fast"}).json()["id"])
    assert fast["state"] == "succeeded", fast
    assert fast["timings"]["lora_switch"] > 0 and fast["settings"]["lora"] == "fast"
    fused = sidecar(service, fast["id"])["lora"]
    assert [(r["expert_index"], r["layers"] > 0) for r in fused] == [(0, True)]
    worker = client.get("/api/workers").json()["workers"][0]
    assert worker["lora_set"] == "fast" and worker["lora_switch_s"] == fast["timings"]["lora_switch"]

    again = wait(client, client.post("/api/jobs", json={**FAST, "steps": 2, "lora": "fast", "seed": 12}).json()["id"])
    assert "lora_switch" not in again["timings"]  # the set is already loaded
    back = wait(client, client.post("/api/jobs", json={**FAST, "steps": 2, "seed": 13}).json()["id"])
    assert back["timings"]["lora_switch"] > 0 and sidecar(service, back["id"])["lora"] == []
    models = client.get("/api/models").json()["models"][0]
    assert models["loras"] == ["default", "fast"]

    r = client.post("/api/jobs", json={**FAST, "lora": "slow"})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "lora" and err["allowed"] == "default, fast"


def test_few_step_fields_reach_the_engine_from_json_and_forms(served):
    client, service = served
    body = {**FAST, "sampler": "euler", "timesteps": [1000, 937.5, 833.3, 625], "switch_step": 1, "guidance": 1,
            "guidance_low": 1}
    job = wait(client, client.post("/api/jobs", json=body).json()["id"])
    assert job["state"] == "succeeded", job
    s = sidecar(service, job["id"])
    assert s["settings"]["sampler"] == "euler" and s["settings"]["timesteps"] == [1000, 937.5, 833.3, 625]
    assert s["experts_per_step"] == [0, 1, 1, 1]
    form = {k: str(v) for k, v in FAST.items()} | {"sampler": "dmd", "timesteps": "1000, 757, 522", "seed": "5"}
    job = wait(client, client.post("/api/jobs", data=form).json()["id"])
    assert job["state"] == "succeeded" and sidecar(service, job["id"])["settings"]["timesteps"] == [1000, 757, 522]
    r = client.post("/api/jobs", data={**form, "timesteps": "1000, x"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "timesteps: must be a number, got ' x'", r.text
    for bad in ({"timesteps": "1000,757"}, {"sigmas": {"a": 1}}):
        r = client.post("/api/jobs", json={**FAST, "sampler": "euler", **bad})
        assert r.status_code == 400 and "must be a list of numbers" in r.json()["error"]["message"], r.text


def test_bad_lora_sets_are_refused_at_start(tmp_path):
    real = lora_file(tmp_path / "x.safetensors", 2)
    for sets, pattern in (({"Fast": [real]}, "'Fast' is not a LoRA set name"),
                          ({"default": [real]}, "'default' is not a LoRA set name"),
                          ({"fast": []}, "loras.fast: must name at least one LoRA file"),
                          ({"fast": [str(tmp_path / "none.safetensors")]}, "does not exist"),
                          ({"fast": ["middle=" + real]}, "unknown expert target")):
        with pytest.raises(InvalidRequestError, match=pattern):
            ServeSettings(models=(MODEL,), data_dir=tmp_path, loras=sets)
