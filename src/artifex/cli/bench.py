"""``artifex bench attention | memory | dit | pipeline | multigpu``: the benchmarks (run them on the GPU)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from artifex.bench import DIT_ABLATIONS, DIT_VARIANTS, FEWSTEP_CASES, FEWSTEP_CONFIGS, PIPELINE_CONFIGS, multigpu
from artifex.cli.common import shape_of, size_arg, table
from artifex.errors import InvalidRequestError


def add_commands(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (run them on the GPU)")
    bsub = bench.add_subparsers(dest="bench", required=True)
    ba = bsub.add_parser("attention", help="every attention backend at the Wan shapes")
    ba.add_argument("--shape", action="append", default=[], help="extra shape NAME=BxLxHxD (repeatable)")
    ba.add_argument("--only-shapes", action="store_true", help="skip the built-in Wan shapes")
    ba.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ba.add_argument("--iters", type=int, default=30)
    ba.add_argument("--warmup", type=int, default=10)
    ba.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    ba.add_argument("--no-processor-check", action="store_true")
    ba.set_defaults(func=cmd_bench_attention)
    bm = bsub.add_parser("memory", help="whole generations under VRAM budgets, random weights at real shapes (GPU)")
    bm.add_argument("--model", default="ti2v-5b")
    bm.add_argument("--budgets", default="none,24GB", help="comma-separated; none = the whole GPU")
    bm.add_argument("--size", type=size_arg)
    bm.add_argument("--frames", type=int)
    bm.add_argument("--steps", type=int)
    bm.add_argument("--diffusers-steps", type=int, default=0,
                    help="also measure diffusers' default WanPipeline peak with this many steps")
    bm.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    bm.set_defaults(func=cmd_bench_memory)

    bd = bsub.add_parser("dit", help="one DiT forward at a real shape: diffusers vs Artifex bf16 and fp8 (GPU)")
    bd.add_argument("--model", default="ti2v-5b", help="ti2v-5b, t2v-a14b (one expert), or a tiny model on CPU")
    bd.add_argument("--size", type=size_arg, help="WIDTHxHEIGHT (default: the model's first trained size)")
    bd.add_argument("--frames", type=int, help="4n+1 (default: the model's)")
    bd.add_argument("--variants", nargs="+", default=list(DIT_VARIANTS), choices=DIT_VARIANTS + DIT_ABLATIONS,
                    help="what to run (default: %(default)s); the ablations switch one Artifex change off")
    bd.add_argument("--profile", action="store_true",
                    help="profile one forward per variant: kernel time by category and the top kernels")
    bd.add_argument("--fp32-reference", action="store_true",
                    help="also compare every variant with an fp32 forward (needs memory for an fp32 copy)")
    bd.add_argument("--warmup", type=int, default=3)
    bd.add_argument("--iters", type=int, default=10)
    bd.add_argument("--compile", choices=["on", "off"], help="compile the blocks (default: on with CUDA)")
    bd.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    bd.set_defaults(func=cmd_bench_dit)

    bp = bsub.add_parser("pipeline", help="the whole generation (text, denoise, VAE, mp4): diffusers' WanPipeline "
                         "vs Artifex, per-stage time and peak memory (GPU)")
    bp.add_argument("--model", default="ti2v-5b")
    bp.add_argument("--configs", nargs="+", default=["bf16", "fp8"], choices=list(PIPELINE_CONFIGS),
                    help="Artifex runs: bf16 (compiled, CFG in two passes, bf16 VAE), fp8 (the same + fp8=all), "
                         "default (OptimizationConfig's defaults)")
    bp.add_argument("--diffusers", default="full", choices=["full", "forwards", "off"],
                    help="full: diffusers' whole run; forwards: 3 steps, denoise estimated x steps; off")
    bp.add_argument("--steps", type=int)
    bp.add_argument("--size", type=size_arg)
    bp.add_argument("--frames", type=int)
    bp.add_argument("--checkpoint", help="real weights (directory or hub id); default: random weights at real shapes")
    bp.add_argument("--profile", type=Path, help="write a torch.profiler Chrome trace of a 2-step generation here")
    bp.add_argument("--keep-videos", action="store_true",
                    help="keep the mp4s in OUTPUT_DIR/pipeline-videos (default: written to a temporary folder)")
    bp.add_argument("--append", action="store_true",
                    help="add these runs to an existing pipeline-<gpu>.json of the same settings (split long runs)")
    u = bp.add_argument_group("the user's path")
    u.add_argument("--user-path", action="store_true",
                   help="first run `artifex generate` as a child process on a checkpoint directory (--checkpoint "
                        "DIR, else random weights saved with diffusers' save_pretrained), once per --user-budgets, "
                        "and a repeated prompt in `artifex batch`; read their sidecars (process wall, stages); then "
                        "diffusers' WanPipeline.from_pretrained + one call on the same directory (not with "
                        "--diffusers off)")
    u.add_argument("--user-budgets", default="none,24GB",
                   help="comma-separated --vram-budget values of the generate runs; none = no flag (default: "
                        "%(default)s)")
    u.add_argument("--save-checkpoint", type=Path,
                   help="keep the random-weights checkpoint in this directory (default: a temporary one, removed)")
    u.add_argument("--only-user-path", action="store_true",
                   help="skip the in-memory runs (with --user-path); the report is then ttv-<gpu>.json")
    u.add_argument("--user-prime-steps", type=int, default=0, metavar="N",
                   help="first a generate run of N steps, reported as the machine's first (empty attention and "
                        "kernel caches), so that the runs after it see what later runs see (default: none)")
    u.add_argument("--user-flags", action="append", default=[], metavar="FLAGS",
                   help="one more generate run with these flags (quoted, e.g. \"--fp8 all\"; a word NAME=value "
                        "sets that variable for the run, e.g. \"ARTIFEX_DECODE_WARM_UP=off\"); repeatable")
    u.add_argument("--user-loads", action="store_true",
                   help="loading alone (1 step, 5 frames): page cache warm with diffusers' shard threads off and "
                        "on, dropped first with the prefetch off and on, and diffusers' cold from_pretrained")
    u.add_argument("--no-user-repeat", action="store_true", help="skip the repeated-prompt batch run")
    u.add_argument("--user-server", action="store_true",
                   help="`artifex serve` on the checkpoint: time to /readyz (load, warm-up) and its first job")
    bp.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    bp.set_defaults(func=cmd_bench_pipeline)

    bf = bsub.add_parser("fewstep", help="a distilled few-step generation end to end with a LoRA fused (FastWan "
                         "TI2V-5B 3 steps, Lightning I2V-A14B 4 steps): diffusers vs Artifex (GPU)")
    bf.add_argument("--cases", nargs="+", default=["ti2v5b_720p_3step", "i2v_a14b_720p_4step"],
                    choices=list(FEWSTEP_CASES), help="what to run (default: %(default)s); the tiny_* cases check "
                    "the benchmark on a CPU; cases run in separate calls are merged into one fewstep-<gpu>.json")
    bf.add_argument("--configs", nargs="+", default=["bf16", "fp8"], choices=list(FEWSTEP_CONFIGS),
                    help="Artifex runs: bf16 (bf16 VAE), fp8 (+ fp8=all); the LoRA is fused in the first")
    bf.add_argument("--diffusers", default="on", choices=["on", "off"], help="diffusers' run with the LoRA fused")
    bf.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    bf.set_defaults(func=cmd_bench_fewstep)

    bs = bsub.add_parser("s2v", help="S2V-14B at a real shape, random weights: one DiT forward (DiffSynth's "
                         "reference, the model's own forward, Artifex bf16 and fp8) and one clip end to end (GPU)")
    bs.add_argument("--model", default="s2v-14b", help="s2v-14b, or tiny-s2v to check the benchmark on a CPU")
    bs.add_argument("--parts", nargs="+", default=["forward", "clip"], choices=["forward", "clip"],
                    help="what to run; parts run in separate calls are merged into one s2v-<gpu>.json")
    bs.add_argument("--size", type=size_arg, help="WIDTHxHEIGHT (default: the model's first size, 1024x704)")
    bs.add_argument("--steps", type=int, help="the clip's steps (default: the model's, 40)")
    bs.add_argument("--clip-fp8", default="off", choices=["off", "gemm", "all"], help="fp8 for the clip run")
    bs.add_argument("--no-reference", action="store_true", help="skip DiffSynth's WanS2VModel row")
    bs.add_argument("--warmup", type=int, default=1)
    bs.add_argument("--iters", type=int, default=3)
    bs.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    bs.set_defaults(func=cmd_bench_s2v)

    bg = bsub.add_parser("multigpu", help="one model and shape under parallel layouts (1 GPU, CFG-parallel, "
                         "Ulysses, both): step and whole-generation time, scaling, collectives, equality (GPUs)",
                         description=multigpu.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    multigpu.add_flags(bg)
    bg.set_defaults(func=multigpu.command)


def cmd_bench_attention(args: argparse.Namespace) -> int:
    from artifex.bench import attention

    shapes = {} if args.only_shapes else dict(attention.WAN_SHAPES)
    for text in args.shape:
        try:
            name, shape = attention.parse_shape(text)
        except ValueError as e:
            raise InvalidRequestError("shape", str(e)) from None
        shapes[name] = shape
    if not shapes:
        raise InvalidRequestError("shape", "no shapes to run: give --shape or drop --only-shapes")
    data = attention.run(shapes, args.dtype, args.output_dir, args.warmup, args.iters,
                         processor=not args.no_processor_check)
    s = data["summary"]
    for name in shapes:
        print(f"{name}: auto -> {s['auto_backend'][name]} {s['auto_tflops'][name]} TFLOP/s; best "
              f"{s['best_backend'][name]} {s['best_tflops'][name]}; default SDPA {s['sdpa_default_tflops'][name]}")
    print("\n".join(data.get("files", [])))
    return 0


def cmd_bench_memory(args: argparse.Namespace) -> int:
    import torch

    from artifex.bench import memory
    from artifex.engine.memory import parse_budget

    if not torch.cuda.is_available():
        raise InvalidRequestError("device", "artifex bench memory measures GPU memory; no CUDA GPU is visible")
    budgets = [None if b == "none" else b for b in args.budgets.split(",")]
    for b in budgets:
        parse_budget(b)
    w, h = args.size or (None, None)
    data = memory.generation_runs(args.model, budgets, args.steps, w, h, args.frames, args.output_dir,
                                  args.diffusers_steps)  # also rewrites memory-<gpu>.json
    print(json.dumps(data["summary"], indent=2))
    return 0


def cmd_bench_dit(args: argparse.Namespace) -> int:
    from artifex.bench import dit

    w, h, frames = shape_of(args)
    data = dit.run(args.model, w, h, frames, args.output_dir, args.warmup, args.iters, tuple(args.variants),
                   compile_blocks=None if args.compile is None else args.compile == "on", profile=args.profile,
                   fp32_reference=args.fp32_reference)
    table([("variant", "s/forward", "TFLOP/s", "% peak", "peak GiB", "rel L2")] + [
        (r["variant"], str(r.get("s_per_forward", "-")), str(r.get("tflops", "-")), str(r.get("pct_matmul_peak", "-")),
         str(r.get("peak_gib", "-")), str(r.get("rel_l2", r.get("note", "")))) for r in data["rows"]])
    print(json.dumps(data["summary"], indent=2))
    print("\n".join(data.get("files", [])))
    return 0


def cmd_bench_fewstep(args: argparse.Namespace) -> int:
    from artifex.bench import fewstep

    data = fewstep.run(args.cases, args.output_dir, args.configs, diffusers=args.diffusers == "on")
    print(json.dumps(data["summary"], indent=2))
    print("\n".join(data.get("files", [])))
    return 0


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    from artifex.bench import pipeline
    from artifex.engine.memory import parse_budget

    w, h, frames = shape_of(args)
    budgets = [None if b.strip().lower() == "none" else b.strip() for b in args.user_budgets.split(",") if b.strip()]
    for b in budgets:
        parse_budget(b)
    user_options = (args.only_user_path, args.save_checkpoint, args.user_prime_steps, args.user_flags,
                    args.user_loads, args.no_user_repeat, args.user_server)
    if any(user_options) and not args.user_path:
        raise InvalidRequestError("user_path", "--only-user-path, --save-checkpoint and the --user-* flags go "
                                               "with --user-path")
    if args.user_prime_steps < 0:
        raise InvalidRequestError("user_prime_steps", f"is {args.user_prime_steps}", "0 or more")
    runs = pipeline.UserPathRuns(budgets=tuple(budgets), prime_steps=args.user_prime_steps,
                                 flags=tuple(tuple(shlex.split(f)) for f in args.user_flags),
                                 loads=args.user_loads, repeat=not args.no_user_repeat, server=args.user_server)
    if args.save_checkpoint and args.checkpoint:
        raise InvalidRequestError("save_checkpoint", "saves random weights; --checkpoint already names a directory")
    data = pipeline.run(args.model, args.output_dir, args.configs, args.diffusers, args.steps, w, h, frames,
                        args.checkpoint, args.profile, append=args.append, keep_videos=args.keep_videos,
                        user=args.user_path, save_checkpoint=args.save_checkpoint, user_runs=runs,
                        in_memory=not args.only_user_path)
    print(json.dumps(data["summary"], indent=2))
    print("\n".join(data.get("files", [])))
    failed = (data.get("user_path") or {}).get("errors", [])
    for e in failed:
        print(f"failed: {e['run']}: {e['error'][-500:]}", file=sys.stderr)
    return 1 if failed else 0


def cmd_bench_s2v(args: argparse.Namespace) -> int:
    from artifex.bench import s2v

    data = s2v.run(args.output_dir, args.model, tuple(args.parts), args.size, args.warmup, args.iters, args.steps,
                   args.clip_fp8, not args.no_reference)
    print(json.dumps(data["summary"], indent=2))
    print("\n".join(data.get("files", [])))
    return 0
