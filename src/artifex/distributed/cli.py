"""``artifex launch``: the torchrun path as an artifex command; registered on the main parser by ``add_commands``.

``artifex launch --cfg 2 --ulysses 2 --model M --prompt ...`` takes the flags of ``artifex
generate`` plus the layout, checks the layout, and starts
``torchrun --standalone --nproc-per-node N -m artifex.distributed.launch`` with them
(N = cfg x ulysses unless ``--nproc-per-node`` says otherwise). Multi-node runs call
torchrun directly with the same module.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from artifex.errors import InvalidRequestError


def add_layout_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallel layout (world size = cfg x ulysses)")
    g.add_argument("--cfg", type=int, default=1,
                   help="CFG-parallel degree: 1, or 2 = conditional and unconditional passes on two rank groups")
    g.add_argument("--ulysses", type=int, default=1,
                   help="Ulysses sequence-parallel degree; must divide the model's heads (24 TI2V-5B, 40 A14B)")
    g.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"],
                   help="torch.distributed backend: auto = nccl with one GPU per rank when CUDA is there, else gloo")
    g.add_argument("--no-split-vae-decode", dest="split_vae_decode", action="store_false",
                   help="rank 0 decodes the video alone (default: every rank decodes a band of rows of each frame)")


def generate_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``artifex generate`` subparser (its flags are the launch flags too)."""
    if parser is None:
        from artifex.cli import build_parser

        parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices["generate"]
    raise RuntimeError("artifex's parser has no 'generate' command")


def request_from_args(args: argparse.Namespace):
    """The ``GenerationRequest`` of ``artifex generate``'s flags."""
    from artifex.engine.request import GenerationRequest

    width, height = args.size if args.size else (None, None)
    return GenerationRequest(
        model=args.model, prompt=args.prompt, negative_prompt=args.negative_prompt, image=args.image,
        width=width, height=height, frames=args.frames, steps=args.steps, guidance=args.guidance,
        guidance_low=args.guidance_low, shift=args.shift, seed=args.seed, preset=args.preset,
        output=str(args.output) if args.output else None,
    )


def check_launch(args: argparse.Namespace, world_size: int, devices: int | None,
                 local_world_size: int | None = None):
    """Every check that needs no world and no weights: the layout, the request, the two together."""
    from artifex.distributed.layout import ParallelLayout
    from artifex.engine.request import resolve_request
    from artifex.models.registry import get_model

    layout = ParallelLayout(args.cfg, args.ulysses).check(get_model(args.model), world_size=world_size,
                                                          devices=devices, local_world_size=local_world_size)
    request = request_from_args(args)
    spec, s, _ = resolve_request(request)
    layout.check_request(spec, s.guidance, s.width, s.height, s.frames)
    return layout, request


def add_commands(sub) -> None:
    """Register ``artifex launch`` (after ``generate``, whose flags it shares)."""
    p = sub.add_parser("launch", parents=[sub.choices["generate"]], conflict_handler="resolve",
                       help="generate with several processes (torchrun): CFG-parallel and/or Ulysses",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layout_flags(p)
    p.add_argument("--nproc-per-node", type=int, help="processes to start on this machine (default: cfg x ulysses)")
    p.set_defaults(func=cmd_launch)


def cmd_launch(args: argparse.Namespace) -> int:
    import torch

    from artifex.distributed.groups import pick_backend

    if "launch" not in sys.argv:
        raise InvalidRequestError("argv", "artifex launch re-runs its own command line under torchrun; call it "
                                  "from a shell, or call torchrun -m artifex.distributed.launch directly")
    nproc = args.nproc_per_node or args.cfg * args.ulysses
    backend = pick_backend(args.backend)
    layout, _ = check_launch(args, nproc, torch.cuda.device_count() if backend == "nccl" else None)
    rest, argv = [], sys.argv[sys.argv.index("launch") + 1:]
    skip = False
    for a in argv:  # everything but --nproc-per-node goes to the ranks
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "artifex.distributed.launch", *rest]
    print(f"artifex launch: {layout.describe()} on {nproc} processes ({backend})", file=sys.stderr)
    return subprocess.run(cmd).returncode
