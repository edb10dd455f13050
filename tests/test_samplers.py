"""Few-step samplers (Euler, DMD) against the published schedules and diffusers' schedulers; the request fields
that pick them; the expert switch by step index; one transformer pass per step without CFG; and the checkpoint's
own scheduler settings (shift, solver) used instead of the model's defaults (issue 20)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from artifex.engine.pipeline import Engine, expert_schedule, initial_noise
from artifex.engine.request import GenerationRequest, resolve_request
from artifex.engine.samplers import (
    DMD_SEED_OFFSET,
    FASTWAN_TIMESTEPS,
    LIGHTNING_TIMESTEPS,
    DmdSampler,
    FlowEuler,
    make_sampler,
)
from artifex.errors import InvalidRequestError
from artifex.models.registry import get_model
from artifex.presets import get_preset


def resolve(**kw):
    kw.setdefault("model", "tiny-t2v-moe")
    kw.setdefault("prompt", "a cat")
    kw.setdefault("seed", 3)
    return resolve_request(GenerationRequest(**kw))[1]


def generate(eng, tmp_path, name="out.mp4", **kw):
    kw.setdefault("prompt", "a red kite over the beach at sunset")
    kw.setdefault("seed", 7)
    kw.setdefault("frames", 5)
    return eng.generate(GenerationRequest(model=eng.spec.name, output=str(tmp_path / name), **kw))


def _rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


# -- schedules ------------------------------------------------------------------------------
def test_euler_at_shift_5_and_4_steps_is_the_lightning_schedule():
    s = resolve(sampler="euler", steps=4, shift=5.0, guidance=1.0, guidance_low=1.0)
    sampler = make_sampler(s, {})
    sampler.set_timesteps(s.steps)
    assert sampler.timesteps.tolist() == pytest.approx([1000.0, 937.5, 2500 / 3, 625.0], abs=1e-3)
    assert sampler.timesteps.tolist() == pytest.approx(list(LIGHTNING_TIMESTEPS), abs=0.05)
    assert sampler.sigmas[-1].item() == 0.0
    # The same schedule given as timesteps: used as given, not shifted again.
    explicit = resolve(sampler="euler", timesteps=list(LIGHTNING_TIMESTEPS))
    assert explicit.steps == 4 and explicit.shift_source != "request"
    again = make_sampler(explicit, {})
    again.set_timesteps(4)
    assert again.timesteps.tolist() == pytest.approx(list(LIGHTNING_TIMESTEPS), abs=1e-3)


def test_dmd_defaults_to_fastwans_published_three_steps():
    s = resolve(model="tiny-ti2v", sampler="dmd", guidance=1.0)
    assert s.steps == 3 and s.timesteps == list(FASTWAN_TIMESTEPS) == [1000.0, 757.0, 522.0]
    sampler = make_sampler(s, {})
    sampler.set_timesteps(3)
    assert sampler.timesteps.tolist() == pytest.approx([1000.0, 757.0, 522.0], abs=1e-3)
    assert sampler.sigmas.tolist() == pytest.approx([1.0, 0.757, 0.522, 0.0], abs=1e-6)
    # Another step count, or a shift, gives the shifted linear schedule instead.
    other = resolve(model="tiny-ti2v", sampler="dmd", steps=4, shift=5.0)
    assert other.timesteps is None and other.steps == 4


def test_euler_equals_diffusers_flow_match_euler_on_the_same_sigmas():
    from diffusers import FlowMatchEulerDiscreteScheduler

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 16, 3, 6, 10, generator=g)
    outputs = [torch.randn(x0.shape, generator=g) for _ in range(4)]
    for ours, sigmas, shift in [(FlowEuler(shift=5.0), [1.0, 0.75, 0.5, 0.25], 5.0),
                                (FlowEuler([0.99, 0.8, 0.31, 0.05]), [0.99, 0.8, 0.31, 0.05], 1.0)]:
        ref = FlowMatchEulerDiscreteScheduler(shift=shift)
        ref.set_timesteps(sigmas=sigmas)
        ours.set_timesteps(4)
        assert torch.allclose(ours.timesteps, ref.timesteps, rtol=0, atol=1e-4)
        a = b = x0
        for v, t in zip(outputs, ours.timesteps):
            a = ours.step(v, t, a, return_dict=False)[0]
            b = ref.step(v, t, b, return_dict=False)[0]
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


def test_dmd_step_predicts_x0_and_renoises_with_seeded_noise():
    """Each step: x0 = x - s * v, then (1 - s_next) * x0 + s_next * noise with the CPU generator seeded from the
    request seed; the same as diffusers' stochastic flow-match Euler with that generator."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 48, 2, 4, 4, generator=g)
    v = [torch.randn(x.shape, generator=g) for _ in range(3)]
    dmd = DmdSampler(sigmas=[t / 1000 for t in FASTWAN_TIMESTEPS], seed=5)
    dmd.set_timesteps(3)
    first = dmd.step(v[0], dmd.timesteps[0], x)[0]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5 + DMD_SEED_OFFSET))
    assert torch.allclose(first, 0.243 * (x - 1.0 * v[0]) + 0.757 * noise, atol=1e-6)

    ref = FlowMatchEulerDiscreteScheduler(shift=1.0, stochastic_sampling=True)
    ref.set_timesteps(sigmas=[t / 1000 for t in FASTWAN_TIMESTEPS])
    ref_gen = torch.Generator().manual_seed(5 + DMD_SEED_OFFSET)
    dmd.set_timesteps(3)  # restarts the noise stream too
    a = b = x
    for vi, t in zip(v, dmd.timesteps):
        before = a
        a = dmd.step(vi, t, a)[0]
        b = ref.step(vi, t, b, generator=ref_gen, return_dict=False)[0]
    assert torch.allclose(a, b, rtol=0, atol=1e-6)
    assert torch.allclose(a, before - 0.522 * v[2], rtol=0, atol=1e-6)  # the last step returns x0, no noise


def test_dmd_generation_is_reproducible_per_seed(engine, tmp_path):
    eng = engine("tiny-ti2v", precision="fp32", tf32=False)
    a = generate(eng, tmp_path, "a.mp4", sampler="dmd", guidance=1.0, seed=11)
    b = generate(eng, tmp_path, "b.mp4", sampler="dmd", guidance=1.0, seed=11)
    c = generate(eng, tmp_path, "c.mp4", sampler="dmd", guidance=1.0, seed=12)
    assert a.settings.steps == 3 and a.settings.timesteps == [1000.0, 757.0, 522.0]
    assert torch.equal(a.latents, b.latents)
    assert not torch.allclose(a.latents, c.latents)
    side = json.loads(a.sidecar_path.read_text())
    assert side["settings"]["sampler"] == "dmd" and side["settings"]["timesteps"] == [1000.0, 757.0, 522.0]


# -- one pass per step without CFG; the switch by step index ----------------------------------
def _count_calls(eng):
    calls = []
    handles = [e.register_forward_hook(lambda m, args, kwargs, out, i=i: calls.append(i), with_kwargs=True)
               for i, e in enumerate(eng.c.experts)]
    return calls, handles


def test_guidance_1_calls_the_transformer_once_per_step(engine, tmp_path):
    eng = engine("tiny-t2v-moe")
    calls, handles = _count_calls(eng)
    try:
        r = generate(eng, tmp_path, sampler="euler", steps=4, shift=5.0, guidance=1.0, guidance_low=1.0)
        assert r.experts_per_step == [0, 0, 1, 1]  # boundary 0.875: 1000, 937.5 high; 833.3, 625 low
        assert calls == [0, 0, 1, 1]
        calls.clear()
        r = generate(eng, tmp_path, sampler="euler", steps=4, shift=5.0, guidance=0.5, guidance_low=4.0)
        assert calls == [0, 0, 1, 1, 1, 1]  # guidance <= 1: one pass; the low expert's CFG: two (cfg batch 1)
    finally:
        for h in handles:
            h.remove()


def test_expert_switch_by_step_index(engine, tmp_path):
    assert expert_schedule(torch.tensor([1000.0, 999.0, 998.0, 10.0]), 0.875, 1000, switch_step=1) == [0, 1, 1, 1]
    assert expert_schedule(torch.tensor([10.0, 5.0]), 0.875, 1000, switch_step=2) == [0, 0]
    eng = engine("tiny-t2v-moe")
    calls, handles = _count_calls(eng)
    try:
        r = generate(eng, tmp_path, sampler="euler", steps=4, shift=5.0, guidance=1.0, guidance_low=1.0,
                     switch_step=3)
    finally:
        for h in handles:
            h.remove()
    assert r.experts_per_step == [0, 0, 0, 1] and r.switch_step == 3 and calls == [0, 0, 0, 1]
    assert json.loads(r.sidecar_path.read_text())["settings"]["switch_step"] == 3


@pytest.mark.parametrize("kw, pattern", [
    (dict(sampler="ddim"), r"sampler: unknown sampler 'ddim' \(allowed: unipc, euler, dmd\)"),
    (dict(timesteps=[1000, 800]), r"timesteps: the unipc sampler takes no explicit schedule.*\(allowed: euler, dmd\)"),
    (dict(sampler="euler", timesteps=[1000, 1000, 500]), r"timesteps: must decrease strictly; value 1 \(1000\)"),
    (dict(sampler="euler", timesteps=[1200, 500]), r"timesteps: value 0 is 1200, outside \(0, 1000\]"),
    (dict(sampler="euler", timesteps=[900, 0]), r"timesteps: value 1 is 0, outside"),
    (dict(sampler="euler", sigmas=[1.0, float("nan")]), r"sigmas: value 1 is nan"),
    (dict(sampler="euler", sigmas=[1.0, 0.5], timesteps=[1000, 500]), r"sigmas: give timesteps or sigmas, not both"),
    (dict(sampler="euler", sigmas="1.0"), r"sigmas: must be a non-empty list of numbers"),
    (dict(sampler="euler", sigmas=[]), r"sigmas: must be a non-empty list of numbers"),
    (dict(sampler="euler", sigmas=[1.0, "x"]), r"sigmas: must be a number, got 'x'"),
    (dict(sampler="euler", sigmas=[1.0, 0.5], steps=3), r"sigmas: has 2 values but steps is 3"),
    (dict(sampler="euler", sigmas=[1.0, 0.5], shift=5.0), r"shift: has no effect with explicit sigmas"),
    (dict(model="tiny-ti2v", switch_step=1), r"switch_step: tiny-ti2v has one expert"),
    (dict(steps=4, switch_step=5), r"switch_step: must be in \[0, 4\]"),
    (dict(steps=4, switch_step=1.5), r"switch_step: must be an integer"),
])
def test_bad_sampler_fields_are_refused_by_name(kw, pattern):
    with pytest.raises(InvalidRequestError, match=pattern):
        resolve(**kw)


def test_unipc_stays_the_default():
    s = resolve()
    assert s.sampler == "unipc" and s.timesteps is None and s.sigmas is None and s.switch_step is None
    assert type(make_sampler(s, {})).__name__ == "UniPCMultistepScheduler"


# -- issue 20: the checkpoint's scheduler settings ------------------------------------------
def _diffusers_latents(ckpt, settings, flow_shift=None):
    from diffusers import UniPCMultistepScheduler, WanPipeline

    pipe = WanPipeline.from_pretrained(ckpt, dtype=torch.float32)
    if flow_shift is not None:
        pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=flow_shift)
    g = settings.guidance
    out = pipe(prompt=settings.prompt, negative_prompt=settings.negative_prompt, height=settings.height,
               width=settings.width, num_frames=settings.frames, num_inference_steps=settings.steps,
               guidance_scale=g[0], guidance_scale_2=g[1] if len(g) > 1 else None,
               latents=initial_noise(get_model(settings.model), settings), output_type="latent",
               max_sequence_length=512)
    return out.frames.float()


def test_the_checkpoints_shift_and_solver_settings_are_used(checkpoint_copy, tmp_path, caplog):
    """A checkpoint whose scheduler says flow_shift 3 and solver_order 1 runs with them (diffusers-equal latents,
    fp32), warned once at load; an explicit request shift still wins; the sidecar says where the shift came from."""
    from artifex.config import OptimizationConfig

    ckpt = checkpoint_copy("tiny-t2v-moe")
    path = ckpt / "scheduler" / "scheduler_config.json"
    cfg = json.loads(path.read_text())
    assert cfg["flow_shift"] == 12.0
    path.write_text(json.dumps({**cfg, "flow_shift": 3.0, "solver_order": 1}))
    with caplog.at_level(logging.WARNING, logger="artifex"):
        eng = Engine.load("tiny-t2v-moe", checkpoint=str(ckpt), config=OptimizationConfig(precision="fp32",
                                                                                          tf32=False))
    warned = [r.getMessage() for r in caplog.records if "scheduler_config.json" in r.getMessage()]
    assert any("flow_shift 3 differs from tiny-t2v-moe's 12" in w for w in warned)
    assert any("solver_order 1 differs from Wan's default 2" in w for w in warned)
    assert len(warned) == 2

    r = generate(eng, tmp_path, "ckpt.mp4", steps=5, frames=9)
    assert r.settings.shift == 3.0 and r.settings.shift_source == "checkpoint"
    side = json.loads(r.sidecar_path.read_text())
    assert side["settings"]["shift"] == 3.0 and side["settings"]["shift_source"] == "checkpoint"
    assert _rel_l2(r.latents, _diffusers_latents(ckpt, r.settings)) < 1e-4

    explicit = generate(eng, tmp_path, "req.mp4", steps=5, frames=9, shift=7.0)
    assert explicit.settings.shift == 7.0 and explicit.settings.shift_source == "request"
    assert _rel_l2(explicit.latents, _diffusers_latents(ckpt, explicit.settings, flow_shift=7.0)) < 1e-4
    assert _rel_l2(explicit.latents, r.latents) > 1e-3
    assert sum("scheduler_config.json" in x.getMessage() for x in caplog.records) == 2  # once, at load


def test_shift_source_without_a_checkpoint_value():
    assert resolve().shift_source == "model default" and resolve().shift == 12.0
    assert resolve_request(GenerationRequest(model="tiny-t2v-moe", prompt="x"), checkpoint_shift=3.0)[1].shift == 3.0
    assert resolve(shift=4.0).shift_source == "request"


# -- distilled profiles and the turbo preset ----------------------------------------------------
@pytest.mark.parametrize("model, sampler, timesteps, guidance, switch", [
    ("ti2v-5b-fastwan", "dmd", FASTWAN_TIMESTEPS, (1.0,), None),
    ("t2v-a14b-lightning", "euler", LIGHTNING_TIMESTEPS, (1.0, 1.0), 2),
    ("i2v-a14b-lightning", "euler", LIGHTNING_TIMESTEPS, (1.0, 1.0), 2),
])
def test_distilled_profiles_carry_the_published_schedules(model, sampler, timesteps, guidance, switch):
    spec = get_model(model)
    base = get_model(spec.base)
    assert spec.transformer == base.transformer and spec.vae == base.vae and spec.architecture == base.name
    assert (spec.sampler, spec.timesteps, spec.guidance, spec.switch_step) == (sampler, timesteps, guidance, switch)
    assert base.few_step == model and spec.weights
    if spec.image == "required":
        return  # resolving needs an image file; the tiny twins below cover the request path
    s = resolve(model=model)
    assert (s.sampler, tuple(s.timesteps), s.guidance, s.steps, s.switch_step) == (
        sampler, timesteps, guidance, len(timesteps), switch)


def test_turbo_on_a_base_model_runs_its_profiles_schedule():
    for base in ("tiny-ti2v", "tiny-t2v-moe", "ti2v-5b", "t2v-a14b"):
        profile = get_model(get_model(base).few_step)
        turbo, own = resolve(model=base, preset="turbo"), resolve(model=profile.name)
        for field in ("sampler", "timesteps", "guidance", "steps", "shift", "switch_step", "width", "height"):
            assert getattr(turbo, field) == getattr(own, field), (base, field)
    # a request's own fields still win over the preset; a changed schedule drops the profile's switch step
    s = resolve(model="tiny-t2v-moe", preset="turbo", guidance=3.0, timesteps=[1000, 800, 400])
    assert s.guidance == (3.0, 1.0) and s.steps == 3 and s.switch_step is None
    with pytest.raises(InvalidRequestError, match=r"preset: turbo: s2v-14b has no few-step"):
        get_preset("turbo").sampling(get_model("s2v-14b"))


def test_a_lightning_profile_runs_one_pass_per_step_and_switches_by_index(engine, tmp_path):
    eng = engine("tiny-t2v-moe-lightning")
    calls, handles = _count_calls(eng)
    try:
        r = generate(eng, tmp_path)
    finally:
        for h in handles:
            h.remove()
    assert r.settings.steps == 4 and calls == [0, 0, 1, 1] and r.switch_step == 2
    side = json.loads(r.sidecar_path.read_text())
    assert side["settings"]["sampler"] == "euler" and side["settings"]["timesteps"] == list(LIGHTNING_TIMESTEPS)
