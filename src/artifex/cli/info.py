"""``artifex models``, ``presets``, ``plan`` and ``doctor``: what the models are, what a preset means, how much memory
each tier takes (nothing runs), and what this machine can do."""

from __future__ import annotations

import argparse
import json
import sys

from artifex.cli.common import size_arg, table
from artifex.errors import InvalidRequestError
from artifex.models.registry import MODELS, get_model
from artifex.presets import PRESETS, pick_size


def add_commands(sub) -> None:
    doc = sub.add_parser("doctor", help="GPU, versions, attention backends (verified), environment advice")
    doc.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    doc.add_argument("--no-verify", action="store_true", help="probe only; skip the float64 verification")
    doc.add_argument("--json", action="store_true")
    doc.set_defaults(func=cmd_doctor)

    pl = sub.add_parser("plan", help="predict peak GPU memory of each memory tier (runs nothing)")
    pl.add_argument("--model", required=True)
    pl.add_argument("--size", type=size_arg, help="WIDTHxHEIGHT (default: the model's largest trained size)")
    pl.add_argument("--frames", type=int)
    pl.add_argument("--vram-budget", help="e.g. 24GB: marks the tiers that fit and the one auto would take")
    pl.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    pl.add_argument("--fp8-weights", action="store_true")
    pl.add_argument("--vae-tiling", action="store_true")
    pl.add_argument("--vae-precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="auto (the default): bf16, as the engine runs it on CUDA (fp32 on a CPU)")
    pl.add_argument("--cfg-batch", type=int, default=1, choices=[1, 2])
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)

    m = sub.add_parser("models", help="list the known models and their defaults")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    p = sub.add_parser("presets", help="show what each quality preset means for each model")
    p.add_argument("--model")
    p.set_defaults(func=cmd_presets)


def cmd_doctor(args: argparse.Namespace) -> int:
    from artifex.doctor import diagnose, render

    report = diagnose(args.dtype, run_verification=not args.no_verify)
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from artifex.config import resolve_vae_precision
    from artifex.engine.memory import GIB, HEADROOM, fits, parse_budget, plan_memory, weights_of
    from artifex.engine.request import check_frames, check_size
    from artifex.models.configs import meta_components

    spec = get_model(args.model)
    width, height = args.size or spec.sizes[0]
    frames = args.frames or spec.frames
    check_size(spec, width, height)
    check_frames(spec, frames)
    budget = parse_budget(args.vram_budget)
    vae_precision, why_vae = resolve_vae_precision(args.vae_precision, "cuda")  # the plan is of GPU memory
    args.vae_precision = vae_precision
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
                          budget / GIB if budget else None, "chosen": chosen, "vae_tiling": tiled,
                          "vae_precision": vae_precision, "reasons": [why_vae] if why_vae else [], "error": error,
                          "tiers": [e.to_dict() for e in ests]}, indent=2))
    else:
        print(f"{spec.name} {width}x{height}x{frames}, {args.precision}"
              f"{', fp8 weights' if args.fp8_weights else ''}, VAE {vae_precision}{' tiled' if tiled else ''}; "
              f"weights: text encoder {weights.text_encoder / GIB:.1f} GiB, VAE {weights.vae / GIB:.1f} GiB, "
              f"experts {' + '.join(f'{x / GIB:.1f}' for x in weights.experts)} GiB")
        rows = [("tier", "peak GiB", "encode_text", "denoise", "decode", "to GPU GiB/request", "+ GiB/forward",
                 "fits" if budget else "")]
        for e in ests:
            d = e.to_dict()
            g = d["stages_gib"]
            mark = "" if budget is None else ("<- auto" if e.tier == chosen else ("yes" if fits(e.peak_bytes, budget)
                                                                                   else "no"))
            rows.append((e.tier, f"{e.peak_gib:.1f}", f"{g['encode_text']:.1f}", f"{g['denoise']:.1f}",
                         f"{g['decode']:.1f}", f"{d['copy_per_request_gib']:.1f}", f"{d['copy_per_forward_gib']:.1f}",
                         mark))
        table(rows)
        print("to GPU: what a tier copies from host memory, its cost in time besides memory: GiB a request (the text "
              "encoder's part skipped\n  when the prompt cache answers) + GiB each DiT forward pass (two a step with "
              "CFG in two passes); the tiers go from the least\n  copying to the most (leaf_offload: block_offload's "
              "bytes in smaller pieces), and auto takes the first that fits")
        if why_vae:
            print(f"plan: {why_vae}")
        if budget is not None:
            print(f"fits: predicted peak at most {HEADROOM:.0%} of the budget (room for fragmentation under the cap)")
        if error:
            print(f"error: {error}", file=sys.stderr)
    return 2 if error else 0


def cmd_models(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps({n: s.summary() for n, s in MODELS.items()}, indent=2))
        return 0
    rows = [("model", "task", "experts", "steps", "sampler", "shift", "guidance", "boundary", "fps", "frames",
             "sizes (WxH)", "checkpoint")]
    for s in MODELS.values():
        switch = f", switch at step {s.switch_step}" if s.switch_step is not None else ""
        rows.append((
            s.name, s.task + ("" if s.runnable else " (spec only)"), str(s.experts), str(s.steps), s.sampler + switch,
            f"{s.shift:g}", "/".join(f"{g:g}" for g in s.guidance), f"{s.boundary:g}" if s.boundary else "-",
            str(s.fps), str(s.frames), " ".join(f"{w}x{h}" for w, h in s.sizes),
            s.hub_id or ("built-in tiny" if s.tiny else "-"),
        ))
    table(rows)
    print("\ndistilled profiles (their base's architecture; `--preset turbo` on the base runs the same schedule):")
    for s in MODELS.values():
        if s.base and not s.tiny:
            print(f"  {s.name}: timesteps {', '.join(f'{t:g}' for t in s.timesteps or ())}; needs {s.weights}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    specs = [get_model(args.model)] if args.model else [m for m in MODELS.values() if m.runnable]
    rows = [("model", "preset", "steps", "size", "frames", "guidance", "optimizations", "description")]
    for spec in specs:
        for p in PRESETS.values():
            try:
                sampling = p.sampling(spec)
            except InvalidRequestError:  # turbo on a model without a few-step schedule
                continue
            w, h = pick_size(spec, p.size)
            opts = ", ".join(f"{k}={v}" for k, v in p.optimizations.items()) or "-"
            steps = f"{p.steps(spec)} {sampling.sampler}"
            rows.append((spec.name, p.name, steps, f"{w}x{h}", str(p.num_frames(spec) or "audio's"),
                         "/".join(f"{g:g}" for g in sampling.guidance), opts, p.description))
    table(rows)
    return 0


