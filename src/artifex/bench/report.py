"""Writing benchmark results: one JSON (device, command, date, versions, summary, ...) and a Markdown table."""

from __future__ import annotations

import itertools
import json
import logging
import re
import shlex
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from artifex.sysinfo import device_info, versions

log = logging.getLogger("artifex")


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    m = re.search(r"(h100|h200|h20|a100|l40s|l4|a10g|4090|3090|b200)", name)
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def header(device: torch.device, prog: str = "artifex") -> dict:
    """``prog`` names how the benchmark was started (the CLI, or ``python -m ...``) for the command line."""
    return {
        "device": device_info(device),
        "command": " ".join([prog, *(shlex.quote(a) for a in sys.argv[1:])]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": versions(),
    }


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """bf16 matmul throughput measured now on ``device`` (8192^3 on a GPU, 1024^3 on a CPU), median of runs."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = []
    for i in range(13):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 3:  # warm-up excluded
            times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e12


def matmul_sustained_tflops(device: torch.device, seconds: float = 3.0,
                            dtype: torch.dtype = torch.bfloat16) -> float | None:
    """bf16 matmul throughput the card holds under load (GPU only, else None): 8192^3 products back to back for
    ``seconds``, so the SM clock settles where sustained tensor-core work keeps it, then 20 more timed as one.
    ``matmul_peak_tflops`` times single products with idle gaps between them, at the boost clock; a whole DiT
    forward runs at the lower one (benchmarks/probes/probe6-h100.json)."""
    if device.type != "cuda":
        return None
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            a @ b
        torch.cuda.synchronize(device)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    stop.record()
    torch.cuda.synchronize(device)
    return 20 * 2 * n**3 / (start.elapsed_time(stop) / 1e3) / 1e12


def write(out_dir: Path, stem: str, data: dict, markdown: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    js.write_text(json.dumps(data, indent=2, default=str) + "\n")
    md.write_text(markdown)
    return [js, md]


def md_table(rows: list[list[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def median_ms(run, inputs: list, device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of ``run(*inputs[i])``, cycling through the input sets so no cache holds the answer
    (CUDA events on a GPU, wall clock on a CPU; the attention selector's timer)."""
    from artifex.attention.select import _time_ms

    sets = itertools.cycle(inputs)
    return _time_ms(lambda: run(*next(sets)), device, warmup, iters)


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None (with a warning) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no PNG chart (pip install matplotlib)")
        return None
    return plt


# Kernel (GPU) or operator (CPU) names -> what they are; the first matching rule wins: inductor's generated kernels
# first (their names list the fused ops: "..._scaled_mm_..._amax_..." is a quantization, not a GEMM), then attention
# (FA3's kernels are CUTLASS templates), then GEMMs; "triton_tem" kernels are inductor's GEMM templates.
KERNEL_CATEGORIES = (
    ("compiled_elementwise", re.compile(r"^triton_(?!tem)", re.I)),  # inductor's kernels, named after their ops
    ("attention", re.compile(r"flash|fmha|attention|sdpa|cudnn", re.I)),
    ("gemm", re.compile(r"^triton_tem|gemm|nvjet|xmma|cutlass|scaled_mm"
                        r"|aten::(mm|addmm|bmm|linear|matmul|_addmm_activation)$", re.I)),
    ("qk_norm_rope", re.compile(r"qk_norm_rope", re.I)),
    ("ada_norm", re.compile(r"ada_norm", re.I)),
    ("fp8_quantize", re.compile(r"quantize_rows", re.I)),
    ("copy", re.compile(r"copy|memcpy|memset|aten::(cat|contiguous|clone|to|_to_copy)$", re.I)),
)


def kernel_category(name: str) -> str:
    return next((cat for cat, rule in KERNEL_CATEGORIES if rule.search(name)), "other")


def kernel_breakdown(call, device: torch.device, top: int = 12) -> dict:
    """Run ``call()`` once under torch.profiler: time by category (``KERNEL_CATEGORIES``) and the ``top``
    kernels. On a GPU the GPU kernels' own times; on a CPU the operators' self times (no kernels there)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        call()
        if cuda:
            torch.cuda.synchronize(device)
    totals: dict[str, list] = {}  # name -> [microseconds, calls]
    if cuda:
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                t = totals.setdefault(e.name, [0.0, 0])
                t[0] += e.time_range.elapsed_us()
                t[1] += 1
    else:
        for e in prof.key_averages():
            if e.self_cpu_time_total > 0:
                totals[e.key] = [e.self_cpu_time_total, e.count]
    categories: dict[str, float] = {}
    for name, (us, _) in totals.items():
        cat = kernel_category(name)
        categories[cat] = categories.get(cat, 0.0) + us
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return {"unit": "ms of GPU kernel time" if cuda else "ms of CPU operator self time",
            "total_ms": round(sum(us for us, _ in totals.values()) / 1e3, 2),
            "categories": {k: round(v / 1e3, 2) for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
            "top": [{"name": name[:160], "category": kernel_category(name), "ms": round(us / 1e3, 2), "calls": n}
                    for name, (us, n) in ranked]}
