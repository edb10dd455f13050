"""``artifex bench multigpu``: one model and shape under several parallel layouts, in one torch.distributed world.

    artifex bench multigpu --model t2v-a14b --size 1280x720 --frames 81 --steps 4 --layouts 1x1 2x1 1x2

Layouts are written ``CFGxULYSSES`` (``2x4`` = CFG-parallel 2 x Ulysses 4 on 8 GPUs). The command
starts ``torchrun --standalone`` with as many ranks as the largest layout needs (one GPU each;
gloo processes on a CPU), every rank builds the same model once (random weights at the real
shapes, or ``--checkpoint``), and the layouts then run one after another on the first ranks of
that world, the others waiting. For each layout: a warm-up generation (compile and autotune
for the layout's shapes), then the measured whole generation (text, every step, VAE decode and
mp4 write by rank 0), with

- the median denoising step (one step = the DiT forwards of the prompt and the negative prompt,
  however the layout splits them), the stage times, and the projected whole generation at the
  model's default step count when ``--steps`` asks for fewer (said so in the report);
- the time inside the layout's collectives per kind (all-to-all, all-gather, broadcast; CUDA
  events around each call, so waiting for the slowest peer is included), on every rank;
- how long the ranks that do not decode wait for rank 0's decode and write (idle ranks);
- the first step's flow prediction and the final latents against the one-GPU layout (rel L2);
- speedup and scaling efficiency (speedup / GPUs) against the one-GPU layout;
- with ``--runner-baseline``, the one-GPU layout once more through the parallel runner (a world
  of processes, the layout's seams applied): what the distribution layer costs on one GPU.

Rank 0 writes ``multigpu-<gpu>.json`` (+ .md, .png); one file holds every shape measured on a
device, each run adding or replacing its shape's entry.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from artifex.errors import InvalidRequestError

log = logging.getLogger("artifex")
PROMPT = "a red kite over a golden beach at sunset, waves rolling in, cinematic light"
NEGATIVE = "blurry, distorted, low quality"
_LAYOUT = re.compile(r"^(\d+)x(\d+)$")


# -- layouts -------------------------------------------------------------------------------------
def parse_layout(text: str):
    """``CxU`` -> ParallelLayout(C, U)."""
    from artifex.distributed.layout import ParallelLayout

    m = _LAYOUT.match(text.strip())
    if not m:
        raise InvalidRequestError("layouts", f"layout {text!r} is not CFGxULYSSES", "e.g. 1x1, 2x1, 1x2, 2x4")
    return ParallelLayout(int(m.group(1)), int(m.group(2)))


def layout_key(layout) -> str:
    return f"{layout.cfg}x{layout.ulysses}"


def default_layouts(heads: int, gpus: int) -> list[str]:
    """The issue's layouts that fit ``gpus``: one GPU, CFG 2, Ulysses 2/4/8, and CFG 2 x Ulysses 2/4."""
    keys = ["1x1", "2x1", "1x2", "1x4", "1x8", "2x2", "2x4"]
    return [k for k in keys if (lay := parse_layout(k)).world_size <= gpus and heads % lay.ulysses == 0]


def check_layouts(spec, texts: list[str] | None, gpus: int | None) -> list:
    """The layouts to run, one-GPU first (the reference); refused with the valid ones when one cannot run."""
    from artifex.distributed.layout import layouts_for

    limit = gpus if gpus is not None else 8
    texts = texts or default_layouts(spec.transformer.heads, limit)
    layouts = []
    for text in texts:
        layout = parse_layout(text).check(spec)
        if gpus is not None and layout.world_size > gpus:
            allowed = [x for n in range(1, gpus + 1) for x in layouts_for(n, spec.transformer.heads)]
            raise InvalidRequestError("layouts", f"{text} needs {layout.world_size} GPUs, {gpus} are visible",
                                      ", ".join(allowed))
        if layout not in layouts:
            layouts.append(layout)
    layouts.sort(key=lambda lay: lay.world_size != 1)  # the one-process layout first: it is the reference
    return layouts


# -- flags (shared by the artifex command and the ranks) ------------------------------------------
def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="ti2v-5b")
    p.add_argument("--size", help="WIDTHxHEIGHT (default: the model's first trained size)")
    p.add_argument("--frames", type=int, help="4n+1 (default: the model's)")
    p.add_argument("--steps", type=int,
                   help="denoising steps measured (default: the model's); fewer -> the whole generation at the "
                        "default count is projected from the median step")
    p.add_argument("--warmup-steps", type=int, default=1, help="steps of the warm-up generation per layout")
    p.add_argument("--layouts", nargs="+", help="CFGxULYSSES each, e.g. 1x1 2x1 1x2 (default: all that fit)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--compile", choices=["on", "off"], help="compile the blocks (default: on with CUDA)")
    p.add_argument("--fp8", default="off", choices=["off", "gemm", "all"])
    p.add_argument("--checkpoint", help="real weights (directory or hub id); default: random weights, real shapes")
    p.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    p.add_argument("--runner-baseline", action="store_true",
                   help="run the one-GPU layout twice: the plain engine, then through the parallel runner (the "
                        "distribution layer's cost on one GPU)")
    p.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))


def _shape(spec, args) -> tuple[int, int, int, int]:
    from artifex.engine.request import check_frames, check_size

    if args.size:
        m = re.match(r"^(\d+)x(\d+)$", args.size)
        if not m:
            raise InvalidRequestError("size", f"size {args.size!r} is not WIDTHxHEIGHT", "e.g. 1280x704")
        w, h = int(m.group(1)), int(m.group(2))
    else:
        w, h = spec.sizes[0]
    frames = args.frames or spec.frames
    check_size(spec, w, h)
    check_frames(spec, frames)
    steps = args.steps or spec.steps
    if steps < 2 or args.warmup_steps < 1:
        raise InvalidRequestError("steps", f"--steps {steps} / --warmup-steps {args.warmup_steps}: the median "
                                  "step needs at least 2 measured steps and the warm-up at least 1", "steps >= 2")
    return w, h, frames, steps


def command(args: argparse.Namespace) -> int:
    """``artifex bench multigpu``: check everything, then start the ranks under torchrun."""
    import subprocess

    import torch

    from artifex.distributed.groups import pick_backend
    from artifex.models.registry import get_model

    spec = get_model(args.model)
    _shape(spec, args)
    backend = pick_backend(args.backend)
    gpus = torch.cuda.device_count() if backend == "nccl" else None
    layouts = check_layouts(spec, args.layouts, gpus)
    nproc = max(lay.world_size for lay in layouts)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "artifex.bench.multigpu", *rank_argv(args, [layout_key(x) for x in layouts])]
    print(f"artifex bench multigpu: {', '.join(layout_key(x) for x in layouts)} on {nproc} ranks ({backend})",
          file=sys.stderr)
    return subprocess.run(cmd).returncode


def rank_argv(args: argparse.Namespace, layouts: list[str]) -> list[str]:
    """The ranks' command line: the same flags, the layouts spelled out."""
    argv = ["--layouts", *layouts]
    for flag in ("model", "size", "frames", "steps", "warmup_steps", "precision", "compile", "fp8", "checkpoint",
                 "backend", "output_dir", "runner_baseline"):
        value = getattr(args, flag)
        if value is True:
            argv.append(f"--{flag.replace('_', '-')}")
        elif value not in (None, False):
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    return argv


# -- the ranks ------------------------------------------------------------------------------------
def rank_main(args: argparse.Namespace) -> int:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from artifex.bench import report
    from artifex.config import OptimizationConfig
    from artifex.distributed.commtime import CommTimer
    from artifex.distributed.groups import build_groups, init_distributed
    from artifex.distributed.runner import ParallelRunner
    from artifex.engine.pipeline import Engine
    from artifex.models.registry import get_model

    spec = get_model(args.model)
    w, h, frames, steps = _shape(spec, args)
    backend, device = init_distributed(args.backend)
    dev = torch.device(device)
    control = dist.new_group(backend="gloo", timeout=timedelta(hours=2))  # waits as long as a layout runs
    rank, world = dist.get_rank(), dist.get_world_size()
    layouts = check_layouts(spec, args.layouts, world if backend == "nccl" else None)
    try:
        t = time.perf_counter()
        components, weights = _components(spec, args, dev)
        compile_blocks = dev.type == "cuda" if args.compile is None else args.compile == "on"
        config = OptimizationConfig(device=device, precision=args.precision, use_torch_compile=compile_blocks,
                                    max_batch_size=2, vae_precision="bf16", fp8=args.fp8)
        engine = Engine.from_components(spec, components, config)
        build_s = time.perf_counter() - t
        data = report.header(dev, prog="artifex bench multigpu") if rank == 0 else {}
        data.update(model=spec.name, size=f"{w}x{h}x{frames}", tokens=spec.tokens(w, h, frames), steps=steps,
                    default_steps=spec.steps, warmup_steps=args.warmup_steps, weights=weights, backend=backend,
                    world_size=world, config={"precision": args.precision, "compile": compile_blocks,
                                              "fp8": args.fp8, "cfg_batch": engine.plan.cfg_batch},
                    build_s=round(build_s, 1), layouts=[])
        work = Path(tempfile.mkdtemp(prefix=f"artifex-multigpu-{rank}-"))
        reference: dict = {}
        runs = [(lay, False) for lay in layouts]
        if args.runner_baseline and layouts[0].world_size == 1:
            runs.insert(1, (layouts[0], True))
        for layout, via_runner in runs:
            timer = CommTimer(dev)
            groups = build_groups(layout, spare_ranks=True)
            together = dist.new_group(list(range(layout.world_size)), backend="gloo", timeout=timedelta(hours=2))
            mine = None
            if groups is not None:
                runner = ParallelRunner(engine, groups, timer) if layout.world_size > 1 or via_runner else None
                try:
                    mine = _run_layout(engine, runner, spec, w, h, frames, steps, args.warmup_steps, timer, dev,
                                       work / layout_key(layout), lambda g=together: dist.barrier(group=g))
                finally:
                    if runner is not None:
                        runner.remove()
            t = time.perf_counter()
            dist.barrier(group=control)  # the ranks that did not decode wait here for rank 0's decode and write
            if mine is not None:
                mine["wait_after_denoise_s"] = round(time.perf_counter() - t, 3)
            ranks: list = [None] * world
            dist.all_gather_object(ranks, mine, group=control)
            if rank == 0:
                row = _layout_row(layout, [r for r in ranks if r is not None], spec, steps, reference, via_runner)
                data["layouts"].append(row)
                log.info("%s", {k: v for k, v in row.items() if k != "ranks"})
                _write(args.output_dir, data, dev)  # after every layout, so a run cut short keeps what it measured
        if rank == 0:
            files = _write(args.output_dir, data, dev)
            print("\n".join(str(f) for f in files))
        dist.barrier(group=control)
    finally:
        dist.destroy_process_group()
    return 0


def _components(spec, args, dev):
    if args.checkpoint:
        from artifex.env import read_env
        from artifex.models.loader import load_components, resolve_checkpoint

        return load_components(spec, resolve_checkpoint(spec, args.checkpoint, read_env().home),
                               args.precision), str(args.checkpoint)
    from artifex.models.random_init import random_components

    return random_components(spec, args.precision, build_device=dev), "random (real shapes)"


def _run_layout(engine, runner, spec, w, h, frames, steps, warmup_steps, timer, dev, work: Path, barrier) -> dict:
    """This rank's part of one layout: a warm-up generation, then the measured one. ``barrier`` waits for the
    layout's ranks (rank 0 decodes the warm-up video while the others would already start the measured run)."""
    import torch

    from artifex.engine.request import GenerationRequest

    generate = runner.generate if runner is not None else engine.generate
    work.mkdir(parents=True, exist_ok=True)

    def request(n: int, name: str) -> GenerationRequest:
        return GenerationRequest(model=spec.name, prompt=PROMPT, negative_prompt=NEGATIVE, seed=7, steps=n,
                                 width=w, height=h, frames=frames, output=str(work / f"{name}.mp4"))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    t = time.perf_counter()
    generate(request(warmup_steps, "warmup"))
    warm = time.perf_counter() - t
    barrier()
    timer.reset()

    predict, first = engine.predict, []

    def capture(*a):  # the first step's flow prediction, compared across layouts
        out = predict(*a)
        if not first:
            first.append(out.detach().float().cpu())
        return out

    marks: list[float] = []

    def on_event(e):
        if e.stage == "denoise":
            sync()
            marks.append(time.perf_counter())

    engine.predict = capture
    try:
        sync()
        result = generate(request(steps, "run"), on_event=on_event)
    finally:
        engine.predict = predict
    sync()
    step_s = [b - a for a, b in zip(marks, marks[1:])]
    return {"rank": _rank(), "warmup_s": round(warm, 2), "timings_s": result.timings,
            "median_step_s": round(statistics.median(step_s), 4), "steps_s": [round(s, 4) for s in step_s],
            "comm": timer.read(), "peak": result.peak_memory, "tier": result.memory.get("tier"),
            "attention": result.attention.chosen, "attention_shape": list(result.attention.shape),
            "writes": result.video_path is not None,
            "first_prediction": first[0] if first and result.video_path is not None else None,
            "latents": result.latents if result.video_path is not None else None}


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


def _backend() -> str:
    import torch.distributed as dist

    return dist.get_backend()


def _rel_l2(a, b) -> float:
    return round(float((a.double() - b.double()).norm() / b.double().norm()), 6)


def _layout_row(layout, ranks: list[dict], spec, steps: int, reference: dict, via_runner: bool = False) -> dict:
    """One layout's figures from every rank's record; the one-GPU layout's (plain engine) become the reference."""
    lead = next(r for r in ranks if r["writes"])
    t = lead["timings_s"]
    step = lead["median_step_s"]
    key, describe = layout_key(layout), layout.describe()
    if via_runner and layout.world_size == 1:
        key, describe = f"{key}-runner", f"{describe} through the parallel runner ({_backend()} world)"
    row = {"layout": key, "describe": describe, "gpus": layout.world_size,
           "median_step_s": step, "encode_text_s": t.get("encode_text"), "denoise_s": t.get("denoise"),
           "decode_s": t.get("decode"), "write_s": t.get("write"), "total_s": t.get("total"),
           "warmup_s": lead["warmup_s"], "tier": lead["tier"], "attention": lead["attention"],
           "attention_shape": lead["attention_shape"]}
    if steps < spec.steps:
        row["projected_total_s"] = round(t["total"] - t["denoise"] + step * spec.steps, 2)
    comm = {}
    for r in ranks:
        for kind, v in r["comm"].items():
            comm[kind] = max(comm.get(kind, 0.0), v["s"])
    row["comm_s_max_rank"] = comm
    row["comm_share_of_denoise"] = round(sum(comm.values()) / t["denoise"], 4) if comm and t.get("denoise") else 0.0
    row["idle_wait_s"] = {r["rank"]: r["wait_after_denoise_s"] for r in ranks if not r["writes"]}
    row["peak_gib_max_rank"] = max((r["peak"].get("gpu_max_allocated_gib") or 0.0) for r in ranks) or None
    row["ranks"] = [{k: r[k] for k in ("rank", "median_step_s", "steps_s", "comm", "peak", "timings_s")}
                    for r in ranks]
    if layout.world_size == 1 and not via_runner and not reference:
        reference.update(step=step, total=row.get("projected_total_s", row["total_s"]),
                         denoise=t["denoise"], first=lead["first_prediction"], latents=lead["latents"])
    if reference:
        row["speedup_step"] = round(reference["step"] / step, 3)
        row["efficiency_step"] = round(row["speedup_step"] / layout.world_size, 3)
        total = row.get("projected_total_s", row["total_s"])
        row["speedup_total"] = round(reference["total"] / total, 3)
        row["efficiency_total"] = round(row["speedup_total"] / layout.world_size, 3)
        row["rel_l2_first_prediction"] = _rel_l2(lead["first_prediction"], reference["first"])
        row["rel_l2_latents"] = _rel_l2(lead["latents"], reference["latents"])
    return row


# -- the report ------------------------------------------------------------------------------------
def shape_summary(data: dict) -> dict:
    out = {"steps": data["steps"], "default_steps": data["default_steps"], "world_size": data["world_size"],
           "layouts": {}}
    for r in data["layouts"]:
        out["layouts"][r["layout"]] = {k: r.get(k) for k in (
            "median_step_s", "total_s", "projected_total_s", "speedup_step", "efficiency_step", "speedup_total",
            "efficiency_total", "comm_share_of_denoise", "rel_l2_first_prediction", "rel_l2_latents")}
    if "2x1" in out["layouts"]:
        out["cfg2_speedup"] = out["layouts"]["2x1"]["speedup_step"]
    return out


def _write(out_dir: Path, data: dict, dev) -> list[Path]:
    """Merge this shape into multigpu-<device>.json (one file holds every shape measured on that device)."""
    import json

    from artifex.bench import report
    from artifex.bench.dit import shape_key

    slug = report.device_slug(dev)
    path = out_dir / f"multigpu-{slug}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    key = shape_key(data["model"], *(int(v) for v in data["size"].split("x")[:2]))
    shapes = {**old.get("shapes", {}), key: data}
    merged = {k: data[k] for k in ("device", "command", "date", "versions")}
    merged["shapes"] = shapes
    merged["summary"] = {k: shape_summary(v) for k, v in shapes.items()}
    files = report.write(out_dir, f"multigpu-{slug}", merged, _markdown(shapes))
    _chart(shapes, out_dir / f"multigpu-{slug}.png")
    return files + [out_dir / f"multigpu-{slug}.png"]


def _markdown(shapes: dict) -> str:
    from artifex.bench import report

    lines = []
    for key, d in shapes.items():
        name = d["device"].get("name") if isinstance(d.get("device"), dict) else d.get("device")
        proj = f" (whole generation projected to {d['default_steps']} steps)" if d["steps"] < d["default_steps"] else ""
        lines.append(f"\n## {key}: {d['model']} {d['size']}, {d['tokens']} tokens, {d['steps']} steps measured{proj}"
                     f" on {name}, world of {d['world_size']}\n\n`{d['command']}` ({d['date']}); config {d['config']};"
                     f" weights: {d['weights']}\n\n")
        rows = [["layout", "GPUs", "s / step", "speedup", "efficiency", "total s", "projected total s",
                 "comm share", "decode s", "idle ranks wait s", "rel L2 first step", "rel L2 latents", "tier"]]
        for r in d["layouts"]:
            rows.append([r["describe"], str(r["gpus"]), str(r["median_step_s"]), str(r.get("speedup_step", "-")),
                         str(r.get("efficiency_step", "-")), str(r["total_s"]), str(r.get("projected_total_s", "-")),
                         str(r["comm_share_of_denoise"]), str(r["decode_s"]),
                         str(list(r["idle_wait_s"].values()) or "-"), str(r.get("rel_l2_first_prediction", "-")),
                         str(r.get("rel_l2_latents", "-")), str(r["tier"])])
        lines.append(report.md_table(rows))
    return "# Multi-GPU layouts\n" + "".join(lines)


def _chart(shapes: dict, path: Path) -> None:
    from artifex.bench import report

    plt = report.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 3.6), squeeze=False)
    for ax, (key, d) in zip(axes[0], shapes.items()):
        rows = d["layouts"]
        bars = ax.bar([r["layout"] for r in rows], [r["median_step_s"] for r in rows], color="tab:blue")
        for bar, r in zip(bars, rows):
            if r.get("efficiency_step") is not None:
                ax.annotate(f"{r['speedup_step']}x / {100 * r['efficiency_step']:.0f}%",
                            (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                            fontsize=7)
        ax.set_title(f"{key} ({d['tokens']} tokens)")
        ax.set_xlabel("layout (cfg x ulysses)")
        ax.set_ylabel("s per denoising step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="torchrun ... -m artifex.bench.multigpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p)
    args = p.parse_args(argv)
    from artifex.env import read_env

    logging.basicConfig(level=read_env().log_level,
                        format=f"[rank {os.environ.get('RANK', '0')}] %(levelname)s %(name)s: %(message)s")
    if "RANK" not in os.environ:
        print("error: start this with artifex bench multigpu (or torchrun)", file=sys.stderr)
        return 2
    try:
        return rank_main(args)
    except InvalidRequestError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
