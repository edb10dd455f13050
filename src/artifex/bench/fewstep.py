"""``artifex bench fewstep``: a distilled few-step generation end to end, diffusers against Artifex, in one run.

Cases (the ``summary`` keys):

- ``ti2v5b_720p_3step``: ``ti2v-5b-fastwan``, 1280x704x121, the DMD sampler at 1000, 757, 522, no CFG;
- ``i2v_a14b_720p_4step``: ``i2v-a14b-lightning``, 1280x720x81 from an image, Euler at 1000, 937.5, 833.3, 625,
  no CFG, the low-noise expert from step 2.

Each case, on random weights at the real shapes with a random rank-64 LoRA in the original-Wan (LightX2V) format
on every linear of every block (one file per expert), written to disk first:

1. diffusers' pipeline (``WanPipeline`` / ``WanImageToVideoPipeline``) as its docs load it (everything on the
   GPU, VAE in fp32), the LoRA loaded and fused (``load_lora_weights`` + ``fuse_lora``), the same steps, guidance
   1 (one pass per step); its sampler is UniPC (diffusers has no DMD sampler; a step costs the same);
2. Artifex, the profile's own request (text, steps, decode, mp4 written), for each config: the LoRA fused at load
   in the first (its time per expert is reported), carried by the weights in the next; a one-step warm-up
   generation of the same shape first;
3. TI2V only: Artifex bf16 on fresh weights without a LoRA, so that the LoRA's per-step cost shows (fused, it
   should have none);
4. TI2V only: the bf16 VAE's decode error against fp32 on Artifex's final latents.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from artifex.bench import FEWSTEP_CASES, FEWSTEP_CONFIGS, report
from artifex.bench.pipeline import PROMPT, _sync, components_to_cpu, diffusers_pipeline, timed_call, vae_variants
from artifex.models.registry import get_model

log = logging.getLogger("artifex")

RANK = 64
CASES = {  # FEWSTEP_CASES, with their models and shapes
    "ti2v5b_720p_3step": {"model": "ti2v-5b-fastwan", "size": (1280, 704), "frames": 121},
    "i2v_a14b_720p_4step": {"model": "i2v-a14b-lightning", "size": (1280, 720), "frames": 81},
    # the same code path on the tiny twins, for a CPU check of the benchmark itself
    "tiny_ti2v_3step": {"model": "tiny-ti2v-fastwan", "size": (256, 160), "frames": 9},
    "tiny_i2v_4step": {"model": "tiny-i2v-moe-lightning", "size": (160, 96), "frames": 5},
}
CONFIGS = FEWSTEP_CONFIGS  # Artifex's configs: bf16 decode in both (its error against fp32 is measured here)


@torch.no_grad()
def write_random_lora(expert: torch.nn.Module, path: Path, seed: int, device: torch.device) -> dict:
    """A rank-``RANK`` LoRA on every linear of ``expert``'s blocks, in the original-Wan key format LightX2V ships
    (``diffusion_model.blocks.N.self_attn.q.lora_down.weight`` / ``lora_up`` / ``alpha``), bf16, to ``path``.
    The update is small against the weights (down ~ N(0, 1/in), up ~ N(0, 1e-4)), as a trained LoRA's is."""
    from safetensors.torch import save_file

    from artifex.models.lora import original_name

    g = torch.Generator(device).manual_seed(seed)
    sd, layers = {}, 0
    for name, m in expert.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("blocks."):
            key = f"diffusion_model.{original_name(name)}"
            down = torch.randn(RANK, m.in_features, generator=g, device=device) / m.in_features**0.5
            up = torch.randn(m.out_features, RANK, generator=g, device=device) * 1e-2
            sd[f"{key}.lora_down.weight"] = down.to(torch.bfloat16).cpu()
            sd[f"{key}.lora_up.weight"] = up.to(torch.bfloat16).cpu()
            sd[f"{key}.alpha"] = torch.tensor(float(RANK))
            layers += 1
    save_file(sd, str(path))
    return {"file": path.name, "layers": layers, "rank": RANK, "bytes": path.stat().st_size}


def synthetic_image(path: Path, width: int, height: int) -> Path:
    """A structured picture (gradients and a checkerboard) for the image-conditioned case."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // width, y * 255 // height, ((x // 32 + y // 32) % 2) * 200], -1).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path


def diffusers_run(spec, components, loras: list[Path], width, height, frames, image, device, out: Path) -> dict:
    """diffusers' pipeline on ``components`` with ``loras`` fused, ``spec``'s steps, guidance 1; per-stage times.
    The LoRA is unfused and unloaded afterwards, so the components go on to Artifex as they were."""
    pipe, _ = diffusers_pipeline(spec, components, device)  # guidance 1 below, whatever the spec's default
    t = time.perf_counter()
    names = ["transformer", "transformer_2"][: len(loras)]
    row: dict = {"sampler": "unipc (no DMD in diffusers)"}
    try:
        for name, path in zip(names, loras):
            pipe.load_lora_weights(str(path), adapter_name=f"lora_{name}",
                                   load_into_transformer_2=name != "transformer")
        pipe.fuse_lora(components=names)
        _sync(device)
        row["lora_fuse_s"] = round(time.perf_counter() - t, 2)
    except Exception as e:  # peft missing on the machine, a format diffusers cannot read: say so, time without
        log.warning("diffusers could not load the LoRA (%s: %s); its run is without one", type(e).__name__, e)
        row["lora_fuse_s"], row["lora_error"], names = None, f"{type(e).__name__}: {e}"[:300], []
    call = dict(prompt=PROMPT, height=height, width=width, num_frames=frames, guidance_scale=1.0)
    if spec.experts == 2:
        call["guidance_scale_2"] = 1.0
    if image is not None:
        call["image"] = image
    row.update(timed_call(pipe, call, spec.steps, device, out / "diffusers.mp4", spec.fps))
    if names:
        pipe.unfuse_lora(components=names)
        pipe.unload_lora_weights()
    del pipe
    components_to_cpu(components, device)
    return row


def lora_text(loras: list[Path]) -> str:
    """The ``lora`` config field for one file per expert (high=, low= for two experts)."""
    if len(loras) == 2:
        return f"high={loras[0]},low={loras[1]}"
    return ",".join(str(p) for p in loras)


def artifex_run(spec, components, config: dict, loras: list[Path], width, height, frames, image, device, out: Path,
                name: str) -> dict:
    """The profile's request through Artifex (warm-up of one step, then the timed generation); the LoRA specs are
    fused at load when the components carry none yet."""
    from artifex.config import OptimizationConfig
    from artifex.engine.pipeline import Engine
    from artifex.engine.request import GenerationRequest

    engine = Engine.from_components(spec, components, OptimizationConfig(device=str(device), lora=lora_text(loras),
                                                                         **config))

    def request(path: Path, steps: int | None = None):
        return GenerationRequest(model=spec.name, prompt=PROMPT, seed=1, width=width, height=height, frames=frames,
                                 steps=steps, image=str(image) if image else None, output=str(path))

    t = time.perf_counter()
    engine.generate(request(out / f"warmup-{name}.mp4", steps=1))
    warm = time.perf_counter() - t
    r = engine.generate(request(out / f"artifex-{name}.mp4"))
    t = r.timings
    row = {"config": name, "fields": config, "loras": engine.loras, "warmup_s": round(warm, 2), "timings_s": t,
           "total_s": t["total"], "encode_text_s": t.get("encode_text"), "denoise_s": t["denoise"],
           "decode_s": t["decode"], "write_s": t["write"], "peak_gib": r.peak_memory.get("gpu_max_allocated_gib"),
           "steps": r.settings.steps, "sampler": r.settings.sampler, "timesteps": r.settings.timesteps,
           "experts_per_step": r.experts_per_step, "attention": r.attention.chosen, "tier": r.memory["tier"],
           "fp8": engine.fp8_report, "latents": r.latents}
    engine.placement.release()
    return row


def run_case(key: str, work: Path, configs: list[str], diffusers: bool, device,
             save=lambda case: None) -> dict:
    """One case; ``save(result)`` after each run, so that a call cut short by its time limit keeps what ran."""
    from artifex.models.random_init import random_components

    case = CASES[key]
    spec = get_model(case["model"])
    (w, h), frames = case["size"], case["frames"]
    components = random_components(spec, "bf16", build_device=device)
    vae_fp32 = {k: v.detach().clone() for k, v in components.vae.state_dict().items()}
    t = time.perf_counter()
    loras = [work / f"{key}-lora-{i}.safetensors" for i in range(spec.experts)]
    lora_info = [write_random_lora(e, p, seed=100 + i, device=device)
                 for i, (e, p) in enumerate(zip(components.experts, loras))]
    log.info("%s: LoRA files written in %.1fs: %s", key, time.perf_counter() - t, lora_info)
    image = synthetic_image(work / f"{key}.png", w, h) if spec.image == "required" else None
    result: dict = {"model": spec.name, "base": spec.base, "size": f"{w}x{h}x{frames}", "steps": spec.steps,
                    "sampler": spec.sampler, "timesteps": list(spec.timesteps or ()), "guidance": list(spec.guidance),
                    "switch_step": spec.switch_step, "lora": lora_info, "runs": []}
    if diffusers:
        from PIL import Image

        result["diffusers"] = diffusers_run(spec, components, loras, w, h, frames,
                                            Image.open(image).convert("RGB") if image else None, device, work)
        log.info("%s diffusers: %s", key, result["diffusers"])
        save(result)
    latents = None
    for i, name in enumerate(configs):
        row = artifex_run(spec, components, CONFIGS[name], loras, w, h, frames, image, device, work, name)
        row["lora_fused_here"] = i == 0
        lat = row.pop("latents")
        latents = lat if latents is None else latents
        if i:
            row["latents_rel_l2_vs_first"] = round(((lat - latents).norm() / latents.norm()).item(), 5)
        result["runs"].append(row)
        log.info("%s artifex %s: %s", key, name, {k: v for k, v in row.items() if k != "fp8"})
        save(result)
        gc.collect()
    if spec.experts == 1 and latents is not None:
        result["vae"] = vae_variants(spec, components, vae_fp32, latents, device, lora=lora_text(loras))
    del components
    gc.collect()
    if spec.experts == 1 and "bf16" in configs:  # the LoRA's per-step cost: the same run on weights without one
        fresh = random_components(spec, "bf16", build_device=device)
        row = artifex_run(spec, fresh, CONFIGS["bf16"], [], w, h, frames, image, device, work, "bf16")
        row.pop("latents")
        row["config"] = "bf16_no_lora"
        result["runs"].append(row)
        del fresh
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def summary_of(key: str, case: dict) -> dict:
    runs = {r["config"]: r for r in case["runs"]}
    best = min((r for r in case["runs"] if r["config"] != "bf16_no_lora"), key=lambda r: r["total_s"])
    d = case.get("diffusers") or {}
    out = {k: best[k] for k in ("total_s", "denoise_s", "decode_s", "write_s", "peak_gib")}
    out.update(config=best["config"], encode_text_s=best["encode_text_s"], diffusers_total_s=d.get("total_s"),
               diffusers_denoise_s=d.get("denoise_s"),
               lora_fuse_s_per_expert=[r["fuse_s"] for r in runs[case["runs"][0]["config"]]["loras"]],
               diffusers_lora_fuse_s=d.get("lora_fuse_s"))
    for name, r in runs.items():
        out[f"{name}_total_s"] = r["total_s"]
        out[f"{name}_denoise_s"] = r["denoise_s"]
    if out["diffusers_total_s"]:
        out["speedup"] = round(out["diffusers_total_s"] / out["total_s"], 2)
    if "bf16" in runs and "bf16_no_lora" in runs:
        out["lora_denoise_delta_s"] = round(runs["bf16"]["denoise_s"] - runs["bf16_no_lora"]["denoise_s"], 3)
    vae = (case.get("vae") or {}).get("bf16") or {}
    out["vae_bf16_psnr_db_vs_fp32"] = vae.get("psnr_db_vs_fp32")
    return out


def run(cases: list[str], out_dir: Path, configs: list[str], diffusers: bool = True,
        device: str | None = None) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="artifex-fewstep-"))
    data = report.header(dev)
    data["cases"] = {}
    path = out_dir / f"fewstep-{report.device_slug(dev)}.json"
    # cases run in separate calls (each fits one device call) land in one file
    old = json.loads(path.read_text()) if path.exists() else {}
    earlier = {k: dict(v, from_command=v.get("from_command", old.get("command")),
                       from_date=v.get("from_date", old.get("date")))
               for k, v in old.get("cases", {}).items() if k not in cases}

    def save(key: str, case: dict | None = None, partial: bool = True) -> None:
        if case is not None:
            data["cases"][key] = dict(case, partial=True) if partial else case
        data["cases"] = {**earlier, **{k: v for k, v in data["cases"].items() if k not in earlier}}
        data["summary"] = {k: summary_of(k, c) for k, c in data["cases"].items() if c.get("runs")}
        data["files"] = [str(p) for p in write(out_dir, data, dev)]

    try:
        for key in cases:
            save(key, run_case(key, work, configs, diffusers, dev, save=lambda c, k=key: save(k, c)),
                 partial=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return data


def write(out_dir: Path, data: dict, dev) -> list[Path]:
    lines = [f"# Few-step generation end to end, diffusers vs Artifex ({data['device'].get('name')})", "",
             f"`{data['command']}` ({data['date']})", ""]
    for key, case in data["cases"].items():
        lines += [f"## {key}: {case['model']} {case['size']}, {case['steps']} steps ({case['sampler']} at "
                  f"{case['timesteps']}), guidance {case['guidance']}, switch step {case['switch_step']}", "",
                  f"Random weights at real shapes; a random rank-{RANK} LoRA per expert fused: {case['lora']}"
                  + (f" (from `{case['from_command']}`, {case['from_date']})" if "from_command" in case else ""), ""]
        rows = [["run", "total s", "text s", "denoise s", "decode s", "write s", "peak GiB", "note"]]
        d = case.get("diffusers")
        if d:
            lora = d.get("lora_error") and f"LoRA not loaded: {d['lora_error']}" or f"LoRA fuse {d['lora_fuse_s']} s"
            rows.append(["diffusers WanPipeline", str(d["total_s"]), str(d["encode_text_s"]), str(d["denoise_s"]),
                         str(d["decode_s"]), str(d["write_s"]), str(d["peak_gib"]),
                         f"{d['sampler']}; {lora}; VAE fp32"])
        for r in case["runs"]:
            note = f"attention {r['attention']}, tier {r['tier']}, experts {r['experts_per_step']}"
            if r.get("loras"):
                note += f"; LoRA fuse s per expert {[x['fuse_s'] for x in r['loras']]}"
            if "latents_rel_l2_vs_first" in r:
                note += f"; latents rel L2 vs first config {r['latents_rel_l2_vs_first']}"
            rows.append([f"Artifex {r['config']}", str(r["total_s"]), str(r["encode_text_s"]), str(r["denoise_s"]),
                         str(r["decode_s"]), str(r["write_s"]), str(r["peak_gib"]), note])
        lines += [report.md_table(rows), ""]
        if case.get("vae"):
            lines += [f"VAE decode of the same latents: {case['vae']}", ""]
    lines += ["## Summary", "", "```json", json.dumps(data["summary"], indent=2), "```", ""]
    stem = f"fewstep-{report.device_slug(dev)}"
    return report.write(out_dir, stem, data, "\n".join(lines))


assert set(CASES) == set(FEWSTEP_CASES), "artifex.bench.FEWSTEP_CASES lists the cases the CLI offers"
