"""``artifex bench dit``: one DiT forward at a real shape, diffusers against Artifex, in one run.

Random weights at the model's real widths (bf16 with diffusers' fp32-kept modules, as
``from_pretrained(torch_dtype=bf16)`` loads them). One model is built and reused by
every variant, in this order, each on the same rotated inputs:

- ``diffusers_default``: diffusers' own forward and attention processor, called as
  WanPipeline calls it (TI2V: one timestep per token);
- ``diffusers_best``: the same with cuDNN attention and ``compile_repeated_blocks``
  (GPU only);
- ``artifex_bf16``: Artifex's forward (``engine.dit``) with the attention backend
  ``auto`` picks, blocks compiled;
- ``artifex_fp8``: the same with fp8 GEMMs and fp8 attention (``artifex.kernels``), where
  the GPU and the installed kernels allow.

Ablations, run only when named in ``variants`` (``DIT_ABLATIONS``): Artifex bf16 with one of its
changes switched off (``accelerate_model``'s switches), to measure what that change buys on the
same card in the same run: ``artifex_bf16_unfused_qkv``, ``artifex_bf16_no_gelu_epilogue``.
``fp32_reference``: one forward of diffusers' default path with the model and inputs in fp32 (TF32 off)
is computed first, and each row also gets its relative L2 against it (``rel_l2_fp32``): how far each
bf16/fp8 path is from the exact model, beside how far it is from diffusers' bf16 output (two bf16
paths with different attention kernels differ from each other by more than either does from fp32).
``profile``: each variant also runs one forward under torch.profiler; its GPU kernel time by
category (attention, GEMM, compiled elementwise, ...) and its top kernels go in the row.

Each: median seconds per forward (CUDA events; the text context stays fixed across
calls, as within a request, while latents and timesteps rotate over three sets), TFLOP/s
and share of the bf16 matmul peak measured in the same run, peak memory, and the
relative L2 of the output against ``diffusers_default`` on the same inputs. On a GPU the
peak is measured twice: in bursts (``bf16_limit_s``, the issue's limit) and held under
load (``bf16_sustained_limit_s``: the card's clock drops under sustained tensor-core work).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from artifex.attention.select import rel_l2
from artifex.bench import DIT_VARIANTS, report
from artifex.models.registry import get_model

log = logging.getLogger("artifex")
GIB = 2**30


def build_model(model: str, device: torch.device, dtype: torch.dtype):
    """The model's transformer with random weights at its real shape (one expert for A14B)."""
    from diffusers import WanTransformer3DModel

    from artifex.models.loader import cast_keeping_fp32

    spec = get_model(model)
    torch.manual_seed(0)
    with torch.device(device):
        m = cast_keeping_fp32(WanTransformer3DModel(**spec.transformer.diffusers_config()), dtype).eval()
    with torch.no_grad():  # diffusers zero-initialises the output head and some tables: make every term count
        for p in m.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    return spec, m


def inputs_for(spec, text_dim: int, width: int, height: int, frames: int, device, dtype, sets: int = 3):
    """Rotating (latents, timestep) sets and one text context; TI2V also gets WanPipeline's per-token timesteps."""
    g = torch.Generator(device).manual_seed(1)
    _, t, h, w = spec.latent_shape(width, height, frames)
    tokens = spec.tokens(width, height, frames)
    text = torch.randn(1, spec.text_len, text_dim, generator=g, device=device, dtype=dtype)
    out = []
    for i in range(sets):
        x = torch.randn(1, spec.transformer.in_channels, t, h, w, generator=g, device=device, dtype=dtype)
        ts = torch.tensor([900.0 - 250 * i], device=device)
        out.append((x, ts, ts.expand(1, tokens).contiguous() if spec.expand_timesteps else ts))
    return text, out


def peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / GIB, 2) if device.type == "cuda" else None


def run(model: str, width: int, height: int, frames: int, out_dir: Path | None = None, warmup: int = 3,
        iters: int = 10, variants: tuple[str, ...] = DIT_VARIANTS, device: str | None = None,
        compile_blocks: bool | None = None, profile: bool = False, fp32_reference: bool = False) -> dict:
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from artifex.attention import install, runtime_from_config
    from artifex.config import OptimizationConfig
    from artifex.engine.dit import accelerate_model, restore_model
    from artifex.env import read_env

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    compile_blocks = dev.type == "cuda" if compile_blocks is None else compile_blocks
    dtype = torch.bfloat16
    spec, m = build_model(model, dev, dtype)
    text, sets = inputs_for(spec, m.config.text_dim, width, height, frames, dev, dtype)
    tokens = spec.tokens(width, height, frames)
    flops = spec.flops_per_forward(width, height, frames)
    peak, held = report.matmul_peak_tflops(dev), report.matmul_sustained_tflops(dev)
    data = report.header(dev)
    data.update(model=model, size=f"{width}x{height}x{frames}", tokens=tokens, pflop_per_forward=round(flops / 1e15, 4),
                matmul_peak_tflops=round(peak, 1), bf16_limit_s=round(flops / (peak * 1e12), 4),
                matmul_sustained_tflops=None if held is None else round(held, 1),
                bf16_sustained_limit_s=None if held is None else round(flops / (held * 1e12), 4),
                warmup=warmup, iters=iters, compile=compile_blocks, rows=[])

    def record(name: str, fn, per_token: bool, note: str = "") -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)

        def call(x, ts, ts_tokens):
            with torch.no_grad():
                return fn(hidden_states=x, timestep=ts_tokens if per_token else ts, encoder_hidden_states=text,
                          return_dict=False)[0]

        out = call(*sets[0])  # the first call: compile, autotune, and the output compared across variants
        secs = report.median_ms(call, sets, dev, warmup, iters) / 1e3
        row = {"variant": name, "s_per_forward": round(secs, 4), "tflops": round(flops / secs / 1e12, 1),
               "pct_matmul_peak": round(100 * flops / secs / (peak * 1e12), 1), "peak_gib": peak_gib(dev),
               "note": note}
        if profile:
            row["kernels"] = report.kernel_breakdown(lambda: call(*sets[1]), dev)
        if exact is not None:
            row["rel_l2_fp32"] = round(rel_l2(out.float().cpu(), exact), 6)
        if reference:
            row["rel_l2"] = round(rel_l2(out.float().cpu(), reference[0]), 6)
        else:
            reference.append(out.float().cpu())
            row["rel_l2"] = 0.0
        data["rows"].append(row)
        log.info("%s", row)
        if out_dir is not None:  # after every row, so a run cut short keeps what it measured
            data["summary"] = summary_of(data)
            write(out_dir, data, dev)

    reference: list[torch.Tensor] = []
    m.set_attn_processor(WanAttnProcessor())
    exact = fp32_output(m, spec, text, sets[0]) if fp32_reference else None
    record("diffusers_default", m, spec.expand_timesteps, "diffusers' forward and SDPA, as WanPipeline calls it")
    if "diffusers_best" in variants:
        if dev.type != "cuda":
            data["rows"].append({"variant": "diffusers_best", "note": "skipped: cuDNN attention needs CUDA"})
        else:
            m.set_attention_backend("_native_cudnn")
            m.compile_repeated_blocks(fullgraph=True)
            record("diffusers_best", m, spec.expand_timesteps, "cuDNN attention + compile_repeated_blocks")
            for b in m.blocks:  # back to eager modules; Artifex compiles its own block function
                b._compiled_call_impl = None
            m.reset_attention_backend()
    runtime = runtime_from_config(OptimizationConfig(), read_env().home)
    choice = runtime.prepare((1, tokens, spec.transformer.heads, spec.transformer.head_dim), dtype, dev)
    data["attention_backend"] = choice.chosen
    install([m], runtime)
    accelerate_model(m, compile_blocks=compile_blocks)
    if "artifex_bf16" in variants:
        record("artifex_bf16", m, False, f"attention {choice.chosen}; compiled blocks: {compile_blocks}")
    for name, switch, what in (("artifex_bf16_unfused_qkv", "fuse_projections", "q, k, v as three GEMMs"),
                               ("artifex_bf16_no_gelu_epilogue", "ffn_epilogue", "GELU as its own kernel"),
                               ("artifex_bf16_no_ada_norm", "ada_norms", "the adaptive norms compiled by inductor")):
        if name in variants:
            accelerate_model(m, compile_blocks=compile_blocks, **{switch: False})
            record(name, m, False, f"artifex_bf16 with {switch}=False: {what}")
            accelerate_model(m, compile_blocks=compile_blocks)  # every change on again
    if "artifex_fp8" in variants:
        _fp8_row(data, record, m, runtime, dev, dtype, tokens, spec, compile_blocks)
    restore_model(m)
    data["summary"] = summary_of(data)
    if out_dir is not None:
        data["files"] = [str(p) for p in write(out_dir, data, dev)]
    return data


def fp32_output(m, spec, text, inputs) -> torch.Tensor:
    """diffusers' default forward of an fp32 copy of ``m`` on fp32 inputs (TF32 off), on the CPU afterwards."""
    import copy

    x, ts, ts_tokens = inputs
    exact = copy.deepcopy(m).float()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            out = exact(hidden_states=x.float(), timestep=ts_tokens if spec.expand_timesteps else ts,
                        encoder_hidden_states=text.float(), return_dict=False)[0].float().cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        del exact
        if x.is_cuda:
            torch.cuda.empty_cache()
    return out


def _fp8_row(data, record, m, runtime, dev, dtype, tokens, spec, compile_blocks) -> None:
    """fp8 GEMMs with bf16 attention, then fp8 GEMMs with fp8 attention (fa3-fp8), on the same model."""
    from artifex.attention import install
    from artifex.attention.processor import AttentionRuntime
    from artifex.kernels import fp8

    decision = fp8.decide(dev)
    if decision.path != "scaled_mm":
        data["rows"].append({"variant": "artifex_fp8", "note": f"skipped: {decision.reason}"})
        return
    rep = fp8.quantize_linears(m.blocks, path="scaled_mm")  # in place: the bf16 rows are done
    data["fp8_layers"] = {"swapped": len(rep.swapped), "kept": rep.skipped}
    record("artifex_fp8_gemm", m, False, f"{rep.summary()}; attention {runtime.chain.split(',')[0]} (bf16)")
    fp8_attention = AttentionRuntime(requested="fa3-fp8")
    try:
        fp8_attention.check_explicit(dev, dtype, spec.transformer.head_dim)
    except Exception as e:  # noqa: BLE001 (recorded: the row says why fp8 attention did not run)
        data["rows"].append({"variant": "artifex_fp8", "note": f"fp8 attention skipped: {e}"})
        return
    fp8_attention.prepare((1, tokens, spec.transformer.heads, spec.transformer.head_dim), dtype, dev)
    install([m], fp8_attention)
    record("artifex_fp8", m, False, f"{rep.summary()}; attention fa3-fp8 (e4m3 q/k/v, per-head scales)")
    install([m], runtime)


def summary_of(data: dict) -> dict:
    rows = {r["variant"]: r for r in data["rows"] if "s_per_forward" in r}

    def s(name):
        return rows[name]["s_per_forward"] if name in rows else None

    default = s("diffusers_default")
    out = {"diffusers_default_s": default, "diffusers_best_s": s("diffusers_best"), "artifex_bf16_s": s("artifex_bf16"),
           "artifex_fp8_s": s("artifex_fp8"), "artifex_fp8_gemm_s": s("artifex_fp8_gemm"),
           "bf16_limit_s": data["bf16_limit_s"],
           "rel_l2_bf16": rows.get("artifex_bf16", {}).get("rel_l2"),
           "rel_l2_fp8": rows.get("artifex_fp8", {}).get("rel_l2"),
           "rel_l2_fp8_gemm": rows.get("artifex_fp8_gemm", {}).get("rel_l2")}
    for name in ("diffusers_default", "diffusers_best", "artifex_bf16", "artifex_fp8"):
        if "rel_l2_fp32" in rows.get(name, {}):
            out[f"rel_l2_fp32_{name}"] = rows[name]["rel_l2_fp32"]
    for name in ("artifex_bf16", "artifex_fp8", "artifex_fp8_gemm"):
        if s(name) and default:
            out[f"{name}_speedup"] = round(default / s(name), 3)
    if s("artifex_bf16"):
        out["artifex_bf16_over_limit"] = round(s("artifex_bf16") / data["bf16_limit_s"], 3)
    if s("artifex_bf16") and data.get("bf16_sustained_limit_s"):  # the same, at the clock a long run holds
        out["bf16_sustained_limit_s"] = data["bf16_sustained_limit_s"]
        out["artifex_bf16_over_sustained_limit"] = round(s("artifex_bf16") / data["bf16_sustained_limit_s"], 3)
    return out


def shape_key(model: str, width: int, height: int) -> str:
    """The issue's summary keys: ti2v5b_720p, a14b_720p, a14b_480p; else model_WxH."""
    short = {"ti2v-5b": "ti2v5b", "t2v-a14b": "a14b", "i2v-a14b": "a14b"}.get(model, model.replace("-", ""))
    res = {(1280, 704): "720p", (704, 1280): "720p", (1280, 720): "720p", (832, 480): "480p"}.get((width, height))
    return f"{short}_{res}" if res else f"{short}_{width}x{height}"


def write(out_dir: Path, data: dict, dev: torch.device) -> list[Path]:
    """Merge this shape into dit-<device>.json (one file holds every shape measured on that device)."""
    import json

    slug = report.device_slug(dev)
    path = out_dir / f"dit-{slug}.json"
    merged = json.loads(path.read_text()) if path.exists() else {}
    key = shape_key(data["model"], *(int(v) for v in data["size"].split("x")[:2]))
    shapes = {**merged.get("shapes", {}), key: data}
    merged = {k: data[k] for k in ("device", "command", "date", "versions")}
    merged["shapes"] = shapes
    merged["summary"] = {k: v["summary"] for k, v in shapes.items()}
    lines = [f"# DiT forward, diffusers vs Artifex ({data['device'].get('name')})\n"]
    for k, d in shapes.items():
        lines.append(f"\n## {k}: {d['model']} {d['size']}, {d['tokens']} tokens, {d['pflop_per_forward']} PFLOP; "
                     f"bf16 limit {d['bf16_limit_s']} s at the measured {d['matmul_peak_tflops']} TFLOP/s"
                     + (f" ({d['bf16_sustained_limit_s']} s at {d['matmul_sustained_tflops']} TFLOP/s held under "
                        "load)" if d.get("bf16_sustained_limit_s") else "") + "\n\n"
                     f"`{d['command']}` ({d['date']})\n\n")
        lines.append(report.md_table([["variant", "s / forward", "TFLOP/s", "% of matmul peak", "peak GiB",
                                       "rel L2 vs diffusers", "rel L2 vs fp32", "note"]] + [
            [r["variant"], str(r.get("s_per_forward", "-")), str(r.get("tflops", "-")),
             str(r.get("pct_matmul_peak", "-")), str(r.get("peak_gib", "-")), str(r.get("rel_l2", "-")),
             str(r.get("rel_l2_fp32", "-")), r.get("note", "")] for r in d["rows"]]))
        profiled = [r for r in d["rows"] if "kernels" in r]
        if profiled:
            cats = sorted({c for r in profiled for c in r["kernels"]["categories"]})
            lines.append(f"\nOne profiled forward per variant, {profiled[0]['kernels']['unit']}:\n\n")
            lines.append(report.md_table([["variant", "total", *cats]] + [
                [r["variant"], str(r["kernels"]["total_ms"]),
                 *(str(r["kernels"]["categories"].get(c, 0)) for c in cats)] for r in profiled]))
    files = report.write(out_dir, f"dit-{slug}", merged, "".join(lines))
    _chart(shapes, out_dir / f"dit-{slug}.png")
    return files + [out_dir / f"dit-{slug}.png"]


def _chart(shapes: dict, path: Path) -> None:
    plt = report.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 3.6), squeeze=False)
    for ax, (key, d) in zip(axes[0], shapes.items()):
        rows = [r for r in d["rows"] if "s_per_forward" in r]
        ax.bar([r["variant"].replace("_", "\n") for r in rows], [r["s_per_forward"] for r in rows], color="tab:blue")
        ax.axhline(d["bf16_limit_s"], color="tab:red", linestyle="--", label="bf16 matmul-peak limit")
        ax.set_title(f"{key} ({d['tokens']} tokens)")
        ax.set_ylabel("s per forward")
        ax.legend(fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

