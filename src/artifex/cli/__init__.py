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
    serve.add_commands(sub)  # serve, monitor, submit
    launch.add_commands(sub)  # launch (torchrun), with generate's flags
    cluster.add_commands(sub)  # cluster start|status|stop (Ray)
    return parser


# One-shot commands whose process ends right after its output is closed: ``entry`` skips the interpreter's teardown.
FAST_EXIT_COMMANDS = ("generate", "batch", "demo")
_last_command: list[str | None] = [None]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _last_command[0] = args.command
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


def entry() -> None:
    """The ``artifex`` console script and ``python -m artifex``: ``main``, then, after a one-shot generation command
    (``FAST_EXIT_COMMANDS``), an exit without the interpreter's teardown of torch, the libraries and the models in
    memory (1.5 s of the tiny model's 9 s CLI run on a CPU; the mp4 and sidecar are closed by then). atexit handlers
    still run and the standard streams are flushed first; other commands exit as usual."""
    import atexit
    import os

    code = main()
    if _last_command[0] not in FAST_EXIT_COMMANDS:
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(code)


__all__ = ["FAST_EXIT_COMMANDS", "build_config", "build_parser", "entry", "main"]
