"""``artifex batch``: one video per prompt, one after another or (A14B, ``--expert-pipeline``) pipelined over two
devices by ``artifex.distributed.experts``. Registered on the main parser by ``add_commands``; nothing heavy is
imported until the command runs.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from artifex.errors import InvalidRequestError

if TYPE_CHECKING:
    from artifex.engine.pipeline import EventCallback, GenerationResult, ProgressEvent

BATCH_HELP = """One video per prompt, with the flags of ``artifex generate`` (the same settings for every prompt).

Prompts come from --prompt (repeatable) or --prompts-file (one prompt a line; blank lines and
lines starting with # are skipped). Without --expert-pipeline the jobs run one after another
on one engine; with it (A14B models, two devices) they are pipelined: device 0 runs a job's
text encoding and high-noise steps while device 1 runs the previous job's low-noise steps and
VAE decode. A failed job does not stop the others; the exit status is 1 if any failed.
"""


def add_commands(sub) -> None:
    """Register ``artifex batch`` (after ``generate``, whose flags it shares)."""
    import argparse
    import copy

    # A copy of generate's parser: resolving the conflicting --prompt/--output would edit its (shared) actions.
    p = sub.add_parser("batch", parents=[copy.deepcopy(sub.choices["generate"])], conflict_handler="resolve",
                       help="one video per prompt; --expert-pipeline pipelines A14B jobs over two devices",
                       description=BATCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    prompts.add_argument("--prompts-file", type=Path, help="a text file, one prompt a line")
    p.add_argument("--output", type=Path, help="mp4 path, only with a single prompt (else use --output-dir)")
    g = p.add_argument_group("expert pipeline")
    g.add_argument("--expert-pipeline", action="store_true",
                   help="A14B: expert 0 (+ text encoder) on device 0, expert 1 (+ VAE) on device 1, jobs pipelined")
    g.add_argument("--devices", help="FIRST,SECOND for --expert-pipeline (default: the engine's GPU and another "
                                     "one; cpu,cpu without CUDA)")
    p.set_defaults(func=cmd_batch)


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


def _batch_printer(total: int):
    """printer(index) -> a progress callback printing one line per stage and job (denoise: the first step of each
    expert, every 10th step and the last)."""
    import sys

    lock = threading.Lock()
    last_expert: dict[int, int | None] = {}

    def printer(index: int) -> EventCallback:
        def on_event(e: ProgressEvent) -> None:
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


def cmd_batch(args) -> int:
    import sys

    from artifex.cli import build_config
    from artifex.distributed.cli import request_from_args
    from artifex.distributed.experts import ExpertPipeline, ExpertPipelineError
    from artifex.engine.pipeline import Engine
    from artifex.engine.plan import requested_tier
    from artifex.engine.request import resolve_request

    prompts = args.prompt or read_prompts(args.prompts_file)
    if args.output and len(prompts) > 1:
        raise InvalidRequestError("output", f"one path for {len(prompts)} prompts", "--output-dir DIR")
    requests = [dataclasses.replace(request_from_args(args), prompt=p) for p in prompts]
    for r in requests:  # check every request before spending time on loading weights
        resolve_request(r)
    devices = tuple(d.strip() for d in args.devices.split(",")) if args.devices else None
    if devices is not None and len(devices) != 2:
        raise InvalidRequestError("devices", f"needs two devices, got {args.devices!r}", "FIRST,SECOND")
    if devices and not args.expert_pipeline:
        raise InvalidRequestError("devices", "only used with --expert-pipeline")
    config = build_config(args, args.preset)
    if args.expert_pipeline and requested_tier(config) == "auto":
        config = config.merged({"memory_tier": "resident"})  # each device holds half: no offload tier
    print(f"loading {args.model} ...", file=sys.stderr)
    engine = Engine.load(args.model, checkpoint=args.checkpoint, config=config,
                         single_files={"transformer": args.transformer_file, "transformer_2": args.transformer_2_file,
                                       "vae": args.vae_file})
    printer = _batch_printer(len(requests))
    results: list[GenerationResult | None] = [None] * len(requests)
    errors: dict[int, BaseException] = {}
    if args.expert_pipeline:
        with ExpertPipeline(engine, devices) as pipe:
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
                results[i] = engine.generate(request, on_event=printer(i), output_dir=args.output_dir)
            except Exception as e:  # the next job still runs
                errors[i] = e
    for i, r in enumerate(results):
        if r is None:
            print(f"[job {i + 1}/{len(requests)}] failed: {type(errors[i]).__name__}: {errors[i]}", file=sys.stderr)
            continue
        t = r.timings
        print(f"[job {i + 1}/{len(requests)}] {r.settings.width}x{r.settings.height}, {r.settings.frames} frames, "
              f"{r.settings.steps} steps, seed {r.settings.seed}; denoise {t['denoise']:.2f}s, decode "
              f"{t['decode']:.2f}s, total {t['total']:.2f}s; sidecar {r.sidecar_path}", file=sys.stderr)
        print(r.video_path)
    return 1 if errors else 0
