"""Attention backends against a float64 reference, slicing, selection + cache, fallback, and the Wan processor."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from artifex.attention import BACKENDS, AttentionRuntime, AttentionUnavailableError, install, select, verify
from artifex.attention.ops import reset_runtime_failures, run_chain, runtime_failures
from artifex.attention.select import reference_attention, rel_l2
from artifex.errors import InvalidRequestError

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
RUNS_HERE = ["sdpa", "sdpa-math", "flex", "sliced"] + (["sdpa-flash"] if DEVICE.type == "cpu" else [])


@pytest.fixture(autouse=True)
def _clean_failures():
    reset_runtime_failures()
    yield
    reset_runtime_failures()


@pytest.mark.parametrize("name", RUNS_HERE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_that_run_here_match_the_float64_reference(name, dtype):
    v = verify(name, DEVICE, dtype, head_dim=64)
    assert v.ok, v.reason
    assert v.rel_l2 is not None and v.rel_l2 < v.bound
    assert verify(name, DEVICE, dtype, head_dim=64, causal=True).ok


def test_gpu_only_backends_say_why_on_a_cpu():
    if DEVICE.type != "cpu":
        pytest.skip("CPU-only check")
    for name in ("fa3", "fa2", "sdpa-cudnn", "xformers", "sage"):
        v = verify(name, DEVICE, torch.bfloat16)
        assert not v.ok and "needs CUDA" in v.reason


@pytest.mark.parametrize("slices", [1, 2, 3, 7, 64])
@pytest.mark.parametrize("causal", [False, True])
def test_sliced_equals_full_attention(slices, causal):
    g = torch.Generator().manual_seed(slices)
    q, k, v = (torch.randn(2, 64, 3, 32, generator=g) for _ in range(3))
    full = BACKENDS["sdpa-math"].run(q, k, v, None, causal, 0.0, 0)
    sliced = BACKENDS["sliced"].run(q, k, v, None, causal, 0.0, slices)
    assert torch.allclose(sliced, full, atol=1e-5)


def test_scale_and_causal_are_honoured():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 40, 2, 16, generator=g) for _ in range(3))
    for name in ("sdpa", "sliced", "flex"):
        out = BACKENDS[name].run(q, k, v, 0.05, True, 0.0, 3)
        assert rel_l2(out, reference_attention(q, k, v, 0.05, True)) < 1e-5, name


def test_explicit_choice_is_honoured_or_refused_with_the_reason():
    c = select("sdpa-math", DEVICE, torch.float32, (1, 64, 2, 32))
    assert (c.chosen, c.source, c.chain) == ("sdpa-math", "explicit", ["sdpa-math"])
    assert select("sliced", DEVICE, torch.float32, (1, 64, 2, 32), slices=4).chain == ["sliced", "sdpa-math"]
    with pytest.raises(InvalidRequestError, match=r"attention: unknown attention backend 'flash9'.*auto, fa3"):
        select("flash9", DEVICE, torch.float32, (1, 64, 2, 32))
    if DEVICE.type == "cpu":
        with pytest.raises(AttentionUnavailableError, match=r"'fa3' cannot run here: needs CUDA"):
            select("fa3", DEVICE, torch.bfloat16, (1, 64, 2, 128))


def test_auto_times_verified_backends_and_caches_the_choice(tmp_path):
    cache = tmp_path / "attention-selection.json"
    shape = (1, 96, 2, 32)
    first = select("auto", DEVICE, torch.float32, shape, cache_path=cache)
    assert first.source == "timed" and first.chosen in first.timings_ms
    assert first.chosen == min(first.timings_ms, key=first.timings_ms.get)
    assert first.chain[-1] == "sdpa-math" and set(first.timings_ms) <= set(first.chain)
    stored = json.loads(cache.read_text())
    assert len(stored["entries"]) == 1 and "96" in next(iter(stored["entries"]))
    second = select("auto", DEVICE, torch.float32, shape, cache_path=cache)
    assert second.source == "cache" and second.chosen == first.chosen
    # another shape is another entry
    select("auto", DEVICE, torch.float32, (1, 80, 2, 32), cache_path=cache)
    assert len(json.loads(cache.read_text())["entries"]) == 2


def test_verifications_are_cached_and_a_later_process_checks_only_the_backend_it_runs(tmp_path, monkeypatch):
    """The first selection verifies every candidate and keeps the outcomes; the next (another process, the same
    versions) verifies only the one it picks; a cached backend that now fails its check is dropped, the next one
    verified and chosen."""
    import importlib

    sel = importlib.import_module("artifex.attention.select")  # the package's `select` is the function

    cache = tmp_path / "attention-selection.json"
    calls: list[str] = []
    real = sel.verify
    monkeypatch.setattr(sel, "verify", lambda name, *a, **k: calls.append(name) or real(name, *a, **k))
    first = select("auto", DEVICE, torch.float32, (1, 96, 2, 32), cache_path=cache)
    verified = json.loads(cache.read_text())["verified"]
    assert len(verified) == 1 and set(calls) == {n for n, ok in next(iter(verified.values())).items()}
    calls.clear()
    second = select("auto", DEVICE, torch.float32, (1, 112, 2, 32), cache_path=cache)  # a new shape: timed again
    assert calls == [second.chosen] and second.chosen in first.chain
    calls.clear()
    broken = second.chosen
    monkeypatch.setattr(sel, "verify", lambda name, *a, **k: calls.append(name) or (
        sel.Verification(name, False, None, 1.0, "broke") if name == broken else real(name, *a, **k)))
    third = select("auto", DEVICE, torch.float32, (1, 112, 2, 32), cache_path=cache)
    assert calls[0] == broken and third.chosen != broken and "failed verification: broke" in third.rejected[broken]
    assert json.loads(cache.read_text())["verified"][next(iter(verified))][broken] == "broke"


def test_an_explicit_backend_is_verified_once_per_cache_and_a_failure_is_checked_again(tmp_path, monkeypatch):
    """A named backend (fa3-fp8 under fp8=all, here sdpa-math) is checked at load (check_explicit) and at the first
    request (select): with the cache, once; a cached pass is reused by the next process; a failure is not kept."""
    import importlib

    from artifex.attention.processor import AttentionRuntime

    sel = importlib.import_module("artifex.attention.select")
    cache = tmp_path / "attention-selection.json"
    calls: list[str] = []
    real = sel.verify
    monkeypatch.setattr(sel, "verify", lambda name, *a, **k: calls.append(name) or real(name, *a, **k))
    runtime = AttentionRuntime(requested="sdpa-math", cache_path=cache)
    runtime.check_explicit(DEVICE, torch.float32, 32)
    assert runtime.prepare((1, 64, 2, 32), torch.float32, DEVICE).source == "explicit"
    assert calls == ["sdpa-math"]
    assert AttentionRuntime(requested="sdpa-math", cache_path=cache).check_explicit(DEVICE, torch.float32, 32) \
        is None and calls == ["sdpa-math"]  # the next process: from the cache
    runtime = AttentionRuntime(requested="sdpa", cache_path=cache)
    monkeypatch.setattr(sel, "verify", lambda name, *a, **k: calls.append(name) or sel.Verification(
        name, False, None, 1.0, "broke"))
    for _ in range(2):
        with pytest.raises(AttentionUnavailableError, match="'sdpa' cannot run here: broke"):
            runtime.check_explicit(DEVICE, torch.float32, 32)
    assert calls[1:] == ["sdpa", "sdpa"]


def test_a_corrupt_cache_is_rebuilt(tmp_path, caplog):
    cache = tmp_path / "attention-selection.json"
    cache.write_text("{ this is not json")
    c = select("auto", DEVICE, torch.float32, (1, 64, 2, 32), cache_path=cache)
    assert c.source == "timed"
    assert "rebuilding" in caplog.text
    assert json.loads(cache.read_text())["format"] == 1


def test_flash_preference_falls_back_with_reasons():
    c = select("auto", DEVICE, torch.bfloat16, (1, 64, 2, 128), prefer=["fa3", "fa2", "fa4", "xformers"])
    if "fa3" not in c.chain:
        assert "fa3" in c.rejected and c.rejected["fa3"]
        assert c.chosen in BACKENDS and c.chain[-1] == "sdpa-math"


def test_a_failing_backend_falls_back_at_runtime(monkeypatch, caplog):
    calls = []

    def boom(*args):
        calls.append(1)
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(BACKENDS, "sdpa", dataclasses.replace(BACKENDS["sdpa"], run=boom))
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 32, 2, 16, generator=g) for _ in range(3))
    out = torch.ops.artifex.attention(q, k, v, "sdpa,sdpa-math", None, False, 0.0, 0)
    assert rel_l2(out, reference_attention(q, k, v)) < 1e-5
    assert "sdpa" in runtime_failures() and "kernel exploded" in caplog.text
    run_chain(["sdpa", "sdpa-math"], q, k, v, None, False, 0.0, 0)
    assert len(calls) == 1  # a failed backend is not retried in this process
    # and auto no longer offers it
    c = select("auto", DEVICE, torch.float32, (1, 32, 2, 16))
    assert "sdpa" not in c.chain and "failed at runtime" in c.rejected["sdpa"]
    with pytest.raises(AttentionUnavailableError, match="failed at runtime earlier"):
        select("sdpa", DEVICE, torch.float32, (1, 32, 2, 16))


def _tiny_wan(image_dim=None):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
                                 text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, image_dim=image_dim,
                                 added_kv_proj_dim=64 if image_dim else None).to(DEVICE).eval()


@pytest.mark.parametrize("backend", ["sdpa", "sliced", "flex", "sdpa-math"])
@pytest.mark.parametrize("image_branch", [False, True])
def test_wan_processor_matches_diffusers_processor(backend, image_branch):
    model = _tiny_wan(image_dim=24 if image_branch else None)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 3, 8, 12, generator=g).to(DEVICE)
    text = torch.randn(1, 512, 32, generator=g).to(DEVICE)
    kw = dict(hidden_states=x, timestep=torch.tensor([500.0], device=DEVICE), encoder_hidden_states=text,
              return_dict=False)
    if image_branch:
        kw["encoder_hidden_states_image"] = torch.randn(1, 257, 24, generator=g).to(DEVICE)
    with torch.no_grad():
        ref = model(**kw)[0]
        runtime = AttentionRuntime(requested=backend, slices=3)
        runtime.prepare((1, 72, 2, 32), torch.float32, DEVICE)
        install([model], runtime)
        out = model(**kw)[0]
    assert type(model.blocks[0].attn1.processor).__name__ == "WanAttentionProcessor"
    assert rel_l2(out, ref.double()) < 1e-4


@pytest.mark.parametrize("accelerated", [False, True])
def test_cross_attention_runs_the_plain_kernel_of_a_quantizing_backend(monkeypatch, accelerated):
    from artifex.attention.processor import cross_chain
    from artifex.engine.dit import accelerate_model

    assert cross_chain("fa3-fp8,sdpa-math") == "fa3,sdpa-math"
    assert cross_chain("fa3-fp8,fa3,sdpa-math") == "fa3,sdpa-math"  # no backend twice
    assert cross_chain("sdpa,sdpa-math") == "sdpa,sdpa-math"
    keys = []

    def recorder(name):
        def run(q, k, v, *rest):
            keys.append((name, k.shape[1]))
            return BACKENDS["sdpa-math"].run(q, k, v, *rest)
        return dataclasses.replace(BACKENDS["sdpa-math"], name=name, run=run)

    # a quantizing backend whose plain twin is another recorder: which one runs tells which chain was used
    monkeypatch.setitem(BACKENDS, "twin", recorder("twin"))
    monkeypatch.setitem(BACKENDS, "quant", dataclasses.replace(recorder("quant"), plain="twin"))
    model = _tiny_wan()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 3, 8, 12, generator=g).to(DEVICE)
    text = torch.randn(1, 512, 32, generator=g).to(DEVICE)
    runtime = AttentionRuntime(chain="quant,sdpa-math")
    assert runtime.cross_chain == "twin,sdpa-math"
    install([model], runtime)
    if accelerated:
        accelerate_model(model)
    with torch.no_grad():
        model(hidden_states=x, timestep=torch.tensor([500.0], device=DEVICE), encoder_hidden_states=text)
    tokens = 3 * 4 * 6
    assert sorted(set(keys)) == [("quant", tokens), ("twin", 512)]  # self-attention quantized, cross plain
    assert len(keys) == 4  # 2 layers x (self, cross)


def test_a_choice_says_where_its_timings_come_from(tmp_path):
    """Only a choice read from an existing cache file says "cache", and then which file and when it was timed."""
    cache = tmp_path / "fresh" / "attention-selection.json"
    shape = (1, 72, 2, 32)
    first = select("auto", DEVICE, torch.float32, shape, cache_path=cache)
    assert first.source == "timed" and first.cache_file == str(cache) and first.timed_at
    assert json.loads(cache.read_text())["entries"][next(iter(json.loads(cache.read_text())["entries"]))]["date"] \
        == first.timed_at
    second = select("auto", DEVICE, torch.float32, shape, cache_path=cache)
    assert (second.source, second.cache_file, second.timed_at) == ("cache", str(cache), first.timed_at)
    assert second.to_dict()["timed_at"] == first.timed_at
    alone = select("auto", DEVICE, torch.float32, shape)  # no cache file at all
    assert alone.source == "timed" and alone.cache_file is None


def test_auto_rules_out_a_slow_backend_in_one_call_and_leaves_flex_out_behind_a_faster_kernel(tmp_path, monkeypatch):
    """At a new shape each candidate is called once; only those within SCREEN of the best so far are timed in
    full; flex (it compiles per shape) is neither verified nor timed where a kernel ahead of it in the preference
    passed its check. The cached choice says the same."""
    import importlib

    sel = importlib.import_module("artifex.attention.select")
    ms = {"fa3": 10.0, "sdpa-cudnn": 12.0, "sdpa-flash": 20.0, "sdpa": 11.0, "sdpa-efficient": 40.0, "flex": 9.0}
    calls: list[tuple[str, int]] = []

    def fake_time(name, shape, dtype, device, scale=None, causal=False, slices=1, warmup=3, iters=10, seed=0):
        calls.append((name, iters))
        return ms[name]

    monkeypatch.setattr(sel, "probe", lambda backend, *a, **k: None if backend.name in ms else "not here")
    verified: list[str] = []
    monkeypatch.setattr(sel, "verify", lambda name, *a, **k: verified.append(name) or sel.Verification(
        name, True, 0.0, 1.0))
    monkeypatch.setattr(sel, "time_backend", fake_time)
    cache = tmp_path / "attention-selection.json"
    choice = select("auto", DEVICE, torch.bfloat16, (1, 64, 2, 32), cache_path=cache)
    full = [name for name, iters in calls if iters > 1]
    once = [name for name, iters in calls if iters == 1]
    # the first in preference order in full, every later one called once first and timed in full only within
    # 1.25x of the best so far (the order differs between a CPU and a GPU; the outcome does not)
    assert calls[0][1] > 1 and set(full) == {"fa3", "sdpa-cudnn", "sdpa"} and len(full) == 3
    assert set(once) == {"fa3", "sdpa-cudnn", "sdpa-flash", "sdpa", "sdpa-efficient"} - {calls[0][0]}
    assert sorted(choice.screened) == ["sdpa-efficient", "sdpa-flash"]
    assert "flex" not in dict(calls) and "flex" not in verified and "fa3" in choice.left_out["flex"]
    assert choice.chosen == "fa3" and choice.chain[:3] == ["fa3", "sdpa", "sdpa-cudnn"] and "flex" not in choice.chain
    calls.clear()
    again = select("auto", DEVICE, torch.bfloat16, (1, 64, 2, 32), cache_path=cache)
    assert calls == [] and again.source == "cache" and again.screened == choice.screened
    assert again.left_out == choice.left_out and again.chain == choice.chain
    # where no kernel ahead of flex passes its check, it is verified and timed like the others
    ms.pop("fa3"), ms.pop("sdpa-cudnn")
    calls.clear()
    alone = select("auto", DEVICE, torch.bfloat16, (1, 64, 4, 32), cache_path=cache)
    assert "flex" in dict(calls) and "flex" in verified and alone.chosen == "flex" and not alone.left_out
