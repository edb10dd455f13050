"""``artifex bench multigpu``: one model and shape under several parallel layouts, each in its own processes.

    artifex bench multigpu --model t2v-a14b --size 1280x720 --frames 81 --steps 4 --layouts 1x1 2x1 1x2

Layouts are written ``CFGxULYSSES`` (``2x4`` = CFG-parallel 2 x Ulysses 4 on 8 GPUs). The one-GPU
layout, the reference, runs as one plain process (no torch.distributed); every other layout runs
under ``torchrun --standalone`` with one rank per GPU (gloo processes on a CPU), exactly as
``artifex launch`` runs it. Every rank builds the model (random weights at the real shapes, or
``--checkpoint``), runs a warm-up generation (compile and autotune for the layout's shapes), then
the measured whole generation (text, every step, VAE decode split over the ranks, mp4 write by rank 0). Rank 0
records every rank's figures; this command merges them:

- the median denoising step (one step = the DiT forwards of the prompt and the negative prompt,
  however the layout splits them), the stage times, and the projected whole generation at the
  model's default step count when ``--steps`` asks for fewer (said so in the report);
- the time inside the layout's collectives per kind (all-to-all, all-gather, broadcast; CUDA
  events around each call, so waiting for the slowest peer is included), on every rank;
- how long the ranks that do not write wait for rank 0's write (idle ranks);
- the first step's flow prediction and the final latents against the one-GPU layout (rel L2);
- speedup and scaling efficiency (speedup / GPUs) against the one-GPU layout;
- with ``--runner-baseline``, the one-GPU layout once more through the parallel runner in a
  torch.distributed world of one (NCCL on a GPU): what the distribution layer costs on one GPU.

``--layout-timeout S`` stops a layout that runs past S seconds (its Python stacks dumped to
stderr first) and goes on with the next, so one hang cannot take the whole run.

Rank 0 writes ``multigpu-<gpu>.json`` (+ .md, .png); one file holds every shape measured on a
device, each run adding or replacing its shape's entry.
"""

from __future__ import annotations

import argparse
import json
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
                   help="run the one-GPU layout twice: one plain process, then through the parallel runner in a "
                        "torch.distributed world of one (the distribution layer's cost on one GPU)")
    p.add_argument("--layout-timeout", type=float,
                   help="stop a layout's processes after this many seconds (their stacks are dumped first)")
    p.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--append", action="store_true",
                   help="keep the layouts of an earlier run of the same model, size and steps in OUTPUT_DIR's report "
                        "(its one-GPU layout stays the reference for speedups, and for equality where its tensors "
                        "file is in OUTPUT_DIR)")
    p.add_argument("--record", help=argparse.SUPPRESS)  # one layout's processes: where rank 0 writes its record


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
    """``artifex bench multigpu``: check everything, then run each layout as its own process world (the one-GPU
    layout as one plain process, the others under torchrun), merging their records into the report."""
    import torch

    from artifex.bench import report
    from artifex.distributed.groups import pick_backend
    from artifex.models.registry import get_model

    spec = get_model(args.model)
    _shape(spec, args)
    backend = pick_backend(args.backend)
    gpus = torch.cuda.device_count() if backend == "nccl" else None
    layouts = check_layouts(spec, args.layouts, gpus)
    runs = [(lay, False) for lay in layouts]
    if args.runner_baseline:
        runs.insert(1 if layouts[0].world_size == 1 else 0, (parse_layout("1x1"), True))
    print(f"artifex bench multigpu: {', '.join(_run_key(lay, r) for lay, r in runs)} ({backend})", file=sys.stderr)
    dev = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    data = report.header(dev)
    w, h, frames, steps = _shape(spec, args)
    data.update(model=spec.name, size=f"{w}x{h}x{frames}", tokens=spec.tokens(w, h, frames), steps=steps,
                default_steps=spec.steps, warmup_steps=args.warmup_steps, backend=backend, layouts=[])
    reference: dict = {}
    if args.append:
        _keep_previous(args.output_dir / f"multigpu-{report.device_slug(dev)}.json", data,
                       {_run_key(lay, r) for lay, r in runs}, reference, args.output_dir)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="artifex-multigpu-") as work:
        for layout, via_runner in runs:
            key = _run_key(layout, via_runner)
            error = _run_world(args, layout, via_runner, Path(work) / key)
            if error:
                failed += 1
                print(f"artifex bench multigpu: {key}: {error}", file=sys.stderr)
                data["layouts"].append({"layout": key, "describe": layout.describe(), "gpus": layout.world_size,
                                        "error": error})
            else:
                rec = json.loads((Path(work) / key / "record.json").read_text())
                tensors = torch.load(Path(work) / key / "tensors.pt")
                data.update(weights=rec["weights"], config=rec["config"])
                row = _layout_row(layout, rec, tensors, spec, steps, reference, via_runner, data["date"])
                data["layouts"].append(row)
                if row.get("reference_tensors") == data["date"]:  # this run's one-GPU layout: the reference
                    _save_reference(args.output_dir, data, tensors)
                    for kept in data["layouts"][:-1]:  # --append: measured before this reference existed
                        if "error" not in kept and "speedup_step" not in kept:
                            _speedups(kept, reference)
                            kept["equality"] = "not compared: measured in an earlier run than the one-GPU reference"
                    data["layouts"].sort(key=lambda r: r["layout"] != "1x1")  # the reference first, as in one run
            files = _write(args.output_dir, data, dev)  # after every layout: a run cut short keeps what it measured
    print("\n".join(str(f) for f in files))
    return 1 if failed else 0


def _key(data: dict) -> str:
    """The report's key for a run's model and size (``ti2v5b_720p``)."""
    from artifex.bench.dit import shape_key

    return shape_key(data["model"], *(int(v) for v in data["size"].split("x")[:2]))


def _reference_path(output_dir: Path, data: dict) -> Path:
    return Path(output_dir) / f"multigpu-{_key(data)}-reference.pt"


def _save_reference(output_dir: Path, data: dict, tensors: dict) -> None:
    """The one-GPU layout's first prediction and final latents, kept beside the report so that a later
    ``--append`` run (another device call) still compares its layouts for equality. Stored in fp16 (each tensor
    rounded to ~5e-4 relative) to stay small enough to travel back from a device machine."""
    import torch

    out = {k: tensors[k].to(torch.float16) for k in _TENSORS}
    out.update(model=data["model"], size=data["size"], steps=data["steps"], date=data["date"])
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    torch.save(out, _reference_path(output_dir, data))


def _keep_previous(path: Path, data: dict, replaced: set[str], reference: dict, output_dir: Path) -> None:
    """``--append``: the layouts an earlier run measured for the same model, size and steps stay (this run's
    replace those of the same name); its one-GPU times become the reference, and its tensors too where the
    reference file that run saved is in ``output_dir`` (else layouts measured now are not compared for
    equality)."""
    if not path.exists():
        return
    import torch

    old = json.loads(path.read_text()).get("shapes", {}).get(_key(data))
    if not old or (old["size"], old["steps"]) != (data["size"], data["steps"]):
        return
    data["layouts"] = [r for r in old["layouts"] if r["layout"] not in replaced]
    data["appended_to"] = {"command": old["command"], "date": old["date"]}
    one = next((r for r in data["layouts"] if r["layout"] == "1x1" and "error" not in r), None)
    if one is None:
        return
    reference.update(step=one["median_step_s"], total=one.get("projected_total_s", one["total_s"]),
                     denoise=one["denoise_s"], first=None, latents=None)
    saved = _reference_path(output_dir, data)
    if one.get("reference_tensors") and saved.exists():
        ref = torch.load(saved)
        if (ref["model"], ref["size"], ref["steps"], ref["date"]) == (data["model"], data["size"], data["steps"],
                                                                       one["reference_tensors"]):
            reference.update(first=ref["first_prediction"].float(), latents=ref["latents"].float(),
                             stored="fp16")


def _run_key(layout, via_runner: bool) -> str:
    return f"{layout_key(layout)}-runner" if via_runner else layout_key(layout)


def _run_world(args, layout, via_runner: bool, record_dir: Path) -> str | None:
    """Run one layout in its own processes; None when it finished, else what went wrong. With --layout-timeout
    the processes are stopped (their Python stacks dumped to stderr first) when they run past it."""
    import signal
    import subprocess

    flags = rank_argv(args, layout_key(layout)) + ["--record", str(record_dir)]
    if layout.world_size == 1 and not via_runner:  # the reference: one plain process, no torch.distributed
        cmd = [sys.executable, "-m", "artifex.bench.multigpu", *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={layout.world_size}", "-m", "artifex.bench.multigpu", *flags]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if args.layout_timeout:
        env["ARTIFEX_BENCH_DUMP_STACKS_S"] = str(max(args.layout_timeout - 15, 1))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=args.layout_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its ranks: nothing may keep holding the GPUs
        proc.wait()
        return f"stopped after --layout-timeout {args.layout_timeout} s (stacks dumped above)"
    if rc != 0:
        return f"exited with status {rc}"
    return None


def rank_argv(args: argparse.Namespace, layout: str) -> list[str]:
    """A layout's command line: the same flags, one layout."""
    argv = ["--layouts", layout]
    for flag in ("model", "size", "frames", "steps", "warmup_steps", "precision", "compile", "fp8", "checkpoint",
                 "backend"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    return argv


# -- one layout's processes -----------------------------------------------------------------------
def layout_main(args: argparse.Namespace) -> int:
    """One layout in this process world: every rank builds the model, warms up and generates; rank 0 writes the
    ranks' records to ``--record``."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from artifex.config import OptimizationConfig
    from artifex.distributed.commtime import CommTimer
    from artifex.distributed.executor import parallelize
    from artifex.distributed.groups import build_groups, init_distributed
    from artifex.engine.executor import LocalExecutor
    from artifex.engine.pipeline import Engine
    from artifex.models.registry import get_model

    if os.environ.get("ARTIFEX_BENCH_DUMP_STACKS_S"):  # a layout that hangs says where, before it is stopped
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["ARTIFEX_BENCH_DUMP_STACKS_S"]), exit=False)
    spec = get_model(args.model)
    w, h, frames, steps = _shape(spec, args)
    layout = check_layouts(spec, args.layouts, None)[0]
    parallel = "RANK" in os.environ
    control = None
    if parallel:
        backend, device = init_distributed(args.backend)
        control = dist.new_group(backend="gloo", timeout=timedelta(hours=2))  # records and waits, on the CPU
        groups = build_groups(layout)
    else:
        backend, device = "none", _plain_device(args.backend)
    dev = torch.device(device)
    try:
        t = time.perf_counter()
        components, weights = _components(spec, args, dev)
        compile_blocks = dev.type == "cuda" if args.compile is None else args.compile == "on"
        config = OptimizationConfig(device=device, precision=args.precision, use_torch_compile=compile_blocks,
                                    max_batch_size=2, vae_precision="bf16", fp8=args.fp8)
        engine = Engine.from_components(spec, components, config)
        build_s = time.perf_counter() - t
        timer = CommTimer(dev)
        executor = parallelize(engine, groups, timer=timer) if parallel else LocalExecutor(engine)
        barrier = (lambda: dist.barrier(group=control)) if parallel else (lambda: None)
        with tempfile.TemporaryDirectory(prefix="artifex-multigpu-videos-") as videos:
            mine = _run_layout(engine, executor, spec, w, h, frames, steps, args.warmup_steps, timer, dev,
                               Path(videos), barrier)
            t = time.perf_counter()
            barrier()  # the ranks that did not decode wait here for rank 0's decode and write
            mine["wait_after_denoise_s"] = round(time.perf_counter() - t, 3)
        ranks = [mine]
        if parallel:
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, {k: v for k, v in mine.items() if k not in _TENSORS}, group=control)
        if mine["writes"]:
            out = Path(args.record)
            out.mkdir(parents=True, exist_ok=True)
            torch.save({k: mine[k] for k in _TENSORS}, out / "tensors.pt")
            record = {"ranks": [{k: v for k, v in r.items() if k not in _TENSORS} for r in ranks],
                      "weights": weights, "backend": backend, "build_s": round(build_s, 1),
                      "config": {"precision": args.precision, "compile": compile_blocks, "fp8": args.fp8,
                                 "cfg_batch": engine.plan.cfg_batch}}
            (out / "record.json").write_text(json.dumps(record, indent=1, default=str))
        if parallel:
            dist.barrier(group=control)
    finally:
        if parallel:
            dist.destroy_process_group()
    return 0


_TENSORS = ("first_prediction", "latents")


def _plain_device(backend: str) -> str:
    """The one-process reference's device: the first GPU, unless gloo (CPU) was asked for."""
    import torch

    return "cuda:0" if backend != "gloo" and torch.cuda.is_available() else "cpu"


def _components(spec, args, dev):
    if args.checkpoint:
        from artifex.env import read_env
        from artifex.models.loader import load_components, resolve_checkpoint

        return load_components(spec, resolve_checkpoint(spec, args.checkpoint, read_env().home),
                               args.precision), str(args.checkpoint)
    from artifex.models.random_init import random_components

    return random_components(spec, args.precision, build_device=dev), "random (real shapes)"


def _run_layout(engine, executor, spec, w, h, frames, steps, warmup_steps, timer, dev, work: Path, barrier) -> dict:
    """This rank's part of one layout: a warm-up generation, then the measured one. ``barrier`` waits for the
    layout's ranks (rank 0 decodes the warm-up video while the others would already start the measured run)."""
    import dataclasses

    import torch

    from artifex.engine.request import GenerationRequest

    generate = executor.generate
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

    layout, first = engine.layout, []
    predict = layout.predict or engine.guided

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

    engine.layout = dataclasses.replace(layout, predict=capture)
    try:
        sync()
        result = generate(request(steps, "run"), on_event=on_event)
    finally:
        engine.layout = layout
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

    return dist.get_rank() if dist.is_initialized() else 0


def _rel_l2(a, b) -> float:
    return round(float((a.double() - b.double()).norm() / b.double().norm()), 6)


def _speedups(row: dict, reference: dict) -> None:
    row["speedup_step"] = round(reference["step"] / row["median_step_s"], 3)
    row["efficiency_step"] = round(row["speedup_step"] / row["gpus"], 3)
    row["speedup_total"] = round(reference["total"] / row.get("projected_total_s", row["total_s"]), 3)
    row["efficiency_total"] = round(row["speedup_total"] / row["gpus"], 3)


def _layout_row(layout, record: dict, tensors: dict, spec, steps: int, reference: dict,
                via_runner: bool = False, date: str | None = None) -> dict:
    """One layout's figures from every rank's record (and rank 0's first prediction and final latents); the
    one-GPU layout's (one plain process) become the reference."""
    ranks = record["ranks"]
    lead = next(r for r in ranks if r["writes"])
    t = lead["timings_s"]
    step = lead["median_step_s"]
    key, describe = _run_key(layout, via_runner), layout.describe()
    if via_runner:
        describe += f" through the parallel runner (a {record['backend']} world of {layout.world_size})"
    row = {"layout": key, "describe": describe, "gpus": layout.world_size, "backend": record["backend"],
           "build_s": record["build_s"],
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
                         denoise=t["denoise"], first=tensors["first_prediction"], latents=tensors["latents"])
        row["reference_tensors"] = date  # command() saves them beside the report, found again by this date
    if reference:
        _speedups(row, reference)
        if reference["latents"] is not None:
            row["rel_l2_first_prediction"] = _rel_l2(tensors["first_prediction"], reference["first"])
            row["rel_l2_latents"] = _rel_l2(tensors["latents"], reference["latents"])
            if reference.get("stored"):
                row["equality"] = ("against the one-GPU tensors of an earlier run, kept in fp16 "
                                   "(adds up to ~5e-4 to the rel L2)")
        else:
            row["equality"] = "not compared: the one-GPU reference was measured in an earlier run (--append)"
    return row


# -- the report ------------------------------------------------------------------------------------
def shape_summary(data: dict) -> dict:
    out = {"steps": data["steps"], "default_steps": data["default_steps"],
           "gpus": max((r["gpus"] for r in data["layouts"]), default=0), "layouts": {}}
    for r in data["layouts"]:
        out["layouts"][r["layout"]] = {k: r[k] for k in (
            "error", "median_step_s", "total_s", "projected_total_s", "speedup_step", "efficiency_step",
            "speedup_total", "efficiency_total", "comm_share_of_denoise", "rel_l2_first_prediction",
            "rel_l2_latents") if k in r}
    if "2x1" in out["layouts"]:
        out["cfg2_speedup"] = out["layouts"]["2x1"].get("speedup_step")
    return out


def _write(out_dir: Path, data: dict, dev) -> list[Path]:
    """Merge this shape into multigpu-<device>.json (one file holds every shape measured on that device)."""
    from artifex.bench import report

    slug = report.device_slug(dev)
    path = out_dir / f"multigpu-{slug}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    shapes = {**old.get("shapes", {}), _key(data): data}
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
                     f" on {name}\n\n`{d['command']}` ({d['date']}); config {d.get('config')};"
                     f" weights: {d.get('weights')}\n\n")
        rows = [["layout", "GPUs", "s / step", "speedup", "efficiency", "total s", "projected total s",
                 "comm share", "decode s", "idle ranks wait s", "rel L2 first step", "rel L2 latents", "tier"]]
        for r in d["layouts"]:
            if "error" in r:
                rows.append([r["describe"], str(r["gpus"]), f"failed: {r['error']}"] + ["-"] * 10)
                continue
            rows.append([r["describe"], str(r["gpus"]), str(r["median_step_s"]), str(r.get("speedup_step", "-")),
                         str(r.get("efficiency_step", "-")), str(r["total_s"]), str(r.get("projected_total_s", "-")),
                         str(r["comm_share_of_denoise"]), str(r["decode_s"]),
                         str(list(r["idle_wait_s"].values()) or "-"), str(r.get("rel_l2_first_prediction", "-")),
                         str(r.get("rel_l2_latents", "-")), str(r["tier"])])
        lines.append(report.md_table(rows))
        if d.get("appended_to"):
            one = next((r for r in d["layouts"] if r["layout"] == "1x1" and "error" not in r), {})
            whose = "the one-GPU layout above (this run) is their reference" if one.get("reference_tensors") == \
                d["date"] else "its one-GPU layout is the reference"
            lines.append(f"\nLayouts not measured by the command above come from `{d['appended_to']['command']}` "
                         f"({d['appended_to']['date']}); {whose}.\n")
        if d.get("note"):
            lines.append(f"\n{d['note']}\n")
        lines += [f"\n{r['layout']}: {r['equality']}\n" for r in d["layouts"] if r.get("equality")]
    return "# Multi-GPU layouts\n" + "".join(lines)


def _chart(shapes: dict, path: Path) -> None:
    from artifex.bench import report

    plt = report.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 3.6), squeeze=False)
    for ax, (key, d) in zip(axes[0], shapes.items()):
        rows = [r for r in d["layouts"] if "error" not in r]
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
    if not args.record or not args.layouts or len(args.layouts) != 1:
        print("error: this module runs one layout for artifex bench multigpu (--layouts CxU --record DIR)",
              file=sys.stderr)
        return 2
    try:
        return layout_main(args)
    except InvalidRequestError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
