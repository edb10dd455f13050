"""The torchrun entry point: one generation by every rank of a parallel layout.

    torchrun --nproc-per-node 4 -m artifex.distributed.launch --cfg 2 --ulysses 2 \
        --model t2v-a14b --prompt "..." [the flags of artifex generate]

Each rank checks the layout and the request (the same checks, so bad input fails
everywhere before anything loads), joins the world (NCCL with cuda:LOCAL_RANK when
CUDA is there, gloo otherwise), loads the same checkpoint, applies the layout, and
generates; global rank 0 decodes, writes the mp4 and its sidecar, and prints the path.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from artifex.errors import ArtifexError


def build_parser() -> argparse.ArgumentParser:
    from artifex.distributed.cli import add_layout_flags, generate_parser

    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m artifex.distributed.launch",
                                parents=[generate_parser()], conflict_handler="resolve",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layout_flags(p)
    return p


def run(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from artifex.cli import _progress_printer, _report, build_config
    from artifex.distributed.cli import check_launch
    from artifex.distributed.groups import build_groups, init_distributed, pick_backend
    from artifex.distributed.runner import parallelize
    from artifex.engine.pipeline import Engine

    # 1. Checks, identical on every rank, before joining the world or reading weights.
    backend = pick_backend(args.backend)
    layout, request = check_launch(args, int(os.environ.get("WORLD_SIZE", "1")),
                                   torch.cuda.device_count() if backend == "nccl" else None,
                                   int(os.environ.get("LOCAL_WORLD_SIZE", args.cfg * args.ulysses)))

    # 2. Join the world, build the groups, load, apply the layout, generate.
    backend, device = init_distributed(backend)
    try:
        groups = build_groups(layout)
        config = build_config(args, args.preset).merged({"device": device})
        engine = Engine.load(args.model, checkpoint=args.checkpoint, config=config,
                             single_files={"transformer": args.transformer_file,
                                           "transformer_2": args.transformer_2_file, "vae": args.vae_file})
        runner = parallelize(engine, groups, split_vae_decode=args.split_vae_decode)
        lead = groups.rank == 0
        if lead:
            decode = "every rank decodes" if runner.split_vae_decode else "rank 0 decodes"
            print(f"{layout.describe()} on {layout.world_size} ranks ({backend}); {decode}, rank 0 writes the video",
                  file=sys.stderr)
        result = runner.generate(request, on_event=_progress_printer() if lead else None,
                                 output_dir=args.output_dir)
        if lead:
            _report(result)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from artifex.env import read_env

    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else read_env().log_level,
                        format=f"[rank {os.environ.get('RANK', '0')}] %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except ArtifexError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank fails the same checks; say it once
            print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
