"""``artifex bench pipeline``: the whole generation, diffusers' WanPipeline against Artifex, in one run.

Text encoding, every denoising step, VAE decode and the mp4 write, at the model's default
settings (size, frames, steps, CFG), with random weights at the real shapes unless a
checkpoint is given. In order, on the same components:

1. diffusers' WanPipeline as its docs load it (DiT and UMT5 in bf16 with the fp32-kept
   modules, VAE in fp32, everything on the GPU), per-step times from its step callback,
   frames written with the same PyAV writer (diffusers' ``export_to_video`` needs
   imageio-ffmpeg or OpenCV); with ``--diffusers forwards`` only N DiT forwards are timed
   and multiplied by the run's forward count (said so in the report);
2. Artifex with each configuration asked for (default: bf16 and fp8), after one short
   warm-up generation of the same shape (compile and autotune; its time is reported);
3. the bf16 VAE's error against the fp32 VAE on Artifex's final latents (PSNR, rel L2).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from artifex.bench import PIPELINE_CONFIGS, report
from artifex.models.registry import get_model

log = logging.getLogger("artifex")
GIB = 2**30
PROMPT = "a red kite over a golden beach at sunset, waves rolling in, cinematic light"



def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def diffusers_pipeline(spec, components, device) -> tuple:
    """diffusers' WanPipeline (WanImageToVideoPipeline for I2V) over ``components`` as its docs load it (DiT and
    UMT5 as given, the VAE in fp32 decoding whole frames), everything on ``device``; with the guidance arguments
    of ``spec``'s defaults."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline

    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=spec.shift)
    components.vae.to(torch.float32).disable_tiling()
    kw = dict(tokenizer=components.tokenizer, text_encoder=components.text_encoder, vae=components.vae,
              scheduler=sched, transformer=components.experts[0],
              transformer_2=components.experts[1] if spec.experts == 2 else None, boundary_ratio=spec.boundary)
    pipe = (WanImageToVideoPipeline(**kw) if spec.task == "i2v" else
            WanPipeline(**kw, expand_timesteps=spec.expand_timesteps)).to(device)
    pipe.set_progress_bar_config(disable=True)
    guidance = {"guidance_scale": spec.guidance[0]}
    if spec.experts == 2:
        guidance["guidance_scale_2"] = spec.guidance[1]
    return pipe, guidance


def components_to_cpu(components, device) -> None:
    """Every model back in CPU memory and the GPU's cache emptied (between the runs of a benchmark)."""
    for m in (components.text_encoder, components.vae, *components.experts):
        m.to("cpu")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed_call(pipe, call: dict, steps: int, device, mp4: Path | None = None, fps: int = 16) -> dict:
    """One call of a diffusers pipeline after a one-step warm-up at the same shape (CUDA/cuBLAS/cuDNN set-up,
    allocator), timed by its step callback: the median step, and with ``mp4`` (the frames written there) the text
    (before the first step, less a step), denoise, decode (after the last step), write and total seconds; the
    peak GPU memory."""
    import numpy as np

    from artifex.engine.video import write_mp4

    marks: list[float] = []

    def on_step(pipeline, i, t, kwargs):
        _sync(device)
        marks.append(time.perf_counter())
        return kwargs

    with torch.no_grad():
        pipe(**call, num_inference_steps=1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():  # output_type "np", as the docs use it
        video = pipe(**call, num_inference_steps=steps, callback_on_step_end=on_step).frames
    _sync(device)
    t_end = time.perf_counter()
    per_step = sorted(b - a for a, b in zip(marks, marks[1:]))
    step_s = per_step[len(per_step) // 2] if per_step else marks[0] - t0
    out: dict = {"median_step_s": round(step_s, 3)}
    if mp4 is not None:
        text_s = max(marks[0] - t0 - step_s, 0.0)
        out.update(encode_text_s=round(text_s, 2), denoise_s=round(marks[-1] - t0 - text_s, 2),
                   decode_s=round(t_end - marks[-1], 2))
        t_w = time.perf_counter()
        write_mp4((video[0] * 255).round().astype(np.uint8), mp4, fps=fps)
        out.update(write_s=round(time.perf_counter() - t_w, 2), total_s=round(time.perf_counter() - t0, 2))
    out["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 2) if device.type == "cuda" else None
    return out


def diffusers_run(spec, components, width, height, frames, steps, device, out_dir: Path, mode: str = "full",
                  forwards: int = 3) -> dict:
    """diffusers' WanPipeline on ``components`` (moved to ``device`` and back); per-stage seconds and peak."""
    pipe, guidance = diffusers_pipeline(spec, components, device)
    call = dict(prompt=PROMPT, height=height, width=width, num_frames=frames, **guidance)
    out: dict = {"mode": mode, "steps": steps}
    if mode == "full":
        out.update(timed_call(pipe, call, steps, device, out_dir / "diffusers.mp4", spec.fps))
    else:
        out.update(timed_call(pipe, call, forwards, device))
        step_s = out["median_step_s"]
        out.update(step_s=step_s, total_s=None, denoise_estimate_s=round(step_s * steps, 2),
                   note=f"{forwards} steps run; denoise estimated as the median step ({step_s:.3f} s) x {steps} "
                        "steps; decode/write not estimated")
    del pipe
    components_to_cpu(components, device)
    return out


def artifex_run(spec, components, fields: dict, width, height, frames, steps, device, out_dir: Path, name: str,
                profile: Path | None = None) -> dict:
    """A warm-up generation (2 steps, same shape; with ``fp8_bf16_steps`` N, 2N + 2 so that the quantized steps'
    graphs compile too), then the timed one; per-stage seconds, peak, sidecar bits."""
    from artifex.config import OptimizationConfig
    from artifex.engine.pipeline import Engine
    from artifex.engine.request import GenerationRequest

    engine = Engine.from_components(spec, components, OptimizationConfig(device=str(device), **fields))

    def request(n, path, seed=1):
        return GenerationRequest(model=spec.name, prompt=PROMPT, seed=seed, steps=n, width=width, height=height,
                                 frames=frames, output=str(path))

    t = time.perf_counter()
    engine.generate(request(2 + 2 * fields.get("fp8_bf16_steps", 0), out_dir / f"warmup-{name}.mp4"))
    warm = time.perf_counter() - t
    r = engine.generate(request(steps, out_dir / f"artifex-{name}.mp4"))
    row = {"config": name, "fields": fields, "warmup_s": round(warm, 2), "timings_s": r.timings,
           "total_s": r.timings["total"], "denoise_s": r.timings["denoise"],
           "vae_s": round(r.timings["decode"] + r.timings["write"], 3), "peak_gib": r.peak_memory.get(
               "gpu_max_allocated_gib"), "attention": r.attention.chosen, "tier": r.memory["tier"],
           "fp8": engine.fp8_report, "steps": r.settings.steps}
    if profile is not None:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=acts) as prof:
            engine.generate(request(2, out_dir / f"profile-{name}.mp4"))
        prof.export_chrome_trace(str(profile))
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=40)
        profile.with_suffix(".txt").write_text(table)
        row["profile"] = [str(profile), str(profile.with_suffix(".txt"))]
    row["latents"] = r.latents
    engine.placement.release()
    return row


VAE_VARIANTS = {  # the first is the reference the others are compared with
    "fp32": {"vae_precision": "fp32", "fast_vae": False, "use_channels_last": False},
    "bf16_diffusers": {"vae_precision": "bf16", "fast_vae": False, "use_channels_last": False},
    "bf16": {"vae_precision": "bf16", "fast_vae": True, "use_channels_last": False},  # channels_last_3d on CUDA
}


def vae_variants(spec, components, fp32_state: dict, latents: torch.Tensor, device, lora: str = "") -> dict:
    """Decode the same latents with the VAE in fp32 (its original weights, ``fp32_state``; diffusers' modules), in
    bf16 with diffusers' modules, and in bf16 with Artifex's (``fast_vae``: what the bf16 config runs): seconds,
    peak GiB, and each one's PSNR (8-bit scale) and rel L2 against fp32. ``lora``: the LoRAs the components'
    experts already carry (the engines built here fuse nothing)."""
    from artifex.config import OptimizationConfig
    from artifex.engine.pipeline import Engine

    pixels, out = {}, {}
    for name, fields in VAE_VARIANTS.items():
        components.vae.to(torch.float32).load_state_dict(fp32_state)
        engine = Engine.from_components(spec, components, OptimizationConfig(device=str(device), lora=lora, **fields))
        z = latents.to(device)
        engine.decode(z[:, :, :2])  # warm-up: cuDNN picks its kernels for these shapes
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        pixels[name] = engine.decode(z).float().cpu()
        _sync(device)
        out[name] = {"seconds": round(time.perf_counter() - t, 2), "peak_gib": round(
            torch.cuda.max_memory_allocated(device) / GIB, 2) if device.type == "cuda" else None}
        engine.placement.release()
    for name in list(VAE_VARIANTS)[1:]:
        a, b = pixels[name], pixels["fp32"]
        mse = ((a - b) * 127.5).pow(2).mean().item()
        out[name]["psnr_db_vs_fp32"] = round(10 * math.log10(255**2 / mse), 2) if mse > 0 else None
        out[name]["rel_l2_vs_fp32"] = round(((a - b).norm() / b.norm()).item(), 5)
    components.vae.to(torch.float32).load_state_dict(fp32_state)
    out["light_bf16"] = light_variant(spec, components, latents, device, lora)
    return out


def light_variant(spec, components, latents: torch.Tensor, device, lora: str = "") -> dict:
    """The light decoder (``decoder=light``, bf16) on the same latents, with seeded random weights at the published
    TAEHV widths (the real ones are not shipped): seconds and peak GiB of the decode, of which ``check_s`` is the
    full VAE's sample for the error figure (``light_decoder_check`` = 2). Random weights make no picture, so no
    error is recorded here; a generation with the published file reports it in its sidecar."""
    import tempfile

    from artifex.config import OptimizationConfig
    from artifex.engine.pipeline import Engine
    from artifex.models.taehv import TaehvDecoder

    torch.manual_seed(0)
    model = TaehvDecoder(spec.vae.z_dim, spec.vae.spatial_stride // 8)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("taew2_2.pth" if spec.vae.kind == "wan2.2" else "taew2_1.pth")
        torch.save(model.state_dict(), path)
        engine = Engine.from_components(spec, components, OptimizationConfig(
            device=str(device), lora=lora, vae_precision="bf16", decoder="light", light_decoder=str(path)))
    z = latents.to(device)
    engine.decode(z[:, :, :2])  # warm-up
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    frames = engine.decode(z).shape[2]
    _sync(device)
    check = engine.light_decoder.report.get("check") or {}
    out = {"seconds": round(time.perf_counter() - t, 2), "check_s": check.get("seconds"), "frames": frames,
           "peak_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 2) if device.type == "cuda" else None,
           "weights": "random (published widths): time and memory only"}
    engine.placement.release()
    return out


def run(model: str, out_dir: Path, configs: list[str], diffusers: str = "full", steps: int | None = None,
        width: int | None = None, height: int | None = None, frames: int | None = None,
        checkpoint: str | None = None, profile: Path | None = None, device: str | None = None,
        append: bool = False, keep_videos: bool = False, user: bool = False, save_checkpoint: Path | None = None,
        user_runs: UserPathRuns | None = None, in_memory: bool = True) -> dict:
    """``keep_videos``: leave the mp4s (and sidecars) in OUT/pipeline-videos; by default they are written to a
    temporary folder and removed, so OUT holds only the report. ``user``: first the user's path (``user_path``:
    ``artifex generate`` as a process on ``checkpoint``, else on random weights saved to ``save_checkpoint`` or a
    temporary directory; ``user_runs`` says which runs); ``in_memory`` False skips the in-memory runs, and the
    report is then ttv-<gpu>.json (time to video) instead of pipeline-<gpu>.json."""
    import shutil
    import tempfile

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    spec = get_model(model)
    w, h = (width, height) if width else spec.sizes[0]
    frames, steps = frames or spec.frames, steps or spec.steps
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "pipeline-videos" if keep_videos else Path(tempfile.mkdtemp(prefix="artifex-bench-"))
    work.mkdir(exist_ok=True)
    try:
        runs = user_runs or UserPathRuns()
        if diffusers == "off":
            runs = dataclasses.replace(runs, diffusers=False)
        up = user_path(spec, dev, w, h, frames, steps, work, checkpoint, save_checkpoint, runs) if user else None
        return _run(spec, dev, w, h, frames, steps, out_dir, work, configs if in_memory else [],
                    diffusers if in_memory else "off", checkpoint, profile, append, up,
                    "pipeline" if in_memory else "ttv")
    finally:
        if not keep_videos:
            shutil.rmtree(work, ignore_errors=True)


def _run(spec, dev, w, h, frames, steps, out_dir, work, configs, diffusers, checkpoint, profile, append,
         up: dict | None = None, stem: str = "pipeline") -> dict:
    model = spec.name
    if not configs and diffusers == "off":  # the user's path only: no components in this process
        data = report.header(dev)
        data.update(model=model, size=f"{w}x{h}x{frames}", steps=steps, guidance=list(spec.guidance),
                    weights=(up or {}).get("checkpoint"), prompt=PROMPT, runs=[])
        return _finish(data, spec, w, h, frames, steps, out_dir, dev, append, up, stem)
    if checkpoint:
        from artifex.env import read_env
        from artifex.models.loader import load_components, resolve_checkpoint

        components = load_components(spec, resolve_checkpoint(spec, checkpoint, read_env().home), "bf16")
        weights = str(checkpoint)
    else:
        from artifex.models.random_init import random_components

        components = random_components(spec, "bf16", build_device=dev)
        weights = "random (real shapes)"
    vae_fp32 = {k: v.detach().clone() for k, v in components.vae.state_dict().items()}  # runs cast it in place
    data = report.header(dev)
    data.update(model=model, size=f"{w}x{h}x{frames}", steps=steps, guidance=list(spec.guidance), weights=weights,
                prompt=PROMPT, runs=[])
    if diffusers != "off":
        data["diffusers"] = diffusers_run(spec, components, w, h, frames, steps, dev, work, diffusers)
        log.info("diffusers: %s", data["diffusers"])
    latents = None
    for name in configs:
        row = artifex_run(spec, components, PIPELINE_CONFIGS[name], w, h, frames, steps, dev, work, name,
                          profile if name == configs[0] else None)
        if name == "bf16" or latents is None:
            latents = row["latents"]
        if name != "bf16" and "bf16" in configs[:configs.index(name)]:  # the same seed, so the same starting noise
            row["latents_rel_l2_vs_bf16"] = round(((row["latents"] - latents).norm() / latents.norm()).item(), 5)
        row.pop("latents")
        data["runs"].append(row)
        log.info("artifex %s: %s", name, row)
        gc.collect()
    if latents is not None and any(PIPELINE_CONFIGS[n].get("vae_precision") == "bf16" for n in configs):
        data["vae"] = vae_variants(spec, components, vae_fp32, latents, dev)
    return _finish(data, spec, w, h, frames, steps, out_dir, dev, append, up, stem)


def _finish(data, spec, w, h, frames, steps, out_dir, dev, append, up, stem: str = "pipeline") -> dict:
    if up is not None:
        data["user_path"] = up
    if append:
        data = merge_previous(out_dir / f"{stem}-{report.device_slug(dev)}.json", data)
    data["summary"] = summary_of(data, spec, w, h, frames, steps)
    if not data["runs"] and not data.get("diffusers"):  # the user's path alone: no in-memory figures to sum up
        data["summary"] = {}
    if data.get("user_path"):
        data["summary"].update(user_path_summary(data, spec.name, w, h))
    data["files"] = [str(p) for p in write(out_dir, data, dev, stem)]
    return data


def summary_key(model: str, w: int, h: int, frames: int, steps: int) -> str:
    from artifex.bench.dit import shape_key

    return f"{shape_key(model, w, h)}_{frames}f_{steps}steps"


def summary_of(data: dict, spec, w, h, frames, steps) -> dict:
    runs = {r["config"]: r for r in data["runs"]}
    first = runs.get("bf16") or (data["runs"][0] if data["runs"] else None)
    d = data.get("diffusers") or {}
    named = {
        "total_s": first and first["total_s"], "denoise_s": first and first["denoise_s"],
        "vae_s": first and first["vae_s"], "peak_gib": first and first["peak_gib"],
        "diffusers_total_s": d.get("total_s"), "diffusers_denoise_s": d.get("denoise_s") or d.get("denoise_estimate_s"),
        "diffusers_peak_gib": d.get("peak_gib"),
        "config": first and first["config"],
    }
    for name in (n for n in runs if n.startswith("fp8")):
        named[f"{name}_total_s"] = runs[name]["total_s"]
        named[f"{name}_probe_rel_l2"] = [p["rel_l2_vs_bf16"] for p in (runs[name]["fp8"] or {}).get("probe", [])]
        if "latents_rel_l2_vs_bf16" in runs[name]:
            named[f"{name}_latents_rel_l2_vs_bf16"] = runs[name]["latents_rel_l2_vs_bf16"]
    if named["total_s"] and named["diffusers_total_s"]:
        named["speedup"] = round(named["diffusers_total_s"] / named["total_s"], 3)
    vae = data.get("vae") or {}
    named["vae_bf16_psnr_db"] = (vae.get("bf16") or {}).get("psnr_db_vs_fp32") or (
        data.get("vae_bf16_vs_fp32") or {}).get("psnr_db")
    return {summary_key(data["model"], w, h, frames, steps): named}


def merge_previous(path: Path, data: dict) -> dict:
    """``--append``: keep the runs (and diffusers' run) of an earlier file for the same model and settings, this
    run's results replacing those of the same name."""
    import json

    if not path.exists():
        return data
    old = json.loads(path.read_text())
    if (old.get("model"), old.get("size"), old.get("steps")) != (data["model"], data["size"], data["steps"]):
        raise ValueError(f"{path} holds {old.get('model')} {old.get('size')} {old.get('steps')} steps; this run is "
                         f"{data['model']} {data['size']} {data['steps']} steps: nothing to append to")
    mine = {r["config"] for r in data["runs"]}
    data["runs"] = [r for r in old.get("runs", []) if r["config"] not in mine] + data["runs"]
    if "diffusers" not in data and "diffusers" in old:
        data["diffusers"] = dict(old["diffusers"], from_command=old.get("command"), from_date=old.get("date"))
    for key in ("vae", "vae_bf16_vs_fp32", "user_path"):  # the earlier run's, unless this one made its own
        if key not in data and key in old:
            data[key] = old[key]
    if "user_path" in old and data.get("user_path") is not old["user_path"]:
        data["user_path"] = merge_user_path(old["user_path"], data["user_path"])
    earlier = old.get("appended_to") or []  # every earlier call of the series, oldest first
    earlier = [earlier] if isinstance(earlier, dict) else earlier
    data["appended_to"] = [*earlier, {"command": old.get("command"), "date": old.get("date")}]
    return data


def write(out_dir: Path, data: dict, dev: torch.device, stem: str = "pipeline") -> list[Path]:
    slug = f"{stem}-{report.device_slug(dev)}"
    d = data.get("diffusers")
    rows = [["run", "total s", "text s", "denoise s", "decode s", "write s", "peak GiB", "warm-up s", "note"]]
    if d:
        rows.append(["diffusers WanPipeline", str(d.get("total_s")), str(d.get("encode_text_s", "-")),
                     str(d.get("denoise_s", d.get("denoise_estimate_s"))), str(d.get("decode_s", "-")),
                     str(d.get("write_s", "-")), str(d.get("peak_gib")), "-", d.get("note", "as its docs load it")])
    for r in data["runs"]:
        t = r["timings_s"]
        note = f"attention {r['attention']}, tier {r['tier']}"
        if r.get("fp8"):
            note += f", fp8 probe rel L2 {[p['rel_l2_vs_bf16'] for p in r['fp8']['probe']]}"
        if "latents_rel_l2_vs_bf16" in r:
            note += f", final latents rel L2 vs bf16 {r['latents_rel_l2_vs_bf16']}"
        rows.append([f"Artifex {r['config']}", str(r["total_s"]), str(t.get("encode_text")), str(t.get("denoise")),
                     str(t.get("decode")), str(t.get("write")), str(r["peak_gib"]), str(r["warmup_s"]), note])
    md = (f"# Whole generation, diffusers vs Artifex ({data['device'].get('name')})\n\n"
          f"{data['model']} {data['size']}, {data['steps']} steps, CFG {data['guidance']}, weights: "
          f"{data['weights']}\n\n`{data['command']}` ({data['date']})\n\n")
    if len(rows) > 1:
        md += (report.md_table(rows) + f"\nVAE decode of the same latents (seconds, peak GiB, error against fp32): "
               f"{data.get('vae') or data.get('vae_bf16_vs_fp32')}\n")
    if data.get("user_path"):
        md += ("\n## The user's path: `artifex generate` as a process on a checkpoint directory\n\n"
               f"Checkpoint: {data['user_path']['checkpoint']}\n\n" + user_path_table(data["user_path"]))
    files = report.write(out_dir, slug, data, md)
    if len(rows) == 1:  # the user's path alone: its table is the report
        return files
    _chart(rows, out_dir / f"{slug}.png")
    return files + [out_dir / f"{slug}.png"]


def _chart(rows: list[list[str]], path: Path) -> None:
    plt = report.pyplot()
    if plt is None:
        return

    def num(x):
        try:
            return float(x)
        except (TypeError, ValueError):
            return 0.0

    body = rows[1:]
    if not body:
        return
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(body) + 1.5))
    left = [0.0] * len(body)
    for col, label in ((2, "text"), (3, "denoise"), (4, "decode"), (5, "write")):
        vals = [num(r[col]) for r in body]
        ax.barh([r[0] for r in body], vals, left=left, label=label)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlabel("seconds")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the user's path: `artifex generate` as a process, on a checkpoint directory --------------------------------
def save_random_checkpoint(spec, path: Path, build_device) -> Path:
    """Random weights at the real shapes saved with diffusers' ``save_pretrained`` (the layout a user downloads):
    the directory the user-path runs load."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    from artifex.errors import InvalidRequestError
    from artifex.models.random_init import random_components

    if spec.task == "i2v":
        raise InvalidRequestError("model", f"the user-path runs generate from text; {spec.name} needs an image",
                                  "ti2v-5b, t2v-a14b or a tiny t2v/ti2v model")
    c = random_components(spec, "bf16", build_device=build_device)
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=spec.shift)
    pipe = WanPipeline(tokenizer=c.tokenizer, text_encoder=c.text_encoder, vae=c.vae, scheduler=sched,
                       transformer=c.experts[0], transformer_2=c.experts[1] if spec.experts == 2 else None,
                       boundary_ratio=spec.boundary, expand_timesteps=spec.expand_timesteps)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    del pipe, c
    gc.collect()
    return path


def _cli(args: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[float, str, str]:
    """``python -m artifex ARGS`` as a child process (``env``: variables set for it): (its wall seconds, its
    stdout, its stderr); its stderr in an error."""
    import os
    import subprocess
    import sys

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "artifex", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"artifex {' '.join(args[:3])} ... exited {proc.returncode}: {proc.stderr[-2000:]}")
    return wall, proc.stdout, proc.stderr


def _shape_flags(w, h, frames, steps) -> list[str]:
    return ["--size", f"{w}x{h}", "--frames", str(frames), "--steps", str(steps)]


def cli_generate_run(spec, ckpt: Path, w, h, frames, steps, device, work: Path, budget: str | None = None,
                     timeout: float = 3600, flags: tuple[str, ...] = (), name: str | None = None,
                     env: dict[str, str] | None = None) -> dict:
    """``artifex generate`` with no other flags (but ``--vram-budget`` when given, and ``flags``) on ``ckpt``: the
    process's wall from outside, and its sidecar's wall section, stages, prefetch and peak. ``env``: variables set
    for the process."""
    import json

    name = name or budget_run_name(budget)
    out = work / f"{name}.mp4"
    args = ["generate", "--model", spec.name, "--checkpoint", str(ckpt), "--prompt", PROMPT, "--seed", "1",
            "--output", str(out), "--device", str(device), *_shape_flags(w, h, frames, steps), *flags]
    if budget:
        args += ["--vram-budget", budget]
    wall, _, stderr = _cli(args, timeout, env)
    side = json.loads(out.with_suffix(".json").read_text())
    memory = side["memory"] if isinstance(side.get("memory"), dict) else {}
    attention = side.get("attention") or {}
    return {"run": name, "budget": budget, "flags": list(flags), "env": env or {},
            "shape": f"{w}x{h}x{frames}", "steps": steps, "cli_wall_s": round(wall, 2),
            "process_to_mp4_s": side["wall"]["process_s"],
            "after_mp4_s": round(wall - side["wall"]["process_s"], 2),  # the exit (and the spawn before the start)
            "wall": side["wall"], "timings_s": side["timings_s"],
            "load_timings_s": {k[5:]: v for k, v in side["wall"]["stages_s"].items() if k.startswith("load.")},
            "prefetch": side.get("prefetch"),
            "read_ahead": side.get("read_ahead"),  # the weights read to the GPU while the libraries imported
            "tier": memory.get("tier"),
            # the decoder's warm-up beside the denoise: whether it had room, and what it did (seconds, or its error)
            "decode_warm_up_fits": memory.get("decode_warm_up_fits"), "decode_warm_up": side.get("decode_warm_up"),
            "denoise_steps": side.get("denoise_steps"),  # the first steps' first uses against the median step
            "log_warnings": warning_lines(stderr),
            "attention": attention.get("chosen"),
            "attention_source": attention.get("source"),  # "timed" now, or from the "cache"
            "vae_precision": side["plan"]["vae_precision"], "vae_tiling": side["plan"]["vae_tiling"],
            "peak_gib": side["peak_memory"].get("gpu_max_allocated_gib"),
            "host_peak_rss_gib": side["wall"].get("host_peak_rss_gib")}


def warning_lines(stderr: str, keep: int = 20) -> list[str]:
    """The last ``keep`` WARNING lines an ``artifex`` process logged (its log format: ``LEVEL name: message``)."""
    return [line for line in stderr.splitlines() if line.startswith("WARNING ")][-keep:]


def budget_run_name(budget: str | None) -> str:
    """The user path's row name of a plain ``artifex generate`` under ``budget`` (None: the whole GPU)."""
    return f"cli-{budget or 'whole-gpu'}"


def load_rows(spec, ckpt: Path, w, h, device, work: Path) -> dict:
    """Loading alone, one step of 5 frames after it (``artifex generate`` as a process): with the checkpoint in
    the page cache, the libraries' readers with diffusers' shard threads off and on (``HF_ENABLE_PARALLEL_LOADING``)
    and Artifex's own (``fast_read``, the default); with the checkpoint
    dropped from the page cache first (``prefetch.evict``), the prefetch off and on; and diffusers'
    ``from_pretrained`` of the whole pipeline after the same drop (this process: no imports)."""
    from diffusers import AutoencoderKLWan, WanPipeline

    from artifex.models import prefetch

    libraries = {"ARTIFEX_FAST_READ": "off", "ARTIFEX_PREFETCH": "off"}
    cases = (("warm-libraries-serial", False, {**libraries, "HF_ENABLE_PARALLEL_LOADING": "no"}),
             ("warm-libraries-parallel", False, {**libraries, "HF_ENABLE_PARALLEL_LOADING": "yes"}),
             ("warm-fast-read", False, {"ARTIFEX_FAST_READ": "on", "ARTIFEX_PREFETCH": "off"}),
             ("cold-prefetch-off", True, {"ARTIFEX_PREFETCH": "off"}),
             ("cold-prefetch-on", True, {"ARTIFEX_PREFETCH": "on"}))
    rows = []
    for name, cold, env in cases:
        dropped = prefetch.evict(ckpt) if cold else 0
        row = cli_generate_run(spec, ckpt, w, h, 5, 1, device, work, name=name, env=env)
        row["page_cache_dropped_gib"] = round(dropped / GIB, 2)
        rows.append(row)
        log.info("load row %s: wall %s, load %s", name, row["cli_wall_s"], row["timings_s"]["load"])
    prefetch.evict(ckpt)
    t0 = time.perf_counter()
    vae = AutoencoderKLWan.from_pretrained(ckpt, subfolder="vae", torch_dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(ckpt, vae=vae, torch_dtype=torch.bfloat16).to(device)
    _sync(device)
    cold_s = time.perf_counter() - t0
    del pipe, vae
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"runs": rows, "diffusers_cold_load_s": round(cold_s, 2)}


def cli_repeat_prompt_run(spec, ckpt: Path, w, h, frames, device, work: Path, timeout: float = 3600) -> dict:
    """``artifex batch`` of the same prompt twice (2 steps each: the text time does not depend on them): the
    second job's text encoding, which the prompt cache answers."""
    import json

    out_dir = work / "batch"
    args = ["batch", "--model", spec.name, "--checkpoint", str(ckpt), "--prompt", PROMPT, "--prompt", PROMPT,
            "--seed", "1", "--output-dir", str(out_dir), "--device", str(device), *_shape_flags(w, h, frames, 2)]
    wall, stdout, _ = _cli(args, timeout)
    videos = [Path(line) for line in stdout.splitlines() if line.strip().endswith(".mp4")]
    first, second = (json.loads(v.with_suffix(".json").read_text()) for v in videos[:2])
    return {"run": "cli-batch-repeat", "cli_wall_s": round(wall, 2),
            "first_text_s": first["timings_s"]["encode_text"], "repeat_text_s": second["timings_s"]["encode_text"],
            "repeat_hit": second["text_cache"]["hit"]}


def _http(url: str, body: dict | None = None, timeout: float = 10) -> tuple[int, dict]:
    """GET (or POST ``body`` as JSON) on the loopback server: (status, JSON answer)."""
    import json
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def server_run(spec, ckpt: Path, w, h, frames, steps, device, work: Path, timeout: float = 1200) -> dict:
    """``artifex serve`` on ``ckpt`` (loopback, no token) as a child process: the seconds from its start until
    /healthz answers and until /readyz says ready (its load and warm-up), then one job through ``POST /api/jobs``
    from its submission until it succeeded (the server's first request after ready) and its stage timings."""
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    log_path = work / "serve.log"
    cmd = [sys.executable, "-m", "artifex", "serve", "--model", spec.name, "--checkpoint", f"{spec.name}={ckpt}",
           "--port", str(port), "--no-auth", "--data-dir", str(work / "serve-data"), "--device", str(device)]
    t0 = time.perf_counter()
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    out: dict = {"run": "serve", "command": " ".join(cmd[1:])}

    def alive() -> None:
        if proc.poll() is not None:
            raise RuntimeError(f"artifex serve exited {proc.returncode}: {log_path.read_text()[-2000:]}")

    try:
        ready = None
        while time.perf_counter() - t0 < timeout:
            alive()
            try:
                code, body = _http(base + "/readyz", timeout=2)
            except OSError:  # not listening yet
                time.sleep(0.2)
                continue
            out.setdefault("healthz_s", round(time.perf_counter() - t0, 2))
            if code == 200:
                ready = body
                break
            time.sleep(0.2)
        if ready is None:
            raise TimeoutError(f"artifex serve not ready after {timeout} s: {log_path.read_text()[-2000:]}")
        out["ready_s"] = round(time.perf_counter() - t0, 2)
        m = ready["models"][spec.name]
        out |= {"load_s": m["load_s"], "imports_s": m.get("imports_s"), "warmup_s": m["warmup_s"]}
        t1 = time.perf_counter()
        code, job = _http(base + "/api/jobs", {"model": spec.name, "prompt": PROMPT, "seed": 1, "width": w,
                                                "height": h, "frames": frames, "steps": steps})
        if code not in (200, 201):
            raise RuntimeError(f"POST /api/jobs answered {code}: {job}")
        while job["state"] in ("queued", "running") and time.perf_counter() - t1 < timeout:
            alive()
            time.sleep(0.25)
            _, job = _http(f"{base}/api/jobs/{job['id']}")
        if job["state"] != "succeeded":
            raise RuntimeError(f"the server's job ended {job['state']}: {job.get('error')}")
        out |= {"first_request_s": round(time.perf_counter() - t1, 2), "job_timings_s": job["timings"]}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    return out


def diffusers_from_dir(spec, ckpt: Path, w, h, frames, steps, device, work: Path) -> dict:
    """diffusers' WanPipeline as its docs load it from ``ckpt`` (VAE in fp32, the rest bf16, ``.to(device)``), one
    call, frames written: its load and its wall (load to mp4 written; in this process, so without imports)."""
    import numpy as np
    from diffusers import AutoencoderKLWan, WanPipeline

    from artifex.engine.video import write_mp4

    t0 = time.perf_counter()
    vae = AutoencoderKLWan.from_pretrained(ckpt, subfolder="vae", torch_dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(ckpt, vae=vae, torch_dtype=torch.bfloat16).to(device)
    pipe.set_progress_bar_config(disable=True)
    _sync(device)
    load_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    guidance = {"guidance_scale": spec.guidance[0]}
    if spec.experts == 2:
        guidance["guidance_scale_2"] = spec.guidance[1]
    t1 = time.perf_counter()
    with torch.no_grad():
        video = pipe(prompt=PROMPT, height=h, width=w, num_frames=frames, num_inference_steps=steps,
                     generator=torch.Generator("cpu").manual_seed(1), **guidance).frames
    write_mp4((video[0] * 255).round().astype(np.uint8), work / "diffusers-from-dir.mp4", fps=spec.fps)
    generate_s = time.perf_counter() - t1
    peak = round(torch.cuda.max_memory_allocated(device) / GIB, 2) if device.type == "cuda" else None
    del pipe, vae, video
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"run": "diffusers-from-dir", "load_s": round(load_s, 2), "generate_s": round(generate_s, 2),
            "wall_s": round(load_s + generate_s, 2), "peak_gib": peak}


ENV_WORD = re.compile(r"[A-Z][A-Z0-9_]*=")  # a word of a --user-flags run that sets a variable for its process


@dataclass(frozen=True)
class UserPathRuns:
    """Which user-path runs to make. ``budgets``: one ``artifex generate`` per ``--vram-budget`` value (None: no
    flag); ``prime_steps``: first a run of that many steps on a fresh machine's empty caches (the attention
    choice, Triton's kernels), reported as such, so that the runs after it measure what every later run of the
    machine sees (0: none); ``flags``: more runs, each with these flags (a word NAME=value sets that variable for
    the run's process instead); ``loads``: ``load_rows``; ``repeat``: the repeated prompt in ``artifex batch``;
    ``diffusers``: diffusers' from_pretrained + call."""
    budgets: tuple = (None, "24GB")
    prime_steps: int = 0
    flags: tuple[tuple[str, ...], ...] = ()
    loads: bool = False
    repeat: bool = True
    server: bool = False
    diffusers: bool = True


def user_path(spec, dev, w, h, frames, steps, work: Path, checkpoint: str | None = None,
              save_checkpoint: Path | None = None, runs: UserPathRuns = UserPathRuns()) -> dict:
    """The user's path on one checkpoint directory: ``artifex generate`` per budget and a repeated prompt in
    ``artifex batch`` (child processes; this process holds no GPU memory meanwhile), then diffusers'
    ``WanPipeline.from_pretrained`` and one call on the same directory (``runs`` says which)."""
    import shutil

    if checkpoint:
        ckpt, made = Path(checkpoint), False
    else:
        ckpt, made = save_checkpoint or work / "checkpoint", save_checkpoint is None
        t = time.perf_counter()
        save_random_checkpoint(spec, ckpt, dev)
        saved_s = time.perf_counter() - t
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    out: dict = {"checkpoint": str(ckpt) if not made else "random weights (real shapes), save_pretrained to a "
                 "temporary directory", "runs": []}
    if not checkpoint:
        out["save_s"] = round(saved_s, 2)

    def attempt(what: str, make) -> dict | None:
        """One row; a row that fails is recorded under ``errors`` and the others still run (a device call's
        results are not lost to one missing dependency)."""
        try:
            return make()
        except Exception as e:
            log.error("user path %s failed: %s: %s", what, type(e).__name__, e)
            out.setdefault("errors", []).append({"run": what, "error": f"{type(e).__name__}: {e}"[-3000:]})
            return None

    def add(name: str, make) -> None:
        row = attempt(name, make)
        if row is not None:
            out["runs"].append(row)
            log.info("user path %s: %s", name, {k: row[k] for k in ("cli_wall_s", "process_to_mp4_s")})

    try:
        if runs.prime_steps:
            add("cli-first-on-machine", lambda: cli_generate_run(spec, ckpt, w, h, frames, runs.prime_steps, dev,
                                                                  work, name="cli-first-on-machine"))
        for budget in runs.budgets:
            add(budget_run_name(budget),
                lambda b=budget: cli_generate_run(spec, ckpt, w, h, frames, steps, dev, work, b))
        for i, words in enumerate(runs.flags):
            name = "cli" + "".join(f"-{f.lstrip('-')}" for f in words)
            repeat = runs.flags[:i].count(words)  # the same flags again: the second run of a machine's caches
            name = f"{name}-{repeat + 1}" if repeat else name
            env = dict(word.split("=", 1) for word in words if ENV_WORD.match(word))  # NAME=value: the process's
            flags = tuple(word for word in words if not ENV_WORD.match(word))
            add(name, lambda f=flags, e=env, n=name, k=repeat + 1: {
                **cli_generate_run(spec, ckpt, w, h, frames, steps, dev, work, flags=f, name=n, env=e), "repeat": k})
        sections = (("repeat_prompt", runs.repeat, lambda: cli_repeat_prompt_run(spec, ckpt, w, h, frames, dev, work)),
                    ("loads", runs.loads, lambda: load_rows(spec, ckpt, w, h, dev, work)),
                    ("server", runs.server, lambda: server_run(spec, ckpt, w, h, frames, steps, dev, work)),
                    ("diffusers", runs.diffusers,
                     lambda: diffusers_from_dir(spec, ckpt, w, h, frames, steps, dev, work)))
        for key, wanted, make in sections:
            result = attempt(key, make) if wanted else None
            if result is not None:
                out[key] = result
    finally:
        if made:
            shutil.rmtree(ckpt, ignore_errors=True)
    return out


def merge_user_path(old: dict, new: dict) -> dict:
    """``--append`` of user-path runs: the earlier file's runs and sections, this run's replacing those of the
    same name; each earlier section keeps the command and date it came from."""
    mine = {r["run"] for r in new.get("runs", [])}
    merged = dict(new, runs=[r for r in old.get("runs", []) if r["run"] not in mine] + new.get("runs", []))
    for key in ("repeat_prompt", "loads", "server", "diffusers", "save_s"):
        if key not in new and key in old:
            merged[key] = old[key]
    return merged


def user_path_summary(data: dict, model: str, w: int, h: int) -> dict:
    """The issue's keys: ``<shape>`` {cli_wall_s, engine_total_s, load_s, diffusers_wall_s, diffusers_load_s,
    repeat_prompt_text_s} for the run without a budget, ``<shape>_<budget>`` {cli_wall_s, peak_gib} per budget."""
    from artifex.bench.dit import shape_key

    up = data.get("user_path") or {}
    key = shape_key(model, w, h)
    out = {}
    d = up.get("diffusers") or {}
    for r in up.get("runs", []):
        if r["run"] == "cli-first-on-machine" or r.get("flags") or r.get("env"):
            continue
        if r["budget"] is None:
            out[key] = {"cli_wall_s": r["cli_wall_s"], "cli_process_to_mp4_s": r["process_to_mp4_s"],
                        "engine_total_s": r["timings_s"]["total"], "load_s": r["timings_s"]["load"],
                        "diffusers_wall_s": d.get("wall_s"), "diffusers_load_s": d.get("load_s"),
                        "repeat_prompt_text_s": (up.get("repeat_prompt") or {}).get("repeat_text_s")}
        else:
            out[f"{key}_{r['budget'].lower().replace(' ', '')}"] = {"cli_wall_s": r["cli_wall_s"],
                                                                    "peak_gib": r["peak_gib"]}
    srv = up.get("server")
    if srv:
        out[f"{key}_serve"] = {k: srv.get(k) for k in ("ready_s", "load_s", "imports_s", "warmup_s",
                                                        "first_request_s")}
    loads = up.get("loads")
    if loads:
        out[f"{key}_load"] = {r["run"].replace("-", "_") + "_load_s": r["timings_s"]["load"] for r in loads["runs"]}
        out[f"{key}_load"] |= {r["run"].replace("-", "_") + "_wall_s": r["cli_wall_s"] for r in loads["runs"]}
        out[f"{key}_load"]["diffusers_cold_load_s"] = loads["diffusers_cold_load_s"]
    return out


def _run_label(r: dict) -> str:
    if r["run"] == "cli-first-on-machine":
        return f"artifex generate, {r['steps']} steps, the machine's first run (empty caches)"
    words = [*r.get("flags", [])] + (["--vram-budget", r["budget"]] if r["budget"] else [])
    env = [f"{k}={v}" for k, v in r.get("env", {}).items()]
    again = r.get("repeat", 1)
    return " ".join([*env, "artifex generate", *words]) + (f" (run {again})" if again > 1 else "")


def user_path_table(up: dict) -> str:
    rows = [["run", "process wall s", "to mp4 closed s", "imports s", "load s", "text s", "denoise s", "decode s",
             "write s", "other s", "peak GiB", "host peak GiB"]]
    for r in up.get("runs", []):
        s, t = r["wall"]["stages_s"], r["timings_s"]
        rows.append([_run_label(r), str(r["cli_wall_s"]), str(r["process_to_mp4_s"]), str(s.get("process.imports")),
                     str(t.get("load")), str(t.get("encode_text")), str(t.get("denoise")), str(t.get("decode")),
                     str(t.get("write")), str(r["wall"]["other_s"]), str(r["peak_gib"]),
                     str(r["host_peak_rss_gib"])])
    d = up.get("diffusers")
    if d:
        rows.append(["diffusers from_pretrained + call", str(d["wall_s"]), "-", "-", str(d["load_s"]), "-", "-", "-",
                     "-", "-", str(d["peak_gib"]), "-"])
    rp = up.get("repeat_prompt") or {}
    note = (f"\nA repeated prompt (`artifex batch`, second job): text {rp.get('repeat_text_s')} s against "
            f"{rp.get('first_text_s')} s the first time (cache hit: {rp.get('repeat_hit')}).\n") if rp else ""
    srv = up.get("server")
    if srv:
        t = srv["job_timings_s"] or {}
        note += (f"\n`artifex serve`: /healthz after {srv['healthz_s']} s, ready after {srv['ready_s']} s (load "
                 f"{srv['load_s']} s, of which imports {srv.get('imports_s')} s; warm-up {srv['warmup_s']} s); its "
                 f"first job: {srv['first_request_s']} s from "
                 f"the POST to succeeded (stages: {t}).\n")
    for e in up.get("errors", []):
        note += f"\nFailed: {e['run']}: {e['error'][-300:]}\n"
    loads = up.get("loads")
    if loads:
        lrows = [["run (1 step, 5 frames)", "env", "page cache dropped GiB", "process wall s", "imports s",
                  "checkpoint read s", "load s", "prefetch"]]
        for r in loads["runs"]:
            pf = next(iter((r.get("prefetch") or {}).values()), None)
            lrows.append([r["run"], " ".join(f"{k}={v}" for k, v in r["env"].items()),
                          str(r["page_cache_dropped_gib"]), str(r["cli_wall_s"]),
                          str(r["wall"]["stages_s"].get("process.imports")),
                          str(r["load_timings_s"].get("checkpoint_read")), str(r["timings_s"]["load"]),
                          f"{pf.get('read_gib')} GiB in {pf.get('seconds')} s, {pf.get('state')}"
                          if pf and "skipped" not in pf else (pf or {}).get("skipped", "-")])
        note += ("\n### Loading alone\n\n" + report.md_table(lrows) +
                 f"\ndiffusers' `from_pretrained` of the pipeline after the same page-cache drop: "
                 f"{loads['diffusers_cold_load_s']} s.\n")
    return report.md_table(rows) + note
