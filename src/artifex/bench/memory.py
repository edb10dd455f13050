"""Measured activation memory of each stage at real shapes, to calibrate and check the memory planner.

Random weights at the real widths; the DiT with 2 blocks (activations do not grow with depth: blocks run one
after another), the real VAEs decoding full-size videos, the umt5-xxl encoder on 2 x 512 tokens. Each figure is
the peak allocated during the stage minus what was allocated before it (weights and inputs).
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path

import torch

from artifex.bench import report
from artifex.engine import memory
from artifex.models.registry import get_model

log = logging.getLogger("artifex")
GIB = 2**30


def _peak(fn, device) -> tuple[float, float]:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    t = time.perf_counter()
    with torch.no_grad():
        fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / GIB, time.perf_counter() - t


def dit_activation(model: str, width: int, height: int, frames: int, device, path: str = "diffusers") -> dict:
    """Peak memory of the DiT's denoise over one CFG step (two forwards, the conditional and unconditional text
    contexts), 2 blocks at the real width. ``path``: "diffusers" (diffusers' forward, all on the device),
    "artifex" (the engine's forward, eager as by default, with its attention runtime and text K/V caches) or
    "artifex_block_offload" (the same under diffusers' block-level group offload with a stream, as the
    block_offload tier runs it: the blocks' weights come and go, so they are in the measured figure)."""
    from diffusers import WanTransformer3DModel

    from artifex.attention import AttentionRuntime
    from artifex.attention.processor import install
    from artifex.engine.dit import accelerate_model, share_first_block
    from artifex.engine.placement import group_offload
    from artifex.models.loader import cast_keeping_fp32

    spec = get_model(model)
    cfg = dict(spec.transformer.diffusers_config(), num_layers=2)
    with torch.device(device):
        m = cast_keeping_fp32(WanTransformer3DModel(**cfg), torch.bfloat16).eval()
    z, t, h, w = spec.latent_shape(width, height, frames)
    x = torch.randn(1, spec.transformer.in_channels, t, h, w, device=device, dtype=torch.bfloat16)
    texts = [torch.randn(1, spec.text_len, cfg["text_dim"], device=device, dtype=torch.bfloat16) for _ in range(2)]
    step = torch.tensor([500.0], device=device)
    tokens = spec.tokens(width, height, frames)
    streamed = 0
    if path != "diffusers":
        runtime = AttentionRuntime()
        runtime.prepare((1, tokens, spec.transformer.heads, spec.transformer.head_dim), torch.bfloat16, device)
        install([m], runtime)
        accelerate_model(m)
    if path == "artifex_block_offload":  # the planner's count of the expert weights on the device in this tier
        streamed = memory.streamed_bytes(memory.weights_of(torch.nn.Module(), torch.nn.Module(), [m]),
                                         "block_offload")
        group_offload(m.to("cpu"), "block_offload", torch.device(device))

    def cfg_step():  # as the engine runs CFG in two passes
        with share_first_block(m):
            for text in texts:
                m(hidden_states=x, timestep=step, encoder_hidden_states=text, return_dict=False)

    cfg_step()  # the first forward builds caches (RoPE tables, the offload's prefetch order)
    gib, secs = _peak(cfg_step, device)
    act = memory.activations(spec, width, height, frames, 1, False,
                             "diffusers" if path == "diffusers" else "artifex")["denoise"]
    predicted = (act + streamed) / GIB
    return {"stage": "denoise", "model": model, "path": path, "size": f"{width}x{height}x{frames}", "tokens": tokens,
            "measured_gib": round(gib, 3), "predicted_gib": round(predicted, 3),
            "bytes_per_token": round((gib * GIB - streamed) / tokens)}


def vae_decode(model: str, width: int, height: int, frames: int, tiled: bool, device,
               precision: str = "fp32") -> dict:
    """The engine's decode (``engine.vae.decode_any``: streamed frame by frame, or diffusers' tiled decode in one
    piece) with each chunk turned into uint8 frames on the GPU and copied out, as ``Engine.decode_to_mp4`` does."""
    from diffusers import AutoencoderKLWan

    from artifex.engine.vae import decode_any
    from artifex.engine.video import to_uint8_frames
    from artifex.models.configs import vae_kwargs

    spec = get_model(model)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with torch.device(device):
        vae = AutoencoderKLWan(**vae_kwargs(spec)).to(dtype).eval()
    if tiled:
        vae.enable_tiling()
    _, t, h, w = spec.latent_shape(width, height, frames)
    z = torch.randn(1, spec.vae.z_dim, t, h, w, device=device, dtype=dtype)

    def run():
        for chunk in decode_any(vae, z):
            to_uint8_frames(chunk)

    gib, secs = _peak(run, device)
    predicted = memory.activations(spec, width, height, frames, 1, tiled, vae_precision=precision)["decode"] / GIB
    return {"stage": "decode", "model": model, "vae": spec.vae.kind, "size": f"{width}x{height}x{frames}",
            "tiled": tiled, "precision": precision, "measured_gib": round(gib, 3), "predicted_gib": round(predicted, 3),
            "seconds": round(secs, 2), "bytes_per_pixel": round(gib * GIB / (width * height))}


def text_encoder(device) -> dict:
    from transformers import UMT5EncoderModel

    from artifex.models.configs import text_encoder_config

    with torch.device(device):
        enc = UMT5EncoderModel(text_encoder_config(get_model("t2v-a14b"))).to(torch.bfloat16).eval()
    ids = torch.randint(0, 32000, (2, 512), device=device)
    mask = torch.ones_like(ids)
    gib, _ = _peak(lambda: enc(ids, mask), device)
    return {"stage": "encode_text", "model": "umt5-xxl", "measured_gib": round(gib, 3),
            "predicted_gib": round(memory.TEXT_ACTIVATION_BYTES / GIB, 3)}


STAGES = ("denoise", "encode_text", "decode")


def calibrate(out_dir=None, stages: tuple[str, ...] = STAGES) -> dict:
    """Each stage's activation memory at real shapes (``stages``: a subset of ``STAGES``; a subset is written
    as memory-stages-<stages>-<gpu>.json beside the full calibration)."""
    device = torch.device("cuda")
    runs = {"denoise": [partial(dit_activation, model, w, h, f, path=path)
                        for model, w, h, f in (("ti2v-5b", 1280, 704, 121), ("t2v-a14b", 832, 480, 81),
                                               ("t2v-a14b", 1280, 720, 81))
                        for path in ("diffusers", "artifex", "artifex_block_offload")],
            "encode_text": [text_encoder],
            "decode": [partial(vae_decode, model, w, h, f, tiled, precision=precision)
                       for model, w, h, f in (("ti2v-5b", 1280, 704, 121), ("t2v-a14b", 1280, 720, 81),
                                              ("t2v-a14b", 832, 480, 81))
                       for tiled in (False, True) for precision in ("fp32", "bf16")]}
    rows = []
    for run in (r for stage in stages for r in runs[stage]):
        rows.append(run(device=device))
        log.info("%s", rows[-1])
        torch.cuda.empty_cache()
    data = report.header(device, prog="python -m artifex.bench.memory")
    errs = [abs(r["predicted_gib"] - r["measured_gib"]) / r["measured_gib"] for r in rows if r["measured_gib"] > 0.05]
    data.update(summary={"stage_max_rel_error": round(max(errs), 3)}, stages=rows)
    if out_dir is not None:
        md = report.md_table([["stage", "model", "path", "size", "tiled", "precision", "measured GiB",
                               "predicted GiB", "bytes per pixel"]] + [
            [r["stage"], r["model"], r.get("path", "-"), r.get("size", "-"), str(r.get("tiled", "-")),
             r.get("precision", "bf16"), str(r["measured_gib"]), str(r["predicted_gib"]),
             str(r.get("bytes_per_pixel", "-"))] for r in rows])
        part = "" if set(stages) == set(STAGES) else "-".join(stages) + "-"
        report.write(out_dir, f"memory-stages-{part}{report.device_slug(device)}", data,
                     f"# Stage activation memory ({data['device']['name']})\n\n`{data['command']}`\n\n" + md)
    return data


def diffusers_default_peak(spec, components, width: int, height: int, frames: int, steps: int, device) -> dict:
    """diffusers' WanPipeline as its docs load it (bf16 DiT and UMT5 with fp32-kept modules, fp32 VAE), on the
    same random components, everything on the GPU: its peak allocated memory. Peak memory does not depend on the
    step count, so a few steps suffice."""
    from artifex.bench.pipeline import components_to_cpu, diffusers_pipeline

    pipe, guidance = diffusers_pipeline(spec, components, device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    with torch.no_grad():
        pipe(prompt="a red kite over a golden beach at sunset", height=height, width=width, num_frames=frames,
             num_inference_steps=steps, output_type="np", **guidance)
    secs = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(device) / GIB
    del pipe
    components_to_cpu(components, device)
    return {"peak_gib": round(peak, 3), "steps": steps, "seconds": round(secs, 2)}


def generation_runs(model: str, budgets: list[str | None], steps: int | None = None, width: int | None = None,
                    height: int | None = None, frames: int | None = None, out_dir=None,
                    diffusers_steps: int = 0) -> dict:
    """Whole generations with random weights at real shapes, one per budget (None = the whole GPU): tier the
    planner picked, its predicted peak, the measured peak, time per stage."""
    import gc

    from artifex.config import OptimizationConfig
    from artifex.engine.pipeline import Engine
    from artifex.engine.request import GenerationRequest
    from artifex.models.random_init import random_components

    device = torch.device("cuda", torch.cuda.current_device())
    spec = get_model(model)
    components = random_components(spec, "bf16", build_device=device)
    data = report.header(device, prog="python -m artifex.bench.memory")
    if diffusers_steps:  # first, on the untouched components (our runs turn VAE tiling on for small budgets)
        w, h = (width, height) if width else spec.sizes[0]
        data["diffusers_default"] = diffusers_default_peak(spec, components, w, h, frames or spec.frames,
                                                           diffusers_steps, device)
    runs = []
    for budget in budgets:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()
        engine = Engine.from_components(spec, components, OptimizationConfig(vram_budget=budget))
        req = GenerationRequest(model=model, prompt="a red kite over a golden beach at sunset", seed=1, steps=steps,
                                width=width, height=height, frames=frames,
                                output=str(Path(out_dir or "/tmp") / f"mem-{budget}.mp4"))
        r = engine.generate(req)
        measured = r.peak_memory["gpu_max_allocated_gib"]
        predicted = r.memory["predicted_peak_gib"]
        runs.append({"budget": budget, "tier": r.memory["tier"], "vae_tiling": r.plan.vae_tiling,
                     "step_downs": r.memory["step_downs"], "predicted_peak_gib": predicted,
                     "failed_attempt_peak_gib": r.memory.get("failed_attempt_peak_gib"),
                     "measured_peak_gib": measured, "measured_reserved_gib": r.peak_memory["gpu_max_reserved_gib"],
                     "host_max_rss_gib": r.peak_memory["cpu_process_max_rss_gib"],  # of the process so far
                     "planner_rel_error": round(abs(predicted - measured) / measured, 3),
                     "predicted_stages_gib": r.memory.get("predicted_stages_gib"),
                     "measured_stages_gib": r.memory.get("measured_stages_gib"),
                     "timings_s": r.timings, "steps": r.settings.steps,
                     "size": f"{r.settings.width}x{r.settings.height}x{r.settings.frames}"})
        log.info("%s", runs[-1])
        engine.placement.release()
        del engine, r
        gc.collect()
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    data.update(model=model, runs=runs, summary={
        "planner_max_rel_error": max(x["planner_rel_error"] for x in runs),
        **{f"{model}_{x['size']}_{x['budget'] or 'unconstrained'}": {"peak_gib": x["measured_peak_gib"],
                                                          "time_s": x["timings_s"]["total"], "tier": x["tier"]}
           for x in runs}})
    if out_dir is not None:
        def stages(x):  # predicted / measured GiB per stage
            pred, meas = x["predicted_stages_gib"] or {}, x["measured_stages_gib"] or {}
            return ", ".join(f"{k} {pred.get(k)}/{meas.get(k)}" for k in ("encode_text", "denoise", "decode"))

        md = report.md_table([["budget", "tier", "VAE tiled", "predicted GiB", "measured GiB",
                               "stages predicted/measured GiB", "total s", "denoise s", "decode s"]] + [
            [str(x["budget"] or "whole GPU"), x["tier"], str(x["vae_tiling"]), str(x["predicted_peak_gib"]),
             str(x["measured_peak_gib"]), stages(x), str(x["timings_s"]["total"]), str(x["timings_s"]["denoise"]),
             str(x["timings_s"]["decode"])] for x in runs])
        size = runs[0]["size"].rsplit("x", 1)[0]
        report.write(out_dir, f"memory-{model}-{size}-{report.device_slug(device)}", data,
                     f"# Whole generations under memory budgets ({data['device']['name']})\n\n"
                     f"`{data['command']}`\n\n{md}")
        combine(Path(out_dir), report.device_slug(device))  # memory-<gpu>.json over every run file of this GPU
    return data


# The summary keys: (model, WxH, budget) of each run they name.
_KEYS = {"ti2v5b_720p_24gb": ("ti2v-5b", "1280x704", "24GB"), "a14b_720p_24gb": ("t2v-a14b", "1280x720", "24GB"),
         "a14b_480p_16gb": ("t2v-a14b", "832x480", "16GB")}


def combine(out_dir: Path, slug: str) -> dict:
    """memory-<slug>.json from the per-model run files of that GPU (``report.device_slug``) in ``out_dir``: the
    named runs, the unconstrained TI2V time, diffusers' default peak, the planner's largest error over every run."""
    import json

    files = sorted(out_dir.glob(f"memory-*-*x*-{slug}.json"))
    parts = [json.loads(f.read_text()) for f in files]
    runs = [dict(r, model=p["model"]) for p in parts for r in p["runs"]]
    summary: dict = {}
    for key, (model, size, budget) in _KEYS.items():
        hit = next((r for r in runs if r["model"] == model and r["size"].startswith(size) and r["budget"] == budget),
                   None)
        summary[key] = ({"peak_gib": hit["measured_peak_gib"], "time_s": hit["timings_s"]["total"],
                         "tier": hit["tier"], "steps": hit["steps"]} if hit else None)
    free = next((r for r in runs if r["model"] == "ti2v-5b" and r["budget"] is None), None)
    summary["ti2v5b_720p_unconstrained_time_s"] = free["timings_s"]["total"] if free else None
    dd = next((p["diffusers_default"] for p in parts if p["model"] == "ti2v-5b" and "diffusers_default" in p), None)
    summary["diffusers_default_peak_gib"] = dd["peak_gib"] if dd else None
    summary["planner_max_rel_error"] = max((r["planner_rel_error"] for r in runs), default=None)
    base = parts[0] if parts else {}
    data = {k: base.get(k) for k in ("device", "date", "versions")}
    data.update(command=f"python -m artifex.bench.memory OUT --combine {slug}", sources=[f.name for f in files],
                summary=summary, runs=runs, diffusers_default=dd)
    rows = [["model", "size", "budget", "tier", "steps", "predicted GiB", "measured GiB", "total s"]] + [
        [r["model"], r["size"], str(r["budget"] or "whole GPU"), r["tier"], str(r["steps"]),
         str(r["predicted_peak_gib"]), str(r["measured_peak_gib"]), str(r["timings_s"]["total"])] for r in runs]
    md = (f"# Memory tiers ({(data.get('device') or {}).get('name')})\n\n" + report.md_table(rows) +
          "\ndiffusers' default WanPipeline peak (TI2V-5B, same random weights): "
          f"{summary['diffusers_default_peak_gib']} GiB; planner's largest error: {summary['planner_max_rel_error']}\n")
    report.write(out_dir, f"memory-{slug}", data, md)
    _chart(runs, out_dir / f"memory-{slug}.png")
    return data


def _chart(runs: list[dict], path: Path) -> None:
    plt = report.pyplot()
    if plt is None:
        return
    labels = [f"{r['model']}\n{r['size'].rsplit('x', 1)[0]}\n{r['budget'] or 'whole GPU'}" for r in runs]
    fig, ax = plt.subplots(figsize=(8, 4))
    x = range(len(runs))
    ax.bar([i - 0.2 for i in x], [r["predicted_peak_gib"] for r in runs], 0.4, label="planner")
    ax.bar([i + 0.2 for i in x], [r["measured_peak_gib"] for r in runs], 0.4, label="measured")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("peak GiB (allocated)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    import argparse
    import json
    from pathlib import Path

    ap = argparse.ArgumentParser(description="stage calibration, or whole generations under budgets")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--runs", help="MODEL:BUDGET,BUDGET (budget 'none' = whole GPU), e.g. ti2v-5b:none,24GB")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--frames", type=int)
    ap.add_argument("--size", help="WxH")
    ap.add_argument("--diffusers-steps", type=int, default=0, help="also measure diffusers' default peak")
    ap.add_argument("--stages", default=",".join(STAGES), help="stage calibration: which stages (comma-separated)")
    ap.add_argument("--combine", metavar="GPU", help="merge OUT/memory-<model>-<size>-GPU.json files (GPU: h100, "
                    "h200, ...) into memory-GPU.json; no GPU needed")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.combine:
        result = combine(args.out_dir, args.combine)
    elif args.runs:
        model, budgets = args.runs.split(":")
        w, h = (int(x) for x in args.size.split("x")) if args.size else (None, None)
        result = generation_runs(model, [None if b == "none" else b for b in budgets.split(",")], args.steps,
                                 w, h, args.frames, out_dir=args.out_dir, diffusers_steps=args.diffusers_steps)
    else:
        result = calibrate(args.out_dir, tuple(args.stages.split(",")))
    print(json.dumps(result["summary"], indent=1))
