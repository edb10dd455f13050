"""``artifex generate``, ``demo`` and ``batch``: requests from flags, run by an executor in this process."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import threading
from pathlib import Path

from artifex import timeline
from artifex.cli.common import (
    add_config_flags,
    add_generate_flags,
    build_config,
    experts_of,
    progress_printer,
    report,
    request_from_args,
    single_files,
)
from artifex.env import read_env
from artifex.errors import InvalidRequestError
from artifex.models import prefetch, read_ahead
from artifex.models.registry import MODELS

DEMO_PROMPT = "a red kite flying over a golden beach at sunset, slow motion, cinematic"

BATCH_HELP = """One video per prompt, with the flags of ``artifex generate`` (the same settings for every prompt).

Prompts come from --prompt (repeatable) or --prompts-file (one prompt a line; blank lines and
lines starting with # are skipped). Without --expert-pipeline the jobs run one after another
on one engine; with it (A14B models, two devices) they are pipelined: device 0 runs a job's
text encoding and high-noise steps while device 1 runs the previous job's low-noise steps and
VAE decode. A failed job does not stop the others; the exit status is 1 if any failed.
"""


def add_commands(sub) -> None:
    g = sub.add_parser("generate", help="generate a video from a prompt (and an image)")
    add_generate_flags(g)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="generate a short clip with a built-in tiny model (no download, CPU is fine)")
    d.add_argument("--model", default="tiny-ti2v",
                   choices=[n for n, s in MODELS.items() if s.tiny and s.image != "required"])
    d.add_argument("--prompt", default=DEMO_PROMPT)
    d.add_argument("--frames", type=int, default=49)
    d.add_argument("--seed", type=int, default=42)
    d.add_argument("--output", type=Path, help="mp4 path (default: artifex-output/demo.mp4)")
    add_config_flags(d)
    d.set_defaults(func=cmd_demo)

    # A copy of generate's parser: resolving the conflicting --prompt/--output would edit its (shared) actions.
    b = sub.add_parser("batch", parents=[copy.deepcopy(g)], conflict_handler="resolve",
                       help="one video per prompt; --expert-pipeline pipelines A14B jobs over two devices",
                       description=BATCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    prompts = b.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    prompts.add_argument("--prompts-file", type=Path, help="a text file, one prompt a line")
    b.add_argument("--output", type=Path, help="mp4 path, only with a single prompt (else use --output-dir)")
    e = b.add_argument_group("expert pipeline")
    e.add_argument("--expert-pipeline", action="store_true",
                   help="A14B: expert 0 (+ text encoder) on device 0, expert 1 (+ VAE) on device 1, jobs pipelined")
    e.add_argument("--devices", help="FIRST,SECOND for --expert-pipeline (default: the engine's GPU and another "
                                     "one; cpu,cpu without CUDA)")
    b.set_defaults(func=cmd_batch)


def cmd_generate(args: argparse.Namespace) -> int:
    from artifex.engine.executor import LocalExecutor
    from artifex.engine.request import resolve_request

    prefetch.start(args.checkpoint)  # the disk reads the weights while the libraries import
    request = request_from_args(args)
    config = build_config(args, args.preset)
    read_ahead.start(args.checkpoint, config, single_files(args))  # and the GPU, once torch is imported
    with timeline.importing():  # its step limit is the process's first import of diffusers
        resolve_request(request)  # checked before the main thread spends any time on loading weights
    print(f"loading {args.model} ...", file=sys.stderr)
    executor = LocalExecutor()
    executor.load(args.model, checkpoint=args.checkpoint, config=config, single_files=single_files(args))
    result = executor.generate(request, on_event=progress_printer(experts_of(args.model)), output_dir=args.output_dir)
    report(result)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from artifex.engine.executor import LocalExecutor
    from artifex.engine.request import GenerationRequest

    output = args.output or read_env().output_dir / "demo.mp4"
    print(f"artifex demo: {args.model} (random tiny weights, built offline) on this machine", file=sys.stderr)
    executor = LocalExecutor()
    executor.load(args.model, config=build_config(args))
    request = GenerationRequest(model=executor.engine.spec.name, prompt=args.prompt, seed=args.seed,
                                frames=args.frames, output=str(output))
    result = executor.generate(request, on_event=progress_printer(experts_of(args.model)))
    report(result)
    print(f"demo video written to {Path(result.video_path).resolve()}", file=sys.stderr)
    return 0


def read_prompts(path: Path) -> list[str]:
    """Prompts of a prompts file: one a line, blank lines and # comments skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise InvalidRequestError("prompts_file", f"cannot read {path}: {e.strerror or e}") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise InvalidRequestError("prompts_file", f"{path} holds no prompts", "one prompt a line")
    return prompts


def batch_printer(total: int):
    """printer(index) -> a progress callback printing one line per stage and job (denoise: the first step of each
    expert, every 10th step and the last)."""
    lock = threading.Lock()
    last_expert: dict[int, int | None] = {}

    def printer(index: int):
        def on_event(e) -> None:
            job = index if e.job is None else e.job
            what = e.stage
            if e.stage == "denoise":
                switched = last_expert.get(job, -1) != e.expert
                last_expert[job] = e.expert
                if not (switched or e.step == e.total or e.step % 10 == 0):
                    return
                what = f"denoise {e.step}/{e.total} ({'high' if e.expert == 0 else 'low'}-noise expert)"
            with lock:
                print(f"[job {job + 1}/{total}] [{e.elapsed_s:7.2f}s] {what}", file=sys.stderr)
        return on_event

    return printer


def _wall(result) -> str:
    wall = (result.sidecar or {}).get("wall")
    return f"process wall {wall['process_s']:.2f}s at its mp4; " if wall else ""


def cmd_batch(args) -> int:
    from artifex.engine.executor import LocalExecutor
    from artifex.engine.request import resolve_request

    prefetch.start(args.checkpoint)  # the disk reads the weights while the libraries import
    prompts = args.prompt or read_prompts(args.prompts_file)
    if args.output and len(prompts) > 1:
        raise InvalidRequestError("output", f"one path for {len(prompts)} prompts", "--output-dir DIR")
    requests = [dataclasses.replace(request_from_args(args), prompt=p) for p in prompts]
    config = build_config(args, args.preset)
    if not args.expert_pipeline:  # which splits the components over two devices
        read_ahead.start(args.checkpoint, config, single_files(args))
    with timeline.importing():  # the first request's step limit imports torch and diffusers
        for r in requests:  # check every request before spending time on loading weights
            resolve_request(r)
    devices = tuple(d.strip() for d in args.devices.split(",")) if args.devices else None
    if devices is not None and len(devices) != 2:
        raise InvalidRequestError("devices", f"needs two devices, got {args.devices!r}", "FIRST,SECOND")
    if devices and not args.expert_pipeline:
        raise InvalidRequestError("devices", "only used with --expert-pipeline")
    if args.expert_pipeline and config.requested_tier() == "auto":
        config = config.merged({"memory_tier": "resident"})  # each device holds half: no offload tier
    print(f"loading {args.model} ...", file=sys.stderr)
    executor = LocalExecutor()
    executor.load(args.model, checkpoint=args.checkpoint, config=config, single_files=single_files(args))
    printer = batch_printer(len(requests))
    results: list = [None] * len(requests)
    errors: dict[int, BaseException] = {}
    if args.expert_pipeline:
        from artifex.multidevice.experts import ExpertPipeline, ExpertPipelineError

        with ExpertPipeline(executor.engine, devices) as pipe:
            print(f"expert pipeline: high-noise expert on {pipe.devices[0]}, low-noise expert and VAE on "
                  f"{pipe.devices[1]}", file=sys.stderr)
            one = printer(0)  # events carry their job index
            try:
                results = list(pipe.run(requests, on_event=one, output_dir=args.output_dir))
            except ExpertPipelineError as e:
                results, errors = e.results, e.errors
    else:
        for i, request in enumerate(requests):
            try:
                results[i] = executor.generate(request, on_event=printer(i), output_dir=args.output_dir)
            except Exception as e:  # the next job still runs
                errors[i] = e
    for i, r in enumerate(results):
        if r is None:
            print(f"[job {i + 1}/{len(requests)}] failed: {type(errors[i]).__name__}: {errors[i]}", file=sys.stderr)
            continue
        t = r.timings
        print(f"[job {i + 1}/{len(requests)}] {r.settings.width}x{r.settings.height}, {r.settings.frames} frames, "
              f"{r.settings.steps} steps, seed {r.settings.seed}; denoise {t['denoise']:.2f}s, decode "
              f"{t['decode']:.2f}s, total {t['total']:.2f}s; {_wall(r)}sidecar {r.sidecar_path}", file=sys.stderr)
        print(r.video_path)
    return 1 if errors else 0
