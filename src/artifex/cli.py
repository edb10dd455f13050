"""The ``artifex`` command: generate, demo, models, presets, plan, doctor, bench (and serve, monitor).

The CLI only builds a ``GenerationRequest`` and an ``OptimizationConfig`` and hands them
to the engine; it knows nothing about how generation works.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from artifex import __version__
from artifex.bench import DIT_ABLATIONS, DIT_VARIANTS, PIPELINE_CONFIGS, multigpu
from artifex.config import OptimizationConfig
from artifex.env import VARIABLES, read_env
from artifex.errors import ArtifexError, InvalidRequestError
from artifex.models.registry import MODELS, get_model
from artifex.presets import PRESETS, get_preset, pick_size

log = logging.getLogger("artifex")

DEMO_PROMPT = "a red kite flying over a golden beach at sunset, slow motion, cinematic"


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like WIDTHxHEIGHT (e.g. 1280x704), got {text!r}") from None


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimization (OptimizationConfig; also settable in a TOML file with --config)")
    g.add_argument("--config", type=Path, help="TOML file of OptimizationConfig fields")
    for name, (default, help_text, choices, kind) in OptimizationConfig.field_help().items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            g.add_argument(flag, dest=f"opt_{name}", action=argparse.BooleanOptionalAction, default=None,
                           help=f"{help_text} (default: {default})")
        else:
            g.add_argument(flag, dest=f"opt_{name}", type=kind, default=None, choices=choices,
                           help=f"{help_text} (default: {default})")


def build_config(args: argparse.Namespace, preset: str | None = None) -> OptimizationConfig:
    """defaults < preset optimizations < $ARTIFEX_CONFIG < --config < flags."""
    config = OptimizationConfig()
    if preset:
        config = config.merged(get_preset(preset).optimizations)
    env = read_env()
    if env.config:
        config = OptimizationConfig.from_toml(env.config, config)
    if getattr(args, "config", None):
        config = OptimizationConfig.from_toml(args.config, config)
    flags = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    return config.merged(flags)


def _progress_printer():
    """A tqdm bar over the denoising steps, and one line per other stage."""
    from tqdm import tqdm

    state: dict = {}

    def on_event(e) -> None:
        if e.stage == "denoise":
            bar = state.get("bar")
            if bar is None:
                bar = state["bar"] = tqdm(total=e.total, desc="denoise", unit="step", file=sys.stderr)
            bar.update(e.step - bar.n)
            bar.set_postfix(expert="high" if e.expert == 0 else "low", t=f"{e.timestep:.0f}", refresh=False)
            if e.step == e.total:
                bar.close()
        elif e.stage != "done":
            print(f"[{e.elapsed_s:7.2f}s] {e.stage}", file=sys.stderr)

    return on_event


def cmd_generate(args: argparse.Namespace) -> int:
    from artifex.engine.pipeline import Engine
    from artifex.engine.request import GenerationRequest

    width, height = args.size if args.size else (None, None)
    request = GenerationRequest(
        model=args.model, prompt=args.prompt, negative_prompt=args.negative_prompt, image=args.image,
        width=width, height=height, frames=args.frames, steps=args.steps, guidance=args.guidance,
        guidance_low=args.guidance_low, shift=args.shift, seed=args.seed, preset=args.preset,
        output=str(args.output) if args.output else None,
    )
    # Check the request before spending time on loading weights.
    from artifex.engine.request import resolve_request

    resolve_request(request)
    config = build_config(args, args.preset)
    print(f"loading {args.model} ...", file=sys.stderr)
    engine = Engine.load(args.model, checkpoint=args.checkpoint, config=config,
                         single_files={"transformer": args.transformer_file, "transformer_2": args.transformer_2_file,
                                       "vae": args.vae_file})
    result = engine.generate(request, on_event=_progress_printer(), output_dir=args.output_dir)
    _report(result)
    return 0


def _report(result) -> None:
    t = result.timings
    s = result.settings
    print(f"{s.model}: {s.width}x{s.height}, {s.frames} frames, {s.steps} steps, seed {s.seed}; "
          f"denoise {t['denoise']:.2f}s, decode {t['decode']:.2f}s, total {t['total']:.2f}s", file=sys.stderr)
    if result.switch_step is not None:
        print(f"experts: high-noise for steps 0-{result.switch_step - 1}, low-noise from step {result.switch_step}",
              file=sys.stderr)
    print(f"sidecar: {result.sidecar_path}", file=sys.stderr)
    print(result.video_path)


def cmd_demo(args: argparse.Namespace) -> int:
    from artifex.engine.pipeline import Engine
    from artifex.engine.request import GenerationRequest

    output = args.output or read_env().output_dir / "demo.mp4"
    print(f"artifex demo: {args.model} (random tiny weights, built offline) on this machine", file=sys.stderr)
    engine = Engine.load(args.model, config=build_config(args))
    spec = engine.spec
    request = GenerationRequest(model=spec.name, prompt=args.prompt, seed=args.seed, frames=args.frames,
                                output=str(output))
    result = engine.generate(request, on_event=_progress_printer())
    _report(result)
    print(f"demo video written to {Path(result.video_path).resolve()}", file=sys.stderr)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from artifex.doctor import diagnose, render

    report = diagnose(args.dtype, run_verification=not args.no_verify)
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
    return 0


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


def _bench_shape(args: argparse.Namespace) -> tuple[int, int, int]:
    """A benchmark's (width, height, frames): the flags, else the model's defaults; checked like a request."""
    from artifex.engine.request import check_frames, check_size

    spec = get_model(args.model)
    w, h = args.size or spec.sizes[0]
    frames = args.frames or spec.frames
    for warning in check_size(spec, w, h):
        print(f"warning: {warning}")
    check_frames(spec, frames)
    return w, h, frames


def cmd_bench_dit(args: argparse.Namespace) -> int:
    from artifex.bench import dit

    w, h, frames = _bench_shape(args)
    data = dit.run(args.model, w, h, frames, args.output_dir, args.warmup, args.iters, tuple(args.variants),
                   compile_blocks=None if args.compile is None else args.compile == "on", profile=args.profile,
                   fp32_reference=args.fp32_reference)
    _table([("variant", "s/forward", "TFLOP/s", "% peak", "peak GiB", "rel L2")] + [
        (r["variant"], str(r.get("s_per_forward", "-")), str(r.get("tflops", "-")), str(r.get("pct_matmul_peak", "-")),
         str(r.get("peak_gib", "-")), str(r.get("rel_l2", r.get("note", "")))) for r in data["rows"]])
    print(json.dumps(data["summary"], indent=2))
    print("\n".join(data.get("files", [])))
    return 0


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    from artifex.bench import pipeline

    w, h, frames = _bench_shape(args)
    data = pipeline.run(args.model, args.output_dir, args.configs, args.diffusers, args.steps, w, h, frames,
                        args.checkpoint, args.profile, append=args.append, keep_videos=args.keep_videos)
    print(json.dumps(data["summary"], indent=2))
    print("\n".join(data.get("files", [])))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from artifex.engine.memory import GIB, HEADROOM, fits, parse_budget, plan_memory, weights_of
    from artifex.engine.request import check_frames, check_size
    from artifex.models.configs import meta_components

    spec = get_model(args.model)
    width, height = args.size or spec.sizes[0]
    frames = args.frames or spec.frames
    check_size(spec, width, height)
    check_frames(spec, frames)
    budget = parse_budget(args.vram_budget)
    weights = weights_of(*meta_components(spec, args.precision), fp8_weights=args.fp8_weights)
    chosen, error, tiled = None, None, args.vae_tiling
    try:
        chosen, tiled, ests, _ = plan_memory(spec, weights, width, height, frames, args.cfg_batch, args.vae_tiling,
                                             "artifex", budget, vae_precision=args.vae_precision)
    except InvalidRequestError as e:
        error = str(e)
        ests = plan_memory(spec, weights, width, height, frames, args.cfg_batch, True, "artifex", None,
                           vae_precision=args.vae_precision)[2]
        tiled = True
    chosen = chosen if budget is not None else None
    if args.json:
        print(json.dumps({"model": spec.name, "size": [width, height], "frames": frames, "budget_gib":
                          budget / GIB if budget else None, "chosen": chosen, "vae_tiling": tiled, "error": error,
                          "tiers": [e.to_dict() for e in ests]}, indent=2))
    else:
        print(f"{spec.name} {width}x{height}x{frames}, {args.precision}"
              f"{', fp8 weights' if args.fp8_weights else ''}{', VAE tiled' if tiled else ''}; "
              f"weights: text encoder {weights.text_encoder / GIB:.1f} GiB, VAE {weights.vae / GIB:.1f} GiB, "
              f"experts {' + '.join(f'{x / GIB:.1f}' for x in weights.experts)} GiB")
        rows = [("tier", "peak GiB", "encode_text", "denoise", "decode", "fits" if budget else "")]
        for e in ests:
            g = e.to_dict()["stages_gib"]
            mark = "" if budget is None else ("<- auto" if e.tier == chosen else ("yes" if fits(e.peak_bytes, budget)
                                                                                   else "no"))
            rows.append((e.tier, f"{e.peak_gib:.1f}", f"{g['encode_text']:.1f}", f"{g['denoise']:.1f}",
                         f"{g['decode']:.1f}", mark))
        _table(rows)
        if budget is not None:
            print(f"fits: predicted peak at most {HEADROOM:.0%} of the budget (room for fragmentation under the cap)")
        if error:
            print(f"error: {error}", file=sys.stderr)
    return 2 if error else 0


def cmd_models(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps({n: s.summary() for n, s in MODELS.items()}, indent=2))
        return 0
    rows = [("model", "task", "experts", "steps", "shift", "guidance", "boundary", "fps", "frames", "sizes (WxH)",
             "checkpoint")]
    for s in MODELS.values():
        rows.append((
            s.name, s.task + ("" if s.runnable else " (spec only)"), str(s.experts), str(s.steps), f"{s.shift:g}",
            "/".join(f"{g:g}" for g in s.guidance), f"{s.boundary:g}" if s.boundary else "-", str(s.fps),
            str(s.frames), " ".join(f"{w}x{h}" for w, h in s.sizes),
            s.hub_id or ("built-in tiny" if s.tiny else "-"),
        ))
    _table(rows)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    specs = [get_model(args.model)] if args.model else [m for m in MODELS.values() if m.runnable]
    rows = [("model", "preset", "steps", "size", "frames", "guidance", "optimizations", "description")]
    for spec in specs:
        for p in PRESETS.values():
            w, h = pick_size(spec, p.size)
            opts = ", ".join(f"{k}={v}" for k, v in p.optimizations.items()) or "-"
            rows.append((spec.name, p.name, str(p.steps(spec)), f"{w}x{h}", str(p.num_frames(spec)),
                         "/".join(f"{g:g}" for g in spec.guidance), opts, p.description))
    _table(rows)
    return 0


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))


def build_parser() -> argparse.ArgumentParser:
    env_help = "\n".join(f"  {k}: {v}" for k, v in VARIABLES.items())
    parser = argparse.ArgumentParser(
        prog="artifex", description="Fast inference for the Wan2.2 video generation models.",
        epilog=f"environment variables:\n{env_help}", formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"artifex {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a video from a prompt (and an image)")
    g.add_argument("--model", required=True, help=f"one of: {', '.join(n for n, s in MODELS.items() if s.runnable)}")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt")
    g.add_argument("--image", help="conditioning image (required by i2v models, optional for ti2v)")
    g.add_argument("--preset", help=f"one of: {', '.join(PRESETS)}")
    g.add_argument("--size", type=_size, help="WIDTHxHEIGHT, e.g. 1280x704 (default: preset or model)")
    g.add_argument("--frames", type=int, help="number of frames, 4n+1")
    g.add_argument("--steps", type=int)
    g.add_argument("--guidance", type=float, help="CFG scale (the high-noise expert's for A14B)")
    g.add_argument("--guidance-low", type=float, help="CFG scale of the low-noise expert (A14B)")
    g.add_argument("--shift", type=float, help="flow-matching sigma shift")
    g.add_argument("--seed", type=int, help="random seed (default: a fresh one, recorded in the sidecar)")
    g.add_argument("--output", type=Path, help="mp4 path (default: a new file in the output directory)")
    g.add_argument("--output-dir", type=Path,
                   help="output directory (default: $ARTIFEX_OUTPUT_DIR or ./artifex-output)")
    g.add_argument("--checkpoint", help="diffusers-format directory or hub id (default: the model's published one)")
    g.add_argument("--transformer-file", help="single-file safetensors replacing transformer/ weights")
    g.add_argument("--transformer-2-file", help="single-file safetensors replacing transformer_2/ weights (A14B)")
    g.add_argument("--vae-file", help="single-file safetensors replacing vae/ weights")
    _add_config_flags(g)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="generate a short clip with a built-in tiny model (no download, CPU is fine)")
    d.add_argument("--model", default="tiny-ti2v",
                   choices=[n for n, s in MODELS.items() if s.tiny and s.image != "required"])
    d.add_argument("--prompt", default=DEMO_PROMPT)
    d.add_argument("--frames", type=int, default=49)
    d.add_argument("--seed", type=int, default=42)
    d.add_argument("--output", type=Path, help="mp4 path (default: artifex-output/demo.mp4)")
    _add_config_flags(d)
    d.set_defaults(func=cmd_demo)

    doc = sub.add_parser("doctor", help="GPU, versions, attention backends (verified), environment advice")
    doc.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    doc.add_argument("--no-verify", action="store_true", help="probe only; skip the float64 verification")
    doc.add_argument("--json", action="store_true")
    doc.set_defaults(func=cmd_doctor)

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
    bm.add_argument("--size", type=_size)
    bm.add_argument("--frames", type=int)
    bm.add_argument("--steps", type=int)
    bm.add_argument("--diffusers-steps", type=int, default=0,
                    help="also measure diffusers' default WanPipeline peak with this many steps")
    bm.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    bm.set_defaults(func=cmd_bench_memory)

    bd = bsub.add_parser("dit", help="one DiT forward at a real shape: diffusers vs Artifex bf16 and fp8 (GPU)")
    bd.add_argument("--model", default="ti2v-5b", help="ti2v-5b, t2v-a14b (one expert), or a tiny model on CPU")
    bd.add_argument("--size", type=_size, help="WIDTHxHEIGHT (default: the model's first trained size)")
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
    bp.add_argument("--size", type=_size)
    bp.add_argument("--frames", type=int)
    bp.add_argument("--checkpoint", help="real weights (directory or hub id); default: random weights at real shapes")
    bp.add_argument("--profile", type=Path, help="write a torch.profiler Chrome trace of a 2-step generation here")
    bp.add_argument("--keep-videos", action="store_true",
                    help="keep the mp4s in OUTPUT_DIR/pipeline-videos (default: written to a temporary folder)")
    bp.add_argument("--append", action="store_true",
                    help="add these runs to an existing pipeline-<gpu>.json of the same settings (split long runs)")
    bp.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    bp.set_defaults(func=cmd_bench_pipeline)

    bg = bsub.add_parser("multigpu", help="one model and shape under parallel layouts (1 GPU, CFG-parallel, "
                         "Ulysses, both): step and whole-generation time, scaling, collectives, equality (GPUs)",
                         description=multigpu.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    multigpu.add_flags(bg)
    bg.set_defaults(func=multigpu.command)

    pl = sub.add_parser("plan", help="predict peak GPU memory of each memory tier (runs nothing)")
    pl.add_argument("--model", required=True)
    pl.add_argument("--size", type=_size, help="WIDTHxHEIGHT (default: the model's largest trained size)")
    pl.add_argument("--frames", type=int)
    pl.add_argument("--vram-budget", help="e.g. 24GB: marks the tiers that fit and the one auto would take")
    pl.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    pl.add_argument("--fp8-weights", action="store_true")
    pl.add_argument("--vae-tiling", action="store_true")
    pl.add_argument("--vae-precision", default="fp32", choices=["fp32", "bf16"])
    pl.add_argument("--cfg-batch", type=int, default=1, choices=[1, 2])
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)

    m = sub.add_parser("models", help="list the known models and their defaults")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    p = sub.add_parser("presets", help="show what each quality preset means for each model")
    p.add_argument("--model")
    p.set_defaults(func=cmd_presets)

    from artifex.serve.cli import add_commands as add_serve_commands  # serve, monitor

    add_serve_commands(sub)
    from artifex.distributed.cli import add_commands as add_launch_command  # launch (torchrun)

    add_launch_command(sub)
    from artifex.distributed.cluster import add_commands as add_cluster_commands  # cluster start|status|stop (Ray)

    add_cluster_commands(sub)
    from artifex.distributed.batch import add_commands as add_batch_command  # batch (--expert-pipeline)

    add_batch_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else read_env().log_level,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ArtifexError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
