"""The engine end to end on tiny models: MoE switch, TI2V/I2V, mp4, seeds, sidecar, and the twin comparisons."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch

from artifex.engine.pipeline import expert_schedule, initial_noise
from artifex.engine.request import GenerationRequest, resolve_request
from artifex.models.registry import get_model


def generate(eng, tmp_path, name="out.mp4", events=None, **kw):
    kw.setdefault("prompt", "a red kite over the beach at sunset")
    kw.setdefault("seed", 7)
    req = GenerationRequest(model=eng.spec.name, output=str(tmp_path / name), **kw)
    return eng.generate(req, on_event=events)


def read_mp4(path):
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
        return stream.codec_context.name, float(stream.average_rate), np.stack(frames)


def test_moe_switches_experts_exactly_where_timesteps_and_boundary_say(engine, tmp_path):
    from diffusers import UniPCMultistepScheduler

    eng = engine("tiny-t2v-moe")
    events = []
    r = generate(eng, tmp_path, steps=12, events=events.append)
    # Expected switch from an independent scheduler with the same shift.
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=12.0)
    sched.set_timesteps(12)
    ts = sched.timesteps.tolist()
    expected = next(i for i, t in enumerate(ts) if t < 0.875 * 1000)
    assert 0 < expected < 12
    assert r.switch_step == expected
    assert r.experts_per_step == [0] * expected + [1] * (12 - expected)
    denoise = [e for e in events if e.stage == "denoise"]
    assert [e.step for e in denoise] == list(range(1, 13))
    assert [e.expert for e in denoise] == r.experts_per_step
    assert [e.stage for e in events if e.stage != "denoise"] == ["encode_text", "decode", "write", "done"]
    assert expert_schedule(torch.tensor([999.0, 875.0, 874.9, 10.0]), 0.875, 1000) == [0, 0, 1, 1]


def test_mp4_decodes_to_requested_frames_size_and_fps(engine, tmp_path):
    r = generate(engine("tiny-t2v-moe"), tmp_path, width=128, height=64, frames=13, steps=3)
    codec, fps, frames = read_mp4(r.video_path)
    assert codec == "h264" and fps == 16
    assert frames.shape == (13, 64, 128, 3)
    assert frames.std() > 1.0  # not a blank video


def test_seeds_reproduce_and_differ(engine, tmp_path):
    eng = engine("tiny-ti2v")
    a = generate(eng, tmp_path, "a.mp4", seed=11, steps=4, frames=9)
    b = generate(eng, tmp_path, "b.mp4", seed=11, steps=4, frames=9)
    c = generate(eng, tmp_path, "c.mp4", seed=12, steps=4, frames=9)
    assert torch.equal(a.latents, b.latents)
    assert read_mp4(a.video_path)[2].tobytes() == read_mp4(b.video_path)[2].tobytes()
    assert not torch.allclose(a.latents, c.latents)


def test_sidecar_holds_what_it_claims(engine, tmp_path):
    r = generate(engine("tiny-t2v-moe"), tmp_path, steps=4, frames=9, guidance=5.0)
    side = json.loads(r.sidecar_path.read_text())
    assert r.sidecar_path == r.video_path.with_suffix(".json")
    assert side["request"]["guidance"] == 5.0 and side["request"]["prompt"] == "a red kite over the beach at sunset"
    assert side["seed"] == 7
    assert side["settings"]["guidance"] == [5.0, 3.0] and side["settings"]["shift"] == 12.0
    assert side["settings"]["frames"] == 9 and side["settings"]["steps"] == 4
    assert side["video"] == {"path": r.video_path.name, "codec": "h264", "pix_fmt": "yuv420p", "color": "bt709 tv",
                             "fps": 16, "frames": 9, "width": 160, "height": 96}
    assert set(side["timings_s"]) >= {"load", "encode_text", "denoise", "decode", "write", "total"}
    assert all(v >= 0 for v in side["timings_s"].values())
    assert side["timings_s"]["total"] >= side["timings_s"]["denoise"]
    assert side["versions"]["torch"] == torch.__version__.split("+")[0] or side["versions"]["torch"].startswith(
        torch.__version__.split("+")[0])
    assert side["versions"]["diffusers"] and side["versions"]["transformers"]
    device_type = torch.device(r.plan.device).type
    assert side["device"]["type"] == device_type
    memory_key = "gpu_max_allocated_gib" if device_type == "cuda" else "cpu_process_max_rss_gib"
    assert side["peak_memory"][memory_key] > 0
    assert side["plan"]["placement"] == "resident" and side["plan"]["precision"] == "bf16"
    assert side["experts_per_step"] == r.experts_per_step and side["switch_step"] == r.switch_step
    assert side["model"]["tokens_per_forward"] == get_model("tiny-t2v-moe").tokens(160, 96, 9)
    att = side["attention"]
    assert att["requested"] == "auto" and att["chosen"] == att["chain"][0] and att["chain"][-1] == "sdpa-math"
    assert att["shape"] == [1, side["model"]["tokens_per_forward"], 2, 32]
    # each step's end: four steps inside the denoise stage's time, the median among them
    steps = side["denoise_steps"]
    assert steps["steps"] == 4 and steps["clock"] == ("cuda events" if device_type == "cuda" else "host")
    assert 0 < steps["prepare_s"] + steps["steps_s"] <= side["timings_s"]["denoise"]
    assert min(steps["first_s"], steps["second_s"], steps["last_s"]) <= steps["median_s"]
    assert steps["steps_s"] >= steps["first_s"] + steps["second_s"] + steps["last_s"]


def test_ti2v_text_and_image_modes(engine, tmp_path, image_file):
    eng = engine("tiny-ti2v")
    text = generate(eng, tmp_path, "t.mp4", steps=3, frames=9)
    img = generate(eng, tmp_path, "i.mp4", steps=3, frames=9, image=str(image_file))
    assert text.latents.shape == img.latents.shape == (1, 48, 3, 10, 16)
    assert not torch.allclose(text.latents, img.latents)
    # With an image, the first latent frame is the encoded image itself.
    spec, s, image = resolve_request(GenerationRequest(model="tiny-ti2v", prompt="x", image=str(image_file)))
    from artifex.engine.pipeline import image_to_tensor

    cond = eng.encode_video(image_to_tensor(image, s.width, s.height).unsqueeze(2))
    assert torch.allclose(img.latents[:, :, :1], cond.float().cpu(), atol=1e-5)
    assert read_mp4(img.video_path)[2].shape == (9, 160, 256, 3)


def test_i2v_from_an_image(engine, tmp_path, image_file):
    r = generate(engine("tiny-i2v-moe"), tmp_path, steps=4, frames=9, image=str(image_file))
    assert r.latents.shape == (1, 16, 3, 12, 20)
    assert r.switch_step is not None
    assert read_mp4(r.video_path)[2].shape == (9, 96, 160, 3)


# -- the engine against its twin: diffusers' own Wan pipelines on the same checkpoint --------
def _diffusers_latents(spec, ckpt, settings, image=None):
    from diffusers import WanImageToVideoPipeline, WanPipeline

    if image is not None:
        base = WanPipeline.from_pretrained(ckpt, dtype=torch.float32) if spec.task == "ti2v" else None
        if base is not None:  # TI2V with an image runs through diffusers' I2V pipeline with expand_timesteps
            pipe = WanImageToVideoPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                                           scheduler=base.scheduler, transformer=base.transformer,
                                           image_processor=None, image_encoder=None, expand_timesteps=True)
        else:
            pipe = WanImageToVideoPipeline.from_pretrained(ckpt, dtype=torch.float32)
        extra = {"image": image}
    else:
        pipe = WanPipeline.from_pretrained(ckpt, dtype=torch.float32)
        extra = {}
    pipe.vae.to(torch.float32)
    g = settings.guidance
    out = pipe(prompt=settings.prompt, negative_prompt=settings.negative_prompt, height=settings.height,
               width=settings.width, num_frames=settings.frames, num_inference_steps=settings.steps,
               guidance_scale=g[0], guidance_scale_2=g[1] if len(g) > 1 else None,
               latents=initial_noise(spec, settings), output_type="latent", max_sequence_length=512, **extra)
    return out.frames.float()


def _rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("model, with_image", [("tiny-t2v-moe", False), ("tiny-ti2v", False), ("tiny-ti2v", True),
                                               ("tiny-i2v-moe", True)])
def test_engine_matches_diffusers_pipeline(engine, tmp_path, tiny_checkpoint, image_file, model, with_image):
    """fp32 on both sides (no TF32): the same latents as diffusers' WanPipeline / WanImageToVideoPipeline."""
    from PIL import Image

    spec = get_model(model)
    eng = engine(model, precision="fp32", tf32=False)
    w, h = spec.sizes[0]
    img_path = None
    if with_image:  # an image already at the target size, so both sides see the same pixels
        img_path = tmp_path / "sized.png"
        Image.open(image_file).convert("RGB").resize((w, h)).save(img_path)
    r = generate(eng, tmp_path, steps=5, frames=9, image=str(img_path) if img_path else None)
    image = Image.open(img_path).convert("RGB") if img_path else None
    ref = _diffusers_latents(spec, tiny_checkpoint(model), r.settings, image)
    assert ref.shape == r.latents.shape
    assert _rel_l2(r.latents, ref) < 1e-4


def test_batched_cfg_swap_offload_and_channels_last_match_the_default(engine, tmp_path):
    base = generate(engine("tiny-t2v-moe", precision="fp32", tf32=False), tmp_path, "base.mp4", steps=5, frames=9)
    for fields in [dict(max_batch_size=2), dict(experts="swap"), dict(offload_to_cpu=True),
                   dict(use_channels_last=True), dict(vae_slicing=True), dict(fast_vae=False)]:
        eng = engine("tiny-t2v-moe", precision="fp32", tf32=False, **fields)
        r = generate(eng, tmp_path, "v.mp4", steps=5, frames=9)
        assert _rel_l2(r.latents, base.latents) < 1e-5, fields
        frames_a, frames_b = read_mp4(base.video_path)[2], read_mp4(r.video_path)[2]
        assert np.abs(frames_a.astype(int) - frames_b.astype(int)).mean() < 1.0, fields
    assert engine("tiny-t2v-moe", precision="fp32", experts="swap").plan.placement == "expert_swap"
    assert engine("tiny-t2v-moe", precision="fp32", offload_to_cpu=True).plan.placement == "model_offload"


def test_bf16_default_stays_close_to_fp32(engine, tmp_path):
    a = generate(engine("tiny-ti2v"), tmp_path, "a.mp4", steps=4, frames=9)
    b = generate(engine("tiny-ti2v", precision="fp32"), tmp_path, "b.mp4", steps=4, frames=9)
    assert _rel_l2(a.latents, b.latents) < 0.05


def test_engine_refuses_a_request_for_another_model(engine, tmp_path):
    with pytest.raises(ValueError, match="this engine runs tiny-ti2v"):
        engine("tiny-ti2v").generate(GenerationRequest(model="tiny-t2v-moe", prompt="x"))


def test_torch_compile_of_the_blocks_matches_eager_without_recompiles(engine, tmp_path):
    """use_torch_compile compiles the block's two parts once for all blocks of both experts (the first block's
    CFG passes included, one of which skips the self-attention part): the video stays the same, and a second
    request of the same shape compiles nothing new."""
    import torch._dynamo

    torch._dynamo.reset()  # other tests compiled the same block function under other global state (TF32)
    eager = generate(engine("tiny-t2v-moe", precision="fp32", tf32=False), tmp_path, "e.mp4", steps=3, frames=5)
    eng = engine("tiny-t2v-moe", precision="fp32", tf32=False, use_torch_compile=True)
    cores = {b._artifex_core for e in eng.c.experts for b in e.blocks}
    assert len(cores) == 1 and all(hasattr(fn, "_torchdynamo_orig_callable") for fn in next(iter(cores)))
    with torch._dynamo.config.patch(error_on_recompile=True):  # one graph per part serves every block of both
        compiled = generate(eng, tmp_path, "c.mp4", steps=3, frames=5)
        again = generate(eng, tmp_path, "c2.mp4", steps=3, frames=5, seed=8, prompt="another prompt")
    assert _rel_l2(compiled.latents, eager.latents) < 1e-4
    assert compiled.plan.compile is True
    assert not torch.equal(again.latents, compiled.latents)


def test_diffusers_forward_with_compiled_repeated_blocks_still_works(engine, tmp_path):
    eng = engine("tiny-ti2v", precision="fp32", tf32=False, use_torch_compile=True, fast_dit=False)
    assert all(b._compiled_call_impl is not None for b in eng.c.experts[0].blocks)
    fast = generate(engine("tiny-ti2v", precision="fp32", tf32=False), tmp_path, "f.mp4", steps=3, frames=5)
    plain = generate(eng, tmp_path, "p.mp4", steps=3, frames=5)
    assert _rel_l2(fast.latents, plain.latents) < 1e-4


def test_a_progress_callback_can_cancel_between_steps(engine, tmp_path):
    from artifex.errors import GenerationCancelled

    seen = []

    def cancel_at_3(e):
        seen.append(e.stage)
        if e.stage == "denoise" and e.step == 3:
            raise GenerationCancelled("stop")

    with pytest.raises(GenerationCancelled):
        generate(engine("tiny-ti2v"), tmp_path, "x.mp4", steps=6, frames=5, events=cancel_at_3)
    assert seen.count("denoise") == 3 and "decode" not in seen
    assert not (tmp_path / "x.mp4").exists() and not (tmp_path / "x.json").exists()


def test_a_cancel_at_the_write_event_leaves_no_video(engine, tmp_path):
    """The "write" event comes once the mp4 is complete; a cancel that lands there still cancels, and the job
    leaves neither the mp4 nor its sidecar behind."""
    from artifex.errors import GenerationCancelled

    seen = []

    def cancel_at_write(e):
        seen.append(e.stage)
        if e.stage == "write":
            assert (tmp_path / "w.mp4").is_file()  # it was written, and is about to go
            raise GenerationCancelled("too late, but asked")

    with pytest.raises(GenerationCancelled):
        generate(engine("tiny-ti2v"), tmp_path, "w.mp4", steps=2, frames=5, events=cancel_at_write)
    assert seen[-2:] == ["decode", "write"] and "done" not in seen
    assert not (tmp_path / "w.mp4").exists() and not (tmp_path / "w.json").exists()


def test_the_decoder_warm_up_runs_beside_the_denoise_once_per_shape_and_changes_nothing(engine, tmp_path,
                                                                                        monkeypatch):
    """Where it applies (a GPU; here the CPU let in), a first decode at a shape is preceded by a decode of three
    latent frames of random latents on a thread while the denoise runs; the decode then gets the latents it gets
    without it and the encoder the same frames, a shape decoded before skips it, a failing warm-up only costs the
    head start, and it runs only with ARTIFEX_DECODE_WARM_UP=on (off by default) and room beside the denoise.
    (The frames handed to the encoder are compared, not the mp4 files: in this test process x264 with frame
    threads has written different bytes for the same frames now and then, with or without a warm-up.)"""
    import threading

    from artifex.engine import pipeline, video

    eng = engine("tiny-ti2v", vram_budget="8GB")  # a budget: the warm-up's room is planned against one
    kw = dict(steps=2, frames=13, width=160, height=96)
    fed: list[np.ndarray] = []
    add = video.Mp4Stream.add
    monkeypatch.setattr(video.Mp4Stream, "add", lambda self, frames: (fed.append(frames.copy()), add(self, frames)))
    base = generate(eng, tmp_path, "base.mp4", **kw)
    base_frames = np.concatenate(fed)
    fed.clear()
    assert "decode_warm_up" not in base.sidecar and base.memory["decode_warm_up_fits"]  # room, but not on a CPU
    monkeypatch.setattr(pipeline, "DECODER_WARM_UP_DEVICES", ("cuda", "cpu"))
    eng._decoded.clear()
    assert "decode_warm_up" not in generate(eng, tmp_path, "default.mp4", **kw).sidecar  # off unless asked for
    fed.clear()
    eng._decoded.clear()
    monkeypatch.setenv("ARTIFEX_DECODE_WARM_UP", "on")
    seen, fail, inputs, events = [], [], [], []
    real = eng.decode_chunks

    def spy(latents):
        steps_done = sum(e.stage == "denoise" for e in events)
        seen.append((threading.current_thread().name, latents.shape[2], steps_done))
        inputs.append(latents.clone())
        if fail and threading.current_thread().name == "artifex-decoder-warm-up":
            raise RuntimeError(fail[0])
        return real(latents)

    monkeypatch.setattr(eng, "decode_chunks", spy)
    warm = generate(eng, tmp_path, "warm.mp4", events=events.append, **kw)
    # after the first step (Triton's compiler is not for two threads at once), before the real decode
    assert seen == [("artifex-decoder-warm-up", 3, 1), (threading.current_thread().name, 4, 2)]
    report = warm.sidecar["decode_warm_up"]
    assert report["latent_frames"] == 3 and report["beside"] == "denoise" and report["seconds"] > 0
    assert "error" not in report
    assert torch.equal(warm.latents, base.latents) and torch.equal(inputs[1].cpu(), base.latents)
    assert not torch.equal(inputs[0].cpu(), base.latents[:, :, :3])  # its own random latents
    assert base_frames.shape == (13, 96, 160, 3) and np.array_equal(np.concatenate(fed), base_frames)
    assert read_mp4(warm.video_path)[2].shape == (13, 96, 160, 3)

    seen.clear()  # the shape is decoded: no warm-up
    assert "decode_warm_up" not in generate(eng, tmp_path, "again.mp4", **kw).sidecar and len(seen) == 1
    eng._decoded.clear()
    seen.clear()  # one step: nothing left to run beside it
    assert "decode_warm_up" not in generate(eng, tmp_path, "one.mp4", **(kw | {"steps": 1})).sidecar
    assert len(seen) == 1
    eng._decoded.clear()
    seen.clear()  # fp8 with its first step unquantized: the first quantized step meets the fp8 kernels first
    events.clear()
    plan = (eng.plan.fp8, eng.plan.fp8_bf16_steps)
    eng.plan.fp8, eng.plan.fp8_bf16_steps = "gemm", 1  # the schedule only: these tiny experts hold no fp8 layers
    try:
        generate(eng, tmp_path, "fp8.mp4", events=events.append, **(kw | {"steps": 4}))
    finally:
        eng.plan.fp8, eng.plan.fp8_bf16_steps = plan
    assert seen[0] == ("artifex-decoder-warm-up", 3, 2)

    seen.clear()
    fail.append("no room")  # another shape, and its warm-up fails: the job does not
    other = generate(eng, tmp_path, "other.mp4", **(kw | {"width": 128, "height": 64}))
    assert other.sidecar["decode_warm_up"]["error"] == "RuntimeError: no room" and len(seen) == 2
    assert read_mp4(other.video_path)[2].shape == (13, 64, 128, 3)

    eng._decoded.clear()
    seen.clear()
    monkeypatch.setenv("ARTIFEX_DECODE_WARM_UP", "off")
    assert "decode_warm_up" not in generate(eng, tmp_path, "off.mp4", **kw).sidecar and len(seen) == 1
    monkeypatch.setenv("ARTIFEX_DECODE_WARM_UP", "on")
    from artifex.engine.memory import estimate

    job = eng.prepare(GenerationRequest(model="tiny-ti2v", prompt="x", **kw))
    est = estimate(job.spec, eng.weights, "resident", 160, 96, 13, eng.plan.cfg_batch, False, "artifex",
                   eng.plan.vae_precision)
    extra = eng.memory_guard.decode_warm_up_bytes
    assert 0 < extra(job, est, False, 2 * est.peak_bytes) <= est.stages["decode"]
    assert extra(job, est, False, est.stages["denoise"]) is None  # no room for a decode beside the denoise
    assert extra(job, est, False, None) is None  # no budget: a CPU without one
    assert warm.memory["predicted_decode_warm_up_gib"] == round(extra(job, est, False, 2 * est.peak_bytes) / 2**30, 2)
