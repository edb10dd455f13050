"""``artifex launch`` and the torchrun entry point: one generation by every rank of a parallel layout.

    artifex launch --cfg 2 --ulysses 2 --model t2v-a14b --prompt "..."          # starts torchrun on this machine
    torchrun --nproc-per-node 4 -m artifex.cli.launch --cfg 2 --ulysses 2 \\
        --model t2v-a14b --prompt "..." [the flags of artifex generate]        # multi-node: torchrun directly

``artifex launch`` takes the flags of ``artifex generate`` plus the layout, checks the
layout and the request, and starts ``torchrun --standalone --nproc-per-node N -m
artifex.cli.launch`` with them (N = cfg x ulysses unless ``--nproc-per-node`` says
otherwise). Each rank checks the layout and the request (the same checks, so bad input
fails everywhere before anything loads), and drives a ``DistributedExecutor``: it joins the
world (NCCL with cuda:LOCAL_RANK when CUDA is there, gloo otherwise), loads the same
checkpoint, applies the layout, and generates; global rank 0 decodes, writes the mp4 and its
sidecar, and prints the path.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

from artifex.cli.common import (
    add_generate_flags,
    build_config,
    progress_printer,
    report,
    request_from_args,
    single_files,
)
from artifex.errors import ArtifexError, InvalidRequestError


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


def add_commands(sub) -> None:
    """Register ``artifex launch`` (after ``generate``, whose flags it shares)."""
    p = sub.add_parser("launch", parents=[sub.choices["generate"]], conflict_handler="resolve",
                       help="generate with several processes (torchrun): CFG-parallel and/or Ulysses",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layout_flags(p)
    p.add_argument("--nproc-per-node", type=int, help="processes to start on this machine (default: cfg x ulysses)")
    p.set_defaults(func=cmd_launch)


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


def cmd_launch(args: argparse.Namespace) -> int:
    import torch

    from artifex.distributed.groups import pick_backend

    if "launch" not in sys.argv:
        raise InvalidRequestError("argv", "artifex launch re-runs its own command line under torchrun; call it "
                                  "from a shell, or call torchrun -m artifex.cli.launch directly")
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
           "-m", "artifex.cli.launch", *rest]
    print(f"artifex launch: {layout.describe()} on {nproc} processes ({backend})", file=sys.stderr)
    return subprocess.run(cmd).returncode


# -- in each rank (torchrun -m artifex.cli.launch) ---------------------------------------------
def build_rank_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m artifex.cli.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generate_flags(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_layout_flags(p)
    return p


def run_rank(args: argparse.Namespace) -> int:
    import torch

    from artifex.distributed.executor import DistributedExecutor
    from artifex.distributed.groups import pick_backend

    # 1. Checks, identical on every rank, before joining the world or reading weights.
    backend = pick_backend(args.backend)
    layout, request = check_launch(args, int(os.environ.get("WORLD_SIZE", "1")),
                                   torch.cuda.device_count() if backend == "nccl" else None,
                                   int(os.environ.get("LOCAL_WORLD_SIZE", args.cfg * args.ulysses)))
    # 2. Join the world, build the groups, load, apply the layout, generate.
    executor = DistributedExecutor(layout, backend, split_vae_decode=args.split_vae_decode)
    try:
        executor.load(args.model, checkpoint=args.checkpoint, config=build_config(args, args.preset),
                      single_files=single_files(args))
        lead = executor.rank == 0
        if lead:
            decode = "every rank decodes" if executor.split_vae_decode else "rank 0 decodes"
            print(f"{layout.describe()} on {layout.world_size} ranks ({executor.backend}); {decode}, rank 0 writes "
                  "the video", file=sys.stderr)
        result = executor.generate(request, on_event=progress_printer(executor.engine.spec.experts) if lead else None,
                                   output_dir=args.output_dir)
        if lead:
            report(result)
        import torch.distributed as dist

        dist.barrier()
    finally:
        executor.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_rank_parser().parse_args(argv)
    from artifex.env import read_env

    logging.basicConfig(level=logging.DEBUG if args.verbose else read_env().log_level,
                        format=f"[rank {os.environ.get('RANK', '0')}] %(levelname)s %(name)s: %(message)s")
    try:
        return run_rank(args)
    except ArtifexError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank fails the same checks; say it once
            print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
