"""``artifex bench s2v``: S2V-14B at a real shape with random weights: DiT forwards and one clip end to end.

``forward`` (one DiT forward of a later clip: [20 noisy latent frames | reference | FramePack motion], 63,360
tokens at 1024x704; the same model and the same rotated inputs for every row, in this order):

- ``reference``: DiffSynth-Studio's ``WanS2VModel`` (the independent port the tests compare against) holding
  the same weights (the bf16 ones shared, the fp32-kept ones as bf16 copies: it runs all-bf16), its attention
  FA3 where ``fa3-fwd`` is installed (aliased to the module name it looks for), else SDPA;
- ``plain``: ``WanS2VTransformer3DModel``'s own forward with diffusers' ``WanAttnProcessor`` (SDPA);
- ``artifex_bf16``: Artifex's forward (``engine.dit_s2v``: ``engine.dit``'s blocks), attention ``auto``,
  blocks compiled;
- ``artifex_fp8``: the same with fp8 GEMMs (the blocks' linears) and fa3-fp8 attention.

Each row: median seconds per forward, TFLOP/s, share of the sustained bf16 matmul rate measured in the same run,
peak memory, relative L2 against ``plain``. FLOPs: DESIGN.md's count at the S2V sequence plus the audio
injectors' q and output projections on the noisy tokens (12 layers of 2 x 2 x n x dim^2; their keys and
values cover 5 tokens a frame and are left out, like the text cross-attention).

``clip`` (the engine, ``S2VEngine``: random weights at real shapes for the DiT, umt5-xxl, the Wan2.1 VAE and
wav2vec2-large; one clip of a 4 s audio, 40 steps, CFG 4.5, the mp4 with its audio): the sidecar's stages,
the clip's seconds and the device's peak. Run the two parts in separate calls if one would not fit a time
limit: each merges its section into ``s2v-<gpu>.json``.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch

from artifex.attention.select import rel_l2
from artifex.bench import report
from artifex.bench.dit import peak_gib
from artifex.models.registry import get_model

log = logging.getLogger("artifex")


def injector_flops(model, noisy_tokens: int) -> float:
    """The audio injectors' q and output projections on the noisy tokens."""
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    return 2 * 2 * noisy_tokens * dim**2 * len(model.config.audio_inject_layers)


def build_model(spec, device: torch.device, dtype: torch.dtype):
    """S2V's DiT at its real shape, random weights (none left at zero), bf16 with the fp32-kept modules."""
    from artifex.models.loader import cast_keeping_fp32
    from artifex.models.s2v.transformer import WanS2VTransformer3DModel, s2v_config_for

    torch.manual_seed(0)
    with torch.device(device):
        m = cast_keeping_fp32(WanS2VTransformer3DModel(**s2v_config_for(spec)), dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    return m


def inputs_for(spec, model, width: int, height: int, device, dtype, sets: int = 3) -> tuple[torch.Tensor, list]:
    """One text context and rotating (latents, timestep, audio, reference, motion) sets of a later clip."""
    g = torch.Generator(device).manual_seed(1)
    cfg = model.config
    z, _, h, w = spec.latent_shape(width, height, 1)
    f = spec.clip_latent_frames
    text = torch.randn(1, spec.text_len, cfg.text_dim, generator=g, device=device, dtype=dtype)
    out = []
    for i in range(sets):
        def r(*shape):
            return torch.randn(*shape, generator=g, device=device, dtype=dtype)

        out.append((r(1, z, f, h, w), torch.tensor([900.0 - 250 * i], device=device),
                    r(1, cfg.audio_layers, cfg.audio_dim, 4 * f), r(1, z, 1, h, w),
                    r(1, z, spec.motion_latent_frames, h, w)))
    return text, out


def _reference_model(model, dtype):
    """DiffSynth's WanS2VModel over ``model``'s weights (official names: ``models.s2v.convert``)."""
    from artifex.bench.reference import diffsynth
    from artifex.models.s2v.convert import artifex_to_official_key

    try:  # DiffSynth looks for FA3 under the name the source build installs; the PyPI wheel has another
        import fa3_fwd_interface

        sys.modules.setdefault("flash_attn_interface", fa3_fwd_interface)
    except ImportError:
        pass
    mod = diffsynth("models.wan_video_dit_s2v")
    cfg = model.config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device (assigned below); its other tensors real
        ref = mod.WanS2VModel(dim=dim, in_dim=cfg.in_channels, ffn_dim=cfg.ffn_dim, out_dim=cfg.out_channels,
                              text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, eps=cfg.eps, patch_size=cfg.patch_size,
                              num_heads=cfg.num_attention_heads, num_layers=cfg.num_layers,
                              cond_dim=cfg.pose_channels, audio_dim=cfg.audio_dim,
                              num_audio_token=cfg.num_audio_tokens, audio_inject_layers=list(cfg.audio_inject_layers))
        # DiffSynth fixes wav2vec2-large's 25 hidden states; a toy model (tiny-s2v) mixes fewer
        ref.casual_audio_encoder.weights = torch.nn.Parameter(torch.empty(1, cfg.audio_layers, 1, 1, device="meta"))
    state = {artifex_to_official_key(k): v if v.dtype == dtype else v.to(dtype) for k, v in model.state_dict().items()}
    missing, _ = ref.load_state_dict(state, strict=False, assign=True)
    for name in missing:  # parameter-free in the official model (pre-norms): rebuilt on the device
        parent, _, leaf = name.rpartition(".")
        module = ref.get_submodule(parent)
        setattr(module, leaf, torch.nn.Parameter(torch.ones(getattr(module, leaf).shape, device=model.device,
                                                            dtype=dtype)))
    ref.to(model.device)  # its buffers (the assigned parameters are there already)
    for name, t in [*ref.named_parameters(), *ref.named_buffers()]:
        if t.is_meta:
            raise RuntimeError(f"reference tensor {name} left on the meta device")
    # later clips keep their motion tokens (DiffSynth's forward drops them, as the official first clip does)
    ref.inject_motion = functools.partial(type(ref).inject_motion, ref, drop_motion_frames=False)
    return ref.eval(), getattr(sys.modules.get("diffsynth.models.wan_video_dit"), "FLASH_ATTN_3_AVAILABLE", None)


def forward_section(model: str, width: int, height: int, device: torch.device, warmup: int, iters: int,
                    reference: bool = True, compile_blocks: bool = True) -> dict:
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from artifex.attention import install, runtime_from_config
    from artifex.attention.processor import AttentionRuntime
    from artifex.config import OptimizationConfig
    from artifex.engine.dit import accelerate_model
    from artifex.env import read_env
    from artifex.kernels import fp8

    spec, dtype = get_model(model), torch.bfloat16
    m = build_model(spec, device, dtype)
    text, sets = inputs_for(spec, m, width, height, device, dtype)
    tokens = spec.s2v_tokens(width, height)
    noisy = spec.clip_latent_frames * (height // 16) * (width // 16)
    flops = spec.flops_per_forward(width, height, 0) + injector_flops(m, noisy)
    peak, held = report.matmul_peak_tflops(device), report.matmul_sustained_tflops(device)
    data = {"size": f"{width}x{height}", "tokens": tokens, "noisy_tokens": noisy,
            "pflop_per_forward": round(flops / 1e15, 4), "matmul_peak_tflops": round(peak, 1),
            "matmul_sustained_tflops": None if held is None else round(held, 1),
            "bf16_limit_s": round(flops / (peak * 1e12), 4),
            "bf16_sustained_limit_s": None if held is None else round(flops / (held * 1e12), 4),
            "warmup": warmup, "iters": iters, "compile": compile_blocks, "rows": []}
    rate = held or peak
    base: list[torch.Tensor] = []

    def record(name: str, call, note: str) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            with torch.no_grad():
                out = call(*sets[0])
                secs = report.median_ms(lambda *a: call(*a), sets, device, warmup, iters) / 1e3
        except Exception as e:  # noqa: BLE001 (a benchmark keeps its failures: the row says what broke)
            data["rows"].append({"variant": name, "note": f"failed: {type(e).__name__}: {str(e)[:300]}"})
            log.warning("%s failed: %s", name, e)
            return
        row = {"variant": name, "s_per_forward": round(secs, 4), "tflops": round(flops / secs / 1e12, 1),
               "pct_sustained_matmul": round(100 * flops / secs / (rate * 1e12), 1),
               "peak_gib": peak_gib(device),
               "note": note}
        out = out.float().cpu()
        row["rel_l2_vs_plain"] = round(rel_l2(out, base[0]), 6) if base else None
        data["rows"].append(row)
        log.info("%s", row)

    def ours(x, ts, audio, ref, motion):
        return m(hidden_states=x, timestep=ts, encoder_hidden_states=text, audio_features=audio, ref_latents=ref,
                 motion_latents=motion)

    m.set_attn_processor(WanAttnProcessor())
    with torch.no_grad():
        base.append(ours(*sets[0]).float().cpu())
    record("plain", ours, "WanS2VTransformer3DModel's own forward, diffusers' WanAttnProcessor (SDPA)")
    data["rows"][-1]["rel_l2_vs_plain"] = 0.0
    if reference:
        try:
            ref, fa3 = _reference_model(m, dtype)
        except Exception as e:  # noqa: BLE001
            data["rows"].append({"variant": "reference", "note": f"not run: {type(e).__name__}: {e}"})
        else:
            def theirs(x, ts, audio, r, motion):  # under autocast, as the official sampler runs it
                with torch.autocast(device.type, dtype=dtype):
                    return ref(torch.cat([r, x], dim=2), ts, text, audio, list(motion), None)[:, :, 1:]

            record("reference", theirs, "DiffSynth-Studio WanS2VModel on the same weights (all bf16); attention "
                   + ("FA3" if fa3 else "not FA3 (its fallback chain)") + "; under torch.autocast(bf16)")
            del ref
    runtime = runtime_from_config(OptimizationConfig(), read_env().home)
    choice = runtime.prepare((1, tokens, spec.transformer.heads, spec.transformer.head_dim), dtype, device)
    data["attention_backend"] = choice.chosen
    install([m], runtime)
    accelerate_model(m, compile_blocks=compile_blocks)
    record("artifex_bf16", ours, f"engine.dit_s2v; attention {choice.chosen}; compiled blocks: {compile_blocks}")
    decision = fp8.decide(device)
    if decision.path != "scaled_mm":
        data["rows"].append({"variant": "artifex_fp8", "note": f"skipped: {decision.reason}"})
    else:
        rep = fp8.quantize_linears(m.blocks, path="scaled_mm")
        fp8_attention = AttentionRuntime(requested="fa3-fp8")
        try:
            fp8_attention.check_explicit(device, dtype, spec.transformer.head_dim)
            fp8_attention.prepare((1, tokens, spec.transformer.heads, spec.transformer.head_dim), dtype, device)
            install([m], fp8_attention)
            note = f"{rep.summary()}; attention fa3-fp8"
        except Exception as e:  # noqa: BLE001
            note = f"{rep.summary()}; attention {choice.chosen} (fa3-fp8 not available: {e})"
        record("artifex_fp8", ours, note)
    return data


def clip_section(model: str, width: int, height: int, device: torch.device, steps: int, fields: dict,
                 work: Path) -> dict:
    """One clip through ``S2VEngine`` on random components at the real shapes (a 4 s tone as the audio)."""
    import numpy as np
    from PIL import Image

    from artifex.config import OptimizationConfig
    from artifex.engine.pipeline import Engine
    from artifex.engine.request import GenerationRequest
    from artifex.models.random_init import random_components
    from artifex.models.s2v.audio import write_tone

    spec = get_model(model)
    work.mkdir(parents=True, exist_ok=True)
    audio, image = work / "speech.wav", work / "ref.png"
    write_tone(audio, 4.0)
    y, x = np.mgrid[0:height, 0:width]
    Image.fromarray(np.stack([x * 255 // width, y * 255 // height, (x + y) % 255], -1).astype(np.uint8)).save(image)
    comps = random_components(spec, "bf16", build_device=device)
    eng = Engine.from_components(spec, comps, OptimizationConfig(**fields))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    req = GenerationRequest(model=model, prompt="a woman speaking to the camera, studio light", image=str(image),
                            audio=str(audio), steps=steps, seed=1, width=width, height=height,
                            output=str(work / "clip.mp4"))
    result = eng.generate(req)
    side = result.sidecar
    t = result.timings
    clip = side["s2v"]["clips"][0]
    return {"config": fields, "size": f"{width}x{height}", "steps": steps, "guidance": list(result.settings.guidance),
            "frames": result.settings.frames, "timings_s": t, "clip": clip,
            "clip_s": round(clip["denoise_s"] + clip["decode_s"], 3), "s_per_step": round(clip["denoise_s"] / steps, 4),
            "peak_gib": result.peak_memory.get("gpu_max_allocated_gib"),
            "peak_memory": result.peak_memory, "plan": side["plan"]["placement"], "fp8": side.get("fp8"),
            "attention": side["attention"], "audio": side["audio"]}


def run(out_dir: Path, model: str = "s2v-14b", parts: tuple[str, ...] = ("forward", "clip"), size=None,
        warmup: int = 1, iters: int = 3, steps: int | None = None, clip_fp8: str = "off", reference: bool = True,
        device: str | None = None) -> dict:
    """Run ``parts`` and merge them into s2v-<device>.json (``model``: s2v-14b, or tiny-s2v to check the benchmark
    on a CPU, whose file is s2v-tiny-<device>.json)."""
    spec = get_model(model)
    width, height = size or spec.sizes[0]
    steps = steps or spec.steps
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    stem = ("s2v-tiny-" if spec.tiny else "s2v-") + report.device_slug(dev)
    path = out_dir / f"{stem}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(report.header(dev))
    if "forward" in parts:
        data["forward"] = forward_section(model, width, height, dev, warmup, iters, reference, dev.type == "cuda")
        write(out_dir, stem, data)
    if "clip" in parts:
        fields = {"fp8": clip_fp8, "use_torch_compile": dev.type == "cuda"}
        with tempfile.TemporaryDirectory() as tmp:
            data["clip"] = clip_section(model, width, height, dev, steps, fields, Path(tmp))
        write(out_dir, stem, data)
    data["files"] = [str(p) for p in write(out_dir, stem, data)]
    return data


def summary_of(data: dict) -> dict:
    fwd, clip = data.get("forward") or {}, data.get("clip") or {}
    rows = {r["variant"]: r for r in fwd.get("rows", []) if "s_per_forward" in r}

    def s(name):
        return rows.get(name, {}).get("s_per_forward")

    out = {"clip_s": clip.get("clip_s"), "clip_config": clip.get("config"), "forward_s": s("artifex_bf16"),
           "forward_fp8_s": s("artifex_fp8"), "bf16_sustained_limit_s": fwd.get("bf16_sustained_limit_s"),
           "peak_gib": clip.get("peak_gib"), "reference_forward_s": s("reference"), "plain_forward_s": s("plain")}
    if out["forward_s"] and out["bf16_sustained_limit_s"]:
        out["forward_over_sustained_limit"] = round(out["forward_s"] / out["bf16_sustained_limit_s"], 3)
    if out["forward_s"] and out["reference_forward_s"]:
        out["speedup_vs_reference"] = round(out["reference_forward_s"] / out["forward_s"], 3)
    for name in ("reference", "artifex_bf16", "artifex_fp8"):
        if name in rows:
            out[f"rel_l2_{name}_vs_plain"] = rows[name]["rel_l2_vs_plain"]
    size = fwd.get("size") or clip.get("size") or "1024x704"
    return {f"s2v_{size}": out}


def write(out_dir: Path, stem: str, data: dict) -> list[Path]:
    data["summary"] = summary_of(data)
    lines = [f"# S2V-14B, random weights at real shapes ({data['device'].get('name')})\n\n`{data['command']}` "
             f"({data['date']})\n"]
    fwd = data.get("forward")
    if fwd:
        lines.append(f"\n## One DiT forward, a later clip at {fwd['size']}: {fwd['tokens']} tokens, "
                     f"{fwd['pflop_per_forward']} PFLOP; bf16 sustained limit {fwd['bf16_sustained_limit_s']} s at "
                     f"{fwd['matmul_sustained_tflops']} TFLOP/s\n\n")
        lines.append(report.md_table([["variant", "s / forward", "TFLOP/s", "% of sustained matmul", "peak GiB",
                                       "rel L2 vs plain", "note"]] + [
            [r["variant"], str(r.get("s_per_forward", "-")), str(r.get("tflops", "-")),
             str(r.get("pct_sustained_matmul", "-")), str(r.get("peak_gib", "-")), str(r.get("rel_l2_vs_plain", "-")),
             r.get("note", "")] for r in fwd["rows"]]))
    clip = data.get("clip")
    if clip:
        lines.append(f"\n## One clip through the engine: {clip['frames']} frames, {clip['steps']} steps, CFG "
                     f"{clip['guidance']}, config {clip['config']}\n\n")
        lines.append(report.md_table([["stage", "seconds"]] + [[k, str(v)] for k, v in clip["timings_s"].items()]))
        lines.append(f"\nclip (denoise + decode): {clip['clip_s']} s; {clip['s_per_step']} s per step; peak "
                     f"{clip['peak_gib']} GiB\n")
    return report.write(out_dir, stem, data, "".join(lines))
