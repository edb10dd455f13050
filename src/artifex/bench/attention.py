"""``artifex bench attention``: every available backend on the Wan attention shapes.

For each shape: each verified backend's median time over rotated random inputs, its
TFLOP/s and share of the bf16 matmul peak measured in the same run, its peak memory,
PyTorch's default SDPA as the baseline, and what ``auto`` picks. Then the Wan processor
with the picked backend against diffusers' own processor on the same weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from artifex.attention.backends import BACKENDS, attention_flops, probe
from artifex.attention.ops import LAST_RESORT
from artifex.attention.select import DTYPE_NAMES, rel_l2, select, verify
from artifex.bench import report

log = logging.getLogger("artifex")

# (batch, tokens, heads, head_dim) of one self-attention call, CFG not batched.
WAN_SHAPES = {
    "ti2v5b_720p": (1, 27_280, 24, 128),  # TI2V-5B 1280x704x121
    "a14b_480p": (1, 32_760, 40, 128),  # A14B 832x480x81
    "a14b_720p": (1, 75_600, 40, 128),  # A14B 1280x720x81
}


@dataclass
class Row:
    shape: str
    backend: str
    ms: float | None
    tflops: float | None
    pct_peak: float | None
    peak_mem_gib: float | None
    note: str | None = None


def parse_shape(text: str) -> tuple[str, tuple[int, int, int, int]]:
    """NAME=BxLxHxD, e.g. mine=1x4096x24x128."""
    try:
        name, dims = text.split("=")
        b, n, h, d = (int(x) for x in dims.lower().split("x"))
        return name, (b, n, h, d)
    except ValueError:
        raise ValueError(f"shape must look like NAME=BxLxHxD (e.g. test=1x4096x24x128), got {text!r}") from None


def bench_shape(name, shape, dtype, device, peak, backends, warmup, iters) -> list[Row]:
    b, n, h, d = shape
    flops = attention_flops(b, n, n, h, d)
    gen = torch.Generator(device).manual_seed(1234)
    inputs = [tuple(torch.randn(b, n, h, d, generator=gen, device=device, dtype=dtype) for _ in range(3))
              for _ in range(3)]
    rows = []
    for bname in backends:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if bname == "sdpa-math" and 4 * b * h * n * n * 2 > free:  # scores + softmax in fp32-ish
                rows.append(Row(name, bname, None, None, None, None, "skipped: the full score matrix would not fit"))
                continue
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        run = BACKENDS[bname].run
        try:
            ms = report.median_ms(lambda q, k, v, _r=run: _r(q, k, v, None, False, 0.0, 4), inputs, device, warmup,
                                  iters)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append(Row(name, bname, None, None, None, None, "out of memory"))
            continue
        except Exception as e:
            rows.append(Row(name, bname, None, None, None, None, f"failed: {type(e).__name__}: {e}"[:200]))
            continue
        mem = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else None
        tf = flops / (ms * 1e-3) / 1e12
        rows.append(Row(name, bname, _sig(ms), _sig(tf), _sig(100 * tf / peak), _sig(mem) if mem is not None else None))
    return rows


def _sig(x: float) -> float:
    """Four significant digits: keeps tiny CPU numbers non-zero and GPU numbers readable."""
    return float(f"{x:.4g}")


def processor_check(device: torch.device, dtype: torch.dtype, choice_chain: list[str], tokens_shape) -> dict:
    """diffusers' default Wan processor vs Artifex's with the chosen chain, same weights and inputs."""
    from diffusers import WanTransformer3DModel

    from artifex.attention.processor import AttentionRuntime, install

    t, hh, ww = tokens_shape  # latent frames, latent height, latent width (before 2x2 patching)
    torch.manual_seed(0)
    model = WanTransformer3DModel(num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48,
                                  ffn_dim=14336, num_layers=2).to(device, dtype).eval()
    gen = torch.Generator(device).manual_seed(7)
    x = torch.randn(1, 48, t, hh, ww, generator=gen, device=device, dtype=dtype)
    text = torch.randn(1, 512, 4096, generator=gen, device=device, dtype=dtype)
    step = torch.tensor([700.0], device=device)
    with torch.no_grad():
        ref = model(hidden_states=x, timestep=step, encoder_hidden_states=text, return_dict=False)[0].float()
        install([model], AttentionRuntime(chain=",".join(choice_chain)))
        out = model(hidden_states=x, timestep=step, encoder_hidden_states=text, return_dict=False)[0].float()
    return {"model": "WanTransformer3DModel dim 3072, 24 heads, 2 layers, random weights",
            "tokens": t * (hh // 2) * (ww // 2), "dtype": str(dtype).removeprefix("torch."),
            "backend": choice_chain[0], "rel_l2_vs_diffusers_default": rel_l2(out, ref.double())}


def run(shapes: dict[str, tuple[int, int, int, int]], dtype_name: str = "bf16", out_dir: Path | None = None,
        warmup: int = 3, iters: int = 10, processor: bool = True, png: bool = True) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPE_NAMES[dtype_name]
    data = report.header(device)
    peak = report.matmul_peak_tflops(device)
    verification, backends = {}, []
    for bname, backend in BACKENDS.items():
        if bname == "sliced":
            continue  # a memory option: same kernel as sdpa in chunks
        why = probe(backend, device, dtype, 128)
        v = verify(bname, device, dtype, 128) if why is None else None
        verification[bname] = {"ok": bool(v and v.ok), "rel_l2": v.rel_l2 if v else None,
                               "reason": why or (v.reason if v else None)}
        if v and v.ok:
            backends.append(bname)
    rows, auto, summary = [], {}, {"auto_backend": {}, "auto_tflops": {}, "best_backend": {}, "best_tflops": {},
                                   "sdpa_default_tflops": {}, "auto_within_pct_of_best": {}}
    for name, shape in shapes.items():
        log.info("bench attention: %s %s", name, shape)
        shape_rows = bench_shape(name, shape, dtype, device, peak, backends, warmup, iters)
        rows += shape_rows
        choice = select("auto", device, dtype, shape)
        auto[name] = choice.to_dict()
        timed = {r.backend: r for r in shape_rows if r.tflops is not None}
        best = max(timed.values(), key=lambda r: r.tflops) if timed else None
        summary["auto_backend"][name] = choice.chosen
        summary["auto_tflops"][name] = timed[choice.chosen].tflops if choice.chosen in timed else None
        summary["best_backend"][name] = best.backend if best else None
        summary["best_tflops"][name] = best.tflops if best else None
        summary["sdpa_default_tflops"][name] = timed["sdpa"].tflops if "sdpa" in timed else None
        if best and summary["auto_tflops"][name]:
            summary["auto_within_pct_of_best"][name] = round(100 * (1 - summary["auto_tflops"][name] / best.tflops), 2)
    summary["matmul_peak_tflops"] = _sig(peak)
    data.update(summary=summary, dtype=dtype_name, shapes={k: list(v) for k, v in shapes.items()},
                verification=verification, results=[r.__dict__ for r in rows], auto_choices=auto)
    if processor and device.type == "cuda":
        first = next(iter(shapes))
        chain = auto[first]["chain"] if auto else ["sdpa", LAST_RESORT]
        data["processor_check"] = processor_check(device, dtype, chain, (31, 44, 80))
        summary["processor_rel_l2_bf16"] = data["processor_check"]["rel_l2_vs_diffusers_default"]
    if out_dir is not None:
        stem = f"attention-{report.device_slug(device)}"
        data["files"] = [str(p) for p in report.write(out_dir, stem, data, _markdown(data))]
        if png:
            chart = _chart(data, out_dir / f"{stem}.png")
            if chart:
                data["files"].append(str(chart))
    return data


def _markdown(data: dict) -> str:
    s = data["summary"]
    d = data["device"]
    lines = [f"# Attention backends on {d.get('name')} ({data['dtype']})", "",
             f"`{data['command']}` on {data['date']}; torch {data['versions']['torch']}. "
             f"bf16 matmul peak measured in the same run: {s['matmul_peak_tflops']} TFLOP/s.", ""]
    table = [["shape", "backend", "ms", "TFLOP/s", "% of matmul peak", "peak mem GiB", "note"]]
    for r in data["results"]:
        table.append([r["shape"], r["backend"], *(("-" if r[k] is None else str(r[k]))
                                                   for k in ("ms", "tflops", "pct_peak", "peak_mem_gib")),
                      r["note"] or ""])
    lines.append(report.md_table(table))
    lines.append("| shape | auto picks | auto TFLOP/s | best | best TFLOP/s | default SDPA TFLOP/s |")
    lines.append("|---|---|---|---|---|---|")
    for name in data["shapes"]:
        lines.append(f"| {name} | {s['auto_backend'][name]} | {s['auto_tflops'][name]} | {s['best_backend'][name]} "
                     f"| {s['best_tflops'][name]} | {s['sdpa_default_tflops'][name]} |")
    if "processor_check" in data:
        pc = data["processor_check"]
        lines += ["", f"Wan processor with `{pc['backend']}` vs diffusers' default processor, same weights "
                      f"({pc['model']}, {pc['tokens']} tokens, {pc['dtype']}): relative L2 "
                      f"{pc['rel_l2_vs_diffusers_default']:.2e}."]
    lines += ["", "Verification against a float64 reference:", ""]
    for name, v in data["verification"].items():
        state = f"ok, rel L2 {v['rel_l2']:.1e}" if v["ok"] else f"not used: {v['reason']}"
        lines.append(f"- {name}: {state}")
    return "\n".join(lines) + "\n"


def _chart(data: dict, path: Path) -> Path | None:
    plt = report.pyplot()
    if plt is None:
        return None
    shapes = list(data["shapes"])
    backends = sorted({r["backend"] for r in data["results"] if r["tflops"] is not None})
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(1, len(backends))
    for i, bname in enumerate(backends):
        vals = [next((r["tflops"] or 0 for r in data["results"] if r["shape"] == s and r["backend"] == bname), 0)
                for s in shapes]
        ax.bar([x + i * width for x in range(len(shapes))], vals, width, label=bname)
    ax.axhline(data["summary"]["matmul_peak_tflops"], color="k", linestyle="--", linewidth=1, label="bf16 matmul peak")
    ax.set_xticks([x + width * (len(backends) - 1) / 2 for x in range(len(shapes))], shapes)
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"Attention at Wan shapes, {data['device'].get('name')} ({data['dtype']})")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
