"""Memory tiers, the planner, OOM step-down and VAE tiling, on tiny models (and the real shapes on meta)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from artifex.config import OptimizationConfig
from artifex.engine.memory import (
    GIB,
    choose_tier,
    estimate,
    module_bytes,
    parse_budget,
    plan_memory,
    tiers_for,
    weights_of,
)
from artifex.engine.request import GenerationRequest
from artifex.errors import InvalidRequestError
from artifex.models.configs import meta_components
from artifex.models.registry import get_model


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_budgets_parse_or_fail_clearly():
    assert parse_budget("24GB") == parse_budget("24 GiB") == 24 * GIB
    assert parse_budget("16000MB") == 16000 * 2**20 and parse_budget(12) == 12 * GIB and parse_budget(None) is None
    for bad in ("24XB", "GB", "-3GB", "0GB"):
        with pytest.raises(InvalidRequestError, match="vram_budget"):
            parse_budget(bad)
    with pytest.raises(InvalidRequestError, match=r"vram_budget: cannot read '24XB'.*e.g. 24GB"):
        OptimizationConfig(vram_budget="24XB")


def test_planner_table_for_the_real_shapes():
    t2v = get_model("t2v-a14b")
    w = weights_of(*meta_components(t2v))
    # weights counted from the real classes: two ~13.3B-parameter experts in bf16, umt5-xxl encoder
    assert 26 < w.experts[0] / GIB < 28 and len(w.experts) == 2 and 10 < w.text_encoder / GIB < 11.5
    ests = [estimate(t2v, w, t, 1280, 720, 81) for t in tiers_for(t2v)]
    peaks = [e.peak_bytes for e in ests]
    assert [e.tier for e in ests] == ["resident", "text_offload", "expert_swap", "model_offload", "block_offload",
                                      "leaf_offload"]
    assert peaks == sorted(peaks, reverse=True)  # leaner tiers never predict more
    assert choose_tier(ests, 141 * GIB)[0] == "resident"  # an H200
    # an 80 GB H100: both experts plus the streamed fp32 decode (~19.4 GiB measured) leave too little headroom for
    # fragmentation under the cap; one expert at a time fits
    assert choose_tier(ests, 80 * GIB)[0] == "expert_swap" and choose_tier(ests, 100 * GIB)[0] == "text_offload"
    # 24 GiB: block offload with a whole-frame decode is predicted at 0.90 of the budget (it ran out on the H200), so
    # the planner tiles the VAE from the start
    with pytest.raises(InvalidRequestError, match=r"a budget of at least ~25\.\d GiB"):
        choose_tier(ests, 24 * GIB)
    tier, tiling, _, reasons = plan_memory(t2v, w, 1280, 720, 81, 1, False, "artifex", 24 * GIB)
    assert (tier, tiling) == ("block_offload", True) and "VAE tiling turned on" in reasons[-1]
    with pytest.raises(InvalidRequestError, match=r"vram_budget: 4.0 GiB is too little .* needs ~"):
        choose_tier(ests, 4 * GIB)
    with pytest.raises(InvalidRequestError, match=r"memory_tier: resident needs ~90.6 GiB by the planner \(a budget of ~106.5 GiB\), over the 24.0"):
        choose_tier(ests, 24 * GIB, "resident")
    ti2v = get_model("ti2v-5b")
    assert "expert_swap" not in tiers_for(ti2v)
    tiled = estimate(ti2v, weights_of(*meta_components(ti2v)), "model_offload", 1280, 704, 121, vae_tiling=True)
    untiled = estimate(ti2v, weights_of(*meta_components(ti2v)), "model_offload", 1280, 704, 121)
    assert tiled.stages["decode"] < untiled.stages["decode"]
    fp8 = weights_of(*meta_components(t2v), fp8_weights=True)
    assert fp8.experts[0] < 0.6 * w.experts[0]


def test_weights_of_is_the_same_on_the_fused_qkv_model():
    """Artifex's DiT runs each self-attention's q/k/v as one layer (3 dim^2): the same bytes, and the largest leaf
    stays the timestep projection (dim x 6 dim), so leaf offload's estimate does not change either."""
    from diffusers import WanTransformer3DModel

    from artifex.attention import install
    from artifex.attention.processor import AttentionRuntime
    from artifex.engine.dit import accelerate_model

    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                  out_channels=4, text_dim=32, freq_dim=16, ffn_dim=48, num_layers=2,
                                  rope_max_seq_len=64)
    other = torch.nn.Linear(4, 4)
    before = weights_of(other, other, [model])
    before_fp8 = weights_of(other, other, [model], fp8_weights=True)
    install([model], AttentionRuntime(chain="sdpa-math"))
    accelerate_model(model)
    assert model.blocks[0].attn1.fused_projections
    assert weights_of(other, other, [model]) == before
    assert weights_of(other, other, [model], fp8_weights=True) == before_fp8
    qkv = model.blocks[0].attn1.to_qkv
    assert before.expert_leaf == module_bytes(model.condition_embedder.time_proj) > module_bytes(qkv)


@pytest.mark.parametrize("tier", ["text_offload", "expert_swap", "model_offload", "block_offload", "leaf_offload"])
def test_each_offload_tier_gives_the_resident_latents(engine, tmp_path, tier):
    req = dict(model="tiny-t2v-moe", prompt="a boat on a river", seed=3, steps=4, frames=5)
    base = engine("tiny-t2v-moe", precision="fp32", tf32=False).generate(
        GenerationRequest(output=str(tmp_path / "a.mp4"), **req))
    eng = engine("tiny-t2v-moe", precision="fp32", tf32=False, memory_tier=tier)
    r = eng.generate(GenerationRequest(output=str(tmp_path / "b.mp4"), **req))
    assert r.memory["tier"] == tier == r.plan.placement
    assert _rel(r.latents, base.latents) < 1e-5


def test_group_offload_tiers_keep_the_experts_in_their_homes(engine, tmp_path):
    """block/leaf offload bind each expert to the same CPU homes the swap tiers use (pinned once, in chunks, with
    CUDA), so group offload finds them there instead of copying every weight; the homes outlive a change of tier."""
    eng = engine("tiny-t2v-moe", precision="fp32", tf32=False, memory_tier="block_offload")
    homes = eng.placement._homes
    assert homes is not None and len(homes) == len(eng.c.experts)
    for expert, home in zip(eng.c.experts, homes, strict=True):
        ptrs = {t.data_ptr() for t in home.tensors}
        assert all(p.data_ptr() in ptrs for p in expert.parameters())
    eng.placement.move_to("leaf_offload")
    assert eng.placement._homes is homes
    r = eng.generate(GenerationRequest(model="tiny-t2v-moe", prompt="a boat", seed=3, steps=2, frames=5,
                                       output=str(tmp_path / "b.mp4")))
    assert r.memory["tier"] == "block_offload" and r.video_path.exists()  # the engine's tier, back from the homes
    assert eng.placement._homes is homes
    eng.placement.move_to("resident")
    assert eng.placement._homes is None


def test_oom_in_denoise_steps_down_one_tier_and_retries(engine, tmp_path, artifex_home):
    from artifex.engine.pipeline import Engine

    req = dict(model="tiny-t2v-moe", prompt="a boat on a river", seed=3, steps=4, frames=5)
    base = engine("tiny-t2v-moe", precision="fp32", tf32=False).generate(
        GenerationRequest(output=str(tmp_path / "a.mp4"), **req))
    eng = Engine.load("tiny-t2v-moe", config=OptimizationConfig(precision="fp32", tf32=False))
    fired = []

    def fail_once(module, args):
        if not fired:
            fired.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")

    handle = eng.c.experts[0].register_forward_pre_hook(fail_once)
    r = eng.generate(GenerationRequest(output=str(tmp_path / "b.mp4"), **req))
    handle.remove()
    assert fired and r.memory["step_downs"][0]["stage"] == "denoise"
    assert r.memory["step_downs"][0]["change"] == "resident -> text_offload" and r.memory["tier"] == "text_offload"
    # the prediction now describes what ran; the first plan's figure is kept beside it
    assert r.memory["planned_peak_gib"] == r.memory["predicted"]["resident"]
    assert r.memory["predicted_peak_gib"] == r.memory["predicted"]["text_offload"]
    assert _rel(r.latents, base.latents) < 1e-5
    side = json.loads(r.sidecar_path.read_text())
    assert side["memory"]["step_downs"][0]["error"].startswith("CUDA out of memory")


def test_oom_in_decode_turns_on_vae_tiling(tmp_path):
    from artifex.engine.pipeline import Engine

    eng = Engine.load("tiny-t2v-moe", config=OptimizationConfig(precision="fp32"))
    fired = []

    def fail_once(module, args):
        if not fired:
            fired.append(1)
            raise torch.OutOfMemoryError("out of memory (injected)")

    eng.c.vae.decoder.register_forward_pre_hook(fail_once)
    r = eng.generate(GenerationRequest(model="tiny-t2v-moe", prompt="x", seed=1, steps=2, frames=5,
                                       output=str(tmp_path / "v.mp4")))
    assert r.memory["step_downs"] == [{"stage": "decode", "change": "vae_tiling on",
                                       "error": "out of memory (injected)"}]
    assert r.plan.vae_tiling and r.video_path.exists()


def test_a_failed_attempts_peak_is_recorded_apart_from_the_runs_peak(monkeypatch, tmp_path):
    """Peak counters as CUDA keeps them (faked here: the CPU has none): the OOM'd decode's peak goes in
    ``failed_attempt_peak_gib``; the counters restart for the retry, the completed stages' peak is kept as the
    floor the result's peak is folded over; each stage's peak is recorded."""
    import artifex.engine.memory_guard as pipeline  # the memory policy reads the device's peak counters
    from artifex.engine.pipeline import Engine

    gib = 2**30
    counters = {"peak": 0}

    def peak_bytes(device):
        return counters["peak"], counters["peak"] + gib

    def reset(device):
        counters["peak"] = 0

    monkeypatch.setattr(pipeline, "peak_bytes", peak_bytes)
    monkeypatch.setattr(pipeline, "reset_peak_memory", reset)
    eng = Engine.load("tiny-t2v-moe", config=OptimizationConfig(precision="fp32"))
    fired = []

    def stage_peak(module, args):
        if not fired:  # the first decode attempt: 30 GiB, then out of memory
            fired.append(1)
            counters["peak"] = 30 * gib
            raise torch.OutOfMemoryError("out of memory (injected)")
        counters["peak"] = max(counters["peak"], 4 * gib)  # the tiled retry

    eng.c.experts[0].register_forward_pre_hook(lambda m, a: counters.update(peak=max(counters["peak"], 9 * gib)))
    eng.c.vae.decoder.register_forward_pre_hook(stage_peak)
    r = eng.generate(GenerationRequest(model="tiny-t2v-moe", prompt="x", seed=1, steps=2, frames=5,
                                       output=str(tmp_path / "v.mp4")))
    assert r.memory["failed_attempt_peak_gib"] == [30.0]
    assert eng.memory_guard.peak_floor == (9 * gib, 10 * gib)  # the denoise stage's peak, from before the failed decode
    # each stage's own peak (the decode's is the retry's, counted from zero), beside the planner's stages
    assert r.memory["measured_stages_gib"] == {"encode_text": 0.0, "denoise": 9.0, "decode": 4.0}
    assert set(r.memory["predicted_stages_gib"]) == {"encode_text", "denoise", "decode"}


def test_tiled_vae_decode_matches_untiled():
    """Tiles are decoded separately and blended over their overlap. With a tile covering the frame the output is
    the untiled one exactly; with real tiles it stays close (random tiny weights see little context, so the
    bound is loose: relative L2 < 0.5, as diffusers' own tiling test allows)."""
    from diffusers import AutoencoderKLWan

    from artifex.models.configs import vae_kwargs

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**vae_kwargs(get_model("tiny-t2v-moe"))).eval()
    z = torch.nn.functional.interpolate(torch.randn(1, 16, 2, 5, 8), size=(2, 40, 64), mode="trilinear")
    with torch.no_grad():
        full = vae.decode(z).sample  # 320x512 pixels
        vae.enable_tiling(tile_sample_min_height=512, tile_sample_min_width=512, tile_sample_stride_height=448,
                          tile_sample_stride_width=448)
        assert torch.equal(vae.decode(z).sample, full)
        vae.enable_tiling(tile_sample_min_height=192, tile_sample_min_width=192, tile_sample_stride_height=128,
                          tile_sample_stride_width=128)
        tiled = vae.decode(z).sample
    assert tiled.shape == full.shape and not torch.equal(tiled, full)
    assert _rel(tiled, full) < 0.5


def test_fp8_weights_run_and_stay_close(engine, tmp_path):
    req = dict(model="tiny-ti2v", prompt="a kite", seed=5, steps=3, frames=5)
    bf16 = engine("tiny-ti2v").generate(GenerationRequest(output=str(tmp_path / "a.mp4"), **req))
    eng = engine("tiny-ti2v", fp8_weights=True)
    fp8 = eng.generate(GenerationRequest(output=str(tmp_path / "b.mp4"), **req))
    assert eng.c.experts[0].blocks[0].ffn.net[2].weight.dtype == torch.float8_e4m3fn
    assert eng.weights.experts[0] < 0.8 * engine("tiny-ti2v").weights.experts[0]  # linear weights: 1 byte
    err = _rel(fp8.latents, bf16.latents)
    assert 0 < err < 0.2


def test_a_tier_that_does_not_fit_the_budget_is_refused_before_work(tmp_path):
    from artifex.engine.pipeline import Engine

    with pytest.raises(InvalidRequestError, match=r"vram_budget: 0.0 GiB is too little"):
        Engine.load("tiny-t2v-moe", config=OptimizationConfig(vram_budget="1MB"))


def test_plan_command_prints_the_table(capsys):
    from artifex.cli import main

    assert main(["plan", "--model", "t2v-a14b", "--size", "832x480", "--vram-budget", "16GB"]) == 0
    out = capsys.readouterr().out
    assert "block_offload" in out and "<- auto" in out and "experts 26.7 + 26.7 GiB" in out
    assert "to GPU GiB/request" in out and "+ GiB/forward" in out
    assert main(["plan", "--model", "t2v-a14b", "--vram-budget", "24XB"]) == 2
    assert "cannot read '24XB'" in capsys.readouterr().err
    assert main(["plan", "--model", "ti2v-5b", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["size"] == [1280, 704] and len(data["tiers"]) == 5


def test_each_tier_counts_what_it_copies_to_the_gpu():
    """The time a tier costs besides memory: what the placement copies from host memory for each request and for
    each DiT forward pass; the tiers in planning order copy no less than the ones before them."""
    for name in ("ti2v-5b", "t2v-a14b"):
        spec = get_model(name)
        w = weights_of(*meta_components(spec))
        ests = {t: estimate(spec, w, t, *spec.sizes[0], spec.frames) for t in tiers_for(spec)}
        got = {t: (e.copy_per_request, e.copy_per_forward) for t, e in ests.items()}
        experts = sum(w.experts)
        assert got["resident"] == (0, 0) and got["text_offload"] == (w.text_encoder, 0)
        assert got["model_offload"] == (w.text_encoder + experts + w.vae, 0)
        assert got["block_offload"] == got["leaf_offload"] == (w.text_encoder + w.vae, max(w.experts))
        if spec.experts == 2:
            assert got["expert_swap"] == (w.text_encoder + experts, 0)
        steps = [ests[t].copy_per_request + spec.steps * ests[t].copy_per_forward for t in tiers_for(spec)]
        assert steps == sorted(steps)
        d = ests["block_offload"].to_dict()
        assert d["copy_per_forward_gib"] == pytest.approx(max(w.experts) / GIB) and "copy_per_forward" not in d


def test_random_weight_components_run_through_the_engine(tmp_path):
    """The benchmarks' random-weight builder gives components the engine runs like loaded ones."""
    from artifex.engine.pipeline import Engine
    from artifex.models.random_init import random_components

    spec = get_model("tiny-t2v-moe")
    engine = Engine.from_components(spec, random_components(spec, "fp32"), OptimizationConfig(precision="fp32"))
    r = engine.generate(GenerationRequest(model=spec.name, prompt="x", seed=2, steps=2, frames=5,
                                          output=str(tmp_path / "r.mp4")))
    assert r.video_path.exists() and r.memory["tier"] == "resident"
    assert r.sidecar["model"]["checkpoint"] == "random:tiny-t2v-moe"
    assert engine.c.experts[0].blocks[0].attn1.to_qkv.weight.dtype == torch.float32  # fast_dit: q/k/v fused


def test_oom_step_down_can_be_turned_off(tmp_path):
    from artifex.engine.pipeline import Engine

    eng = Engine.load("tiny-t2v-moe", config=OptimizationConfig(precision="fp32"))
    eng.layout = dataclasses.replace(eng.layout, oom_step_down=False)  # as a parallel layout sets it

    def fail(module, args):
        raise torch.OutOfMemoryError("out of memory (injected)")

    eng.c.experts[0].register_forward_pre_hook(fail)
    with pytest.raises(torch.OutOfMemoryError):
        eng.generate(GenerationRequest(model="tiny-t2v-moe", prompt="x", seed=1, steps=2, frames=5,
                                       output=str(tmp_path / "v.mp4")))
    assert eng.placement.tier == "resident"


def test_a_bf16_vae_halves_the_planned_decode_activations():
    """As measured (memory-stages-h200.json): the streamed decode of TI2V-5B 720p takes 19.9 GiB in fp32 and
    9.97 GiB in bf16; tiled, the whole video it returns dominates and bf16 holds it in fewer bytes too."""
    from artifex.engine.memory import activations

    spec = get_model("ti2v-5b")
    fp32, bf16 = (activations(spec, 1280, 704, 121, 1, False, vae_precision=p)["decode"]
                  for p in ("fp32", "bf16"))
    assert abs(bf16 * 2 / fp32 - 1) < 0.01 and abs(fp32 / GIB - 19.9) < 0.2
    tiled32, tiled16 = (activations(spec, 1280, 704, 121, 1, True, vae_precision=p)["decode"]
                        for p in ("fp32", "bf16"))
    assert tiled16 < tiled32 < fp32


def test_the_planner_counts_the_dit_forward_that_runs(monkeypatch):
    """As measured (memory-stages-denoise-h200.json, 2 blocks over one CFG step): the engine's forward 92.2 KB
    per token for A14B, diffusers' 113.7 KB; diffusers' per-token timesteps (TI2V given an image) add more. The
    engine's CFG in two passes holds the first block's self-attention branch between them (not yet in that
    measurement: counted on top). The engine tells the planner which forward runs: with ``fast_dit`` off,
    diffusers'."""
    from artifex.engine import memory
    from artifex.engine.plan import make_plan

    spec = get_model("t2v-a14b")
    tokens = spec.tokens(1280, 720, 81)
    kv = spec.transformer.layers * 2 * 2 * spec.text_len * spec.transformer.dim * 2
    shared = tokens * spec.transformer.dim * 2  # the first block's self-attention branch (share_first_block)
    art, dif, per_token = (memory.activations(spec, 1280, 720, 81, 1, False, f)["denoise"]
                           for f in ("artifex", "diffusers", "diffusers_per_token"))
    assert abs((art - kv - shared) / tokens / 92_200 - 1) < 0.01 and abs(dif / tokens / 113_700 - 1) < 0.01
    assert memory.activations(spec, 1280, 720, 81, 2, False)["denoise"] - kv == 2 * (art - kv - shared)
    assert per_token > dif
    with pytest.raises(ValueError, match="dit_forward 'fast'; one of artifex, diffusers, diffusers_per_token"):
        memory.activations(spec, 1280, 720, 81, 1, False, "fast")
    seen = []
    real = memory.plan_memory
    monkeypatch.setattr(memory, "plan_memory", lambda *a, **k: seen.append(a[7]) or real(*a, **k))
    parts = meta_components(spec)
    for fast in (True, False):
        make_plan(spec, OptimizationConfig(device="cpu", fast_dit=fast),
                  type("Parts", (), dict(text_encoder=parts[0], vae=parts[1], experts=parts[2])))
    assert seen == ["artifex", "diffusers"]


def test_vae_tile_size_reaches_the_vae_and_the_planner(engine, tmp_path):
    from artifex.engine.memory import activations

    eng = engine("tiny-t2v-moe", precision="fp32", vae_tiling=True, vae_tile_size=128)
    vae = eng.c.vae
    assert vae.use_tiling and (vae.tile_sample_min_height, vae.tile_sample_stride_height) == (128, 96)
    r = eng.generate(GenerationRequest(model="tiny-t2v-moe", prompt="a kite", seed=5, steps=2, frames=5,
                                       output=str(tmp_path / "t.mp4")))
    assert r.video_path.exists() and r.plan.vae_tiling
    spec = get_model("t2v-a14b")
    small, default = (activations(spec, 1280, 720, 81, 1, True, vae_tile_size=e)["decode"] for e in (128, 0))
    assert small < default
    with pytest.raises(InvalidRequestError, match="vae_tile_size"):
        OptimizationConfig(vae_tile_size=100)


def test_combine_keeps_each_gpus_runs_apart(tmp_path):
    """memory-<gpu>.json gathers only that GPU's run files (an H100 and an H200 run of the same settings stay apart)."""
    from artifex.bench.memory import combine

    def run(budget, peak, predicted, total):
        return {"budget": budget, "tier": "model_offload", "size": "1280x704x121", "steps": 50, "vae_tiling": False,
                "predicted_peak_gib": predicted, "measured_peak_gib": peak, "timings_s": {"total": total},
                "planner_rel_error": round(abs(predicted - peak) / peak, 3)}

    for gpu, peak in (("h100", 11.6), ("h200", 12.2)):
        (tmp_path / f"memory-ti2v-5b-1280x704-{gpu}.json").write_text(json.dumps({
            "model": "ti2v-5b", "device": {"name": gpu}, "date": "d", "versions": {},
            "runs": [run(None, 42.0, 45.0, 100.0), run("24GB", peak, 12.4, 110.0)]}))
    data = combine(tmp_path, "h200")
    assert data["sources"] == ["memory-ti2v-5b-1280x704-h200.json"]
    assert data["summary"]["ti2v5b_720p_24gb"]["peak_gib"] == 12.2
    assert data["summary"]["ti2v5b_720p_unconstrained_time_s"] == 100.0
    assert json.loads((tmp_path / "memory-h200.json").read_text())["summary"]["planner_max_rel_error"] == 0.071


def test_a_tiers_peak_is_never_printed_below_one_of_its_stages():
    """`artifex plan` prints the peak and the stages of ``Estimate.to_dict`` to one decimal: a stage of 12.149 GiB
    used to reach it already rounded to 12.15, printing as 12.2 beside a peak of 12.1."""
    from artifex.engine.memory import GIB, Estimate

    for gib in (12.149, 78.649, 90.5499, 0.049, 3.0):
        stages = {"encode_text": int(1.0 * GIB), "denoise": int(gib * GIB), "decode": int(0.5 * GIB)}
        e = Estimate("resident", max(stages.values()), stages)
        shown = e.to_dict()
        assert shown["peak_gib"] == max(shown["stages_gib"].values()) == e.peak_gib
        for digits in (1, 2):
            peak = f"{shown['peak_gib']:.{digits}f}"
            assert peak == max((f"{v:.{digits}f}" for v in shown["stages_gib"].values()), key=float), (gib, digits)
