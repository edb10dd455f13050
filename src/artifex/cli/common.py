"""What every command shares: config flags, the request of generate's flags, the progress bar, the report, tables.

Nothing heavy is imported here (torch, diffusers): argument errors and request checks answer at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from artifex.config import OptimizationConfig
from artifex.env import read_env
from artifex.models.registry import MODELS, get_model
from artifex.presets import PRESETS, get_preset


def size_arg(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like WIDTHxHEIGHT (e.g. 1280x704), got {text!r}") from None


def float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers, e.g. 1000,757,522; got {text!r}") from None


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per ``OptimizationConfig`` field (its help from the field's documentation), plus ``--config``."""
    g = p.add_argument_group("optimization (OptimizationConfig; also settable in a TOML file with --config)")
    g.add_argument("--config", type=Path, help="TOML file of OptimizationConfig fields")
    for name, (default, help_text, choices, kind) in OptimizationConfig.field_help().items():
        flag = "--" + name.replace("_", "-")
        if name == "lora":  # repeatable on the command line; the config holds the comma-joined list
            g.add_argument(flag, dest="opt_lora", action="append", default=None, metavar="[high=|low=]FILE[:SCALE]",
                           help=f"{help_text} (repeatable)")
        elif kind is bool:
            g.add_argument(flag, dest=f"opt_{name}", action=argparse.BooleanOptionalAction, default=None,
                           help=f"{help_text} (default: {default})")
        else:
            g.add_argument(flag, dest=f"opt_{name}", type=kind, default=None, choices=choices,
                           help=f"{help_text} (default: {default})")


def config_flags(args: argparse.Namespace) -> dict:
    """The ``OptimizationConfig`` fields given as flags (repeated --lora joined as the config holds them)."""
    flags = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    if isinstance(flags.get("lora"), list):
        flags["lora"] = ",".join(flags["lora"])
    return flags


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
    return config.merged(config_flags(args))


def add_generate_flags(g: argparse.ArgumentParser) -> None:
    """The flags of ``artifex generate`` (also those of ``batch`` and ``launch``): a request's, then where its
    video goes and where the weights come from, then the config's."""
    add_request_flags(g, f"one of: {', '.join(n for n, s in MODELS.items() if s.runnable)}")
    g.add_argument("--output", type=Path, help="mp4 path (default: a new file in the output directory)")
    g.add_argument("--output-dir", type=Path,
                   help="output directory (default: $ARTIFEX_OUTPUT_DIR or ./artifex-output)")
    g.add_argument("--checkpoint", help="checkpoint directory (diffusers or official Wan2.2 layout) or hub id "
                                        "(default: the model's published one)")
    g.add_argument("--transformer-file", help="single-file safetensors replacing transformer/ weights")
    g.add_argument("--transformer-2-file", help="single-file safetensors replacing transformer_2/ weights (A14B)")
    g.add_argument("--vae-file", help="single-file safetensors replacing vae/ weights")
    add_config_flags(g)


def add_request_flags(g: argparse.ArgumentParser, model_help: str) -> None:
    """A generation request's flags (GenerationRequest's fields): those of ``generate`` and of ``submit``."""
    g.add_argument("--model", required=True, help=model_help)
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt")
    g.add_argument("--image", help="conditioning image (required by i2v and s2v models, optional for ti2v; s2v: "
                   "the reference image whose aspect sets the size)")
    g.add_argument("--audio", help="s2v: the speech or other audio driving the video (wav, mp3, m4a, flac, ...); "
                   "the video lasts as many 80-frame clips as the audio needs, with the audio muxed in")
    g.add_argument("--pose-video", help="s2v: a pose video driving the body (its first frames, at 16 fps)")
    g.add_argument("--preset", help=f"one of: {', '.join(PRESETS)}")
    g.add_argument("--size", type=size_arg, help="WIDTHxHEIGHT, e.g. 1280x704 (default: preset or model)")
    g.add_argument("--frames", type=int, help="number of frames, 4n+1 (s2v: 77 + 80n, at most the audio's length; "
                   "default: the audio's)")
    g.add_argument("--steps", type=int)
    g.add_argument("--guidance", type=float, help="CFG scale (the high-noise expert's for A14B)")
    g.add_argument("--guidance-low", type=float, help="CFG scale of the low-noise expert (A14B)")
    g.add_argument("--shift", type=float, help="flow-matching sigma shift (default: the checkpoint's, else the "
                   "model's)")
    g.add_argument("--sampler", help="unipc (default; the model's solver), euler (flow-matching Euler: Lightning "
                   "4-step), dmd (FastWan's 3-step: predict x0, re-noise with fresh seeded noise)")
    g.add_argument("--timesteps", type=float_list, help="euler/dmd: the timesteps, decreasing in (0, 1000], e.g. "
                   "1000,937.5,833.3,625 (sets the steps)")
    g.add_argument("--sigmas", type=float_list, help="euler/dmd: the sigmas, decreasing in (0, 1] (instead of "
                   "--timesteps)")
    g.add_argument("--switch-step", type=int, help="A14B: the first step of the low-noise expert (instead of the "
                   "boundary timestep), e.g. 2 for the Lightning 4-step LoRAs")
    g.add_argument("--seed", type=int, help="random seed (default: a fresh one, recorded in the sidecar)")


def request_from_args(args: argparse.Namespace):
    """The ``GenerationRequest`` of ``artifex generate``'s flags."""
    from artifex.engine.request import GenerationRequest

    width, height = args.size if args.size else (None, None)
    return GenerationRequest(
        model=args.model, prompt=args.prompt, negative_prompt=args.negative_prompt, image=args.image,
        width=width, height=height, frames=args.frames, steps=args.steps, guidance=args.guidance,
        guidance_low=args.guidance_low, shift=args.shift, seed=args.seed, preset=args.preset,
        output=str(args.output) if args.output else None, sampler=args.sampler, timesteps=args.timesteps,
        sigmas=args.sigmas, switch_step=args.switch_step, audio=getattr(args, "audio", None),
        pose_video=getattr(args, "pose_video", None),
    )


def single_files(args: argparse.Namespace) -> dict[str, str | None]:
    return {"transformer": args.transformer_file, "transformer_2": args.transformer_2_file, "vae": args.vae_file}


def progress_printer(experts: int = 2):
    """A tqdm bar over the denoising steps (with the expert of the step for a two-expert model), and one line per
    other stage."""
    from tqdm import tqdm

    state: dict = {}

    def on_event(e) -> None:
        if e.stage == "denoise":
            bar = state.get("bar")
            if bar is None:
                bar = state["bar"] = tqdm(total=e.total, desc="denoise", unit="step", file=sys.stderr)
            bar.update(e.step - bar.n)
            post = {"t": f"{e.timestep:.0f}"}
            if e.clip is not None:
                post = {"clip": f"{e.clip + 1}/{e.clips}", **post}
            if experts > 1:
                post = {"expert": "high" if e.expert == 0 else "low", **post}
            bar.set_postfix(post, refresh=False)
            if e.step == e.total:
                bar.close()
        elif e.stage != "done":
            line = f"[{e.elapsed_s:7.2f}s] {e.stage}" + (f" (clip {e.clip + 1}/{e.clips})" if e.clip is not None
                                                          else "")
            bar = state.get("bar")
            if bar is not None and not bar.disable and bar.n < bar.total:
                bar.write(line, file=sys.stderr)  # above the open bar (S2V decodes between clips)
            else:
                print(line, file=sys.stderr)

    return on_event


def experts_of(model: str) -> int:
    return get_model(model).experts


def report(result) -> None:
    t = result.timings
    s = result.settings
    print(f"{s.model}: {s.width}x{s.height}, {s.frames} frames, {s.steps} steps, seed {s.seed}; "
          f"denoise {t['denoise']:.2f}s, decode {t['decode']:.2f}s, total {t['total']:.2f}s", file=sys.stderr)
    if result.switch_step is not None:
        print(f"experts: high-noise for steps 0-{result.switch_step - 1}, low-noise from step {result.switch_step}",
              file=sys.stderr)
    wall = (result.sidecar or {}).get("wall")
    if wall:
        print(wall_line(wall), file=sys.stderr)
    check = ((result.sidecar or {}).get("decoder") or {}).get("check")
    if check:
        print(f"light decoder against the VAE on frames 0-{check['frames'] - 1}: PSNR {check['psnr_db']} dB, max "
              f"error {check['max_abs_error']} (check {check['seconds']:.2f}s)", file=sys.stderr)
    print(f"sidecar: {result.sidecar_path}", file=sys.stderr)
    print(result.video_path)


def wall_line(wall: dict) -> str:
    """The sidecar's ``wall`` section in one line: the process's seconds so far and where they went."""
    groups: dict[str, list[tuple[str, float]]] = {}
    for key, seconds in wall["stages_s"].items():
        group, _, name = key.partition(".")
        groups.setdefault(group, []).append((name, seconds))
    parts = [f"{n} {v:.2f}" for n, v in groups.get("process", [])]
    load = groups.get("load", [])
    if load:
        parts.append(f"load {sum(v for _, v in load):.2f} (" + ", ".join(f"{n} {v:.2f}" for n, v in load) + ")")
    parts += [f"{n} {v:.2f}" for n, v in groups.get("request", [])]
    return (f"wall {wall['process_s']:.2f}s since the process started: " + ", ".join(parts)
            + f"; other {wall['other_s']:.2f}")


def table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))


def shape_of(args: argparse.Namespace) -> tuple[int, int, int]:
    """A command's (width, height, frames): the flags, else the model's defaults; checked like a request."""
    from artifex.engine.request import check_frames, check_size

    spec = get_model(args.model)
    w, h = args.size or spec.sizes[0]
    frames = args.frames or spec.frames
    for warning in check_size(spec, w, h):
        print(f"warning: {warning}")
    check_frames(spec, frames)
    return w, h, frames
