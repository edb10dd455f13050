"""The ``artifex`` command: the CLI door. It builds requests and configs from flags and hands them to an executor;
it knows nothing about how generation works, and nothing in the library imports it.

    generate.py  generate, demo, batch        launch.py   launch (torchrun) and the ranks' entry point
    info.py      models, presets, plan, doctor bench.py   bench attention | memory | dit | pipeline | multigpu
    serve.py     serve, monitor               cluster.py  cluster start | status | stop (Ray)
    common.py    config flags, request from flags, progress bar, report, tables
"""

from __future__ import annotations

import argparse
import logging
import sys

from artifex import __version__
from artifex.cli import bench, cluster, generate, info, launch, serve
from artifex.cli.common import build_config
from artifex.env import VARIABLES, read_env
from artifex.errors import ArtifexError


def build_parser() -> argparse.ArgumentParser:
    env_help = "\n".join(f"  {k}: {v}" for k, v in VARIABLES.items())
    parser = argparse.ArgumentParser(
        prog="artifex", description="Fast inference for the Wan2.2 video generation models.",
        epilog=f"environment variables:\n{env_help}", formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"artifex {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    generate.add_commands(sub)  # generate, demo, batch
    info.add_commands(sub)  # doctor, plan, models, presets
    bench.add_commands(sub)
    serve.add_commands(sub)  # serve, monitor
    launch.add_commands(sub)  # launch (torchrun), with generate's flags
    cluster.add_commands(sub)  # cluster start|status|stop (Ray)
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


__all__ = ["build_config", "build_parser", "main"]
