"""``artifex cluster start | status | stop``: Ray's own ``ray start`` / ``ray status`` / ``ray stop``, run for you.

    artifex cluster start --head [--port 6379] [--dashboard-port 8265] [--num-gpus N] [--num-cpus N]
    artifex cluster start --address HEAD_IP:6379      # join this machine to the cluster of that head
    artifex cluster status [--address HEAD_IP:6379]   # ray status, then the dashboard's address
    artifex cluster stop                              # ray stop: every Ray process of this user on this machine

Each command prints the ``ray`` command it runs (the ``ray`` next to this Python) and exits
with its status (the helpers: ``artifex.ray.cluster``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from artifex.errors import InvalidRequestError
from artifex.ray.cluster import auth_env, dashboard_address, ray_executable, run_ray


def add_commands(sub) -> None:
    """Register ``artifex cluster start | status | stop``."""
    c = sub.add_parser("cluster", help="start, inspect and stop a Ray cluster (for artifex serve --ray)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csub = c.add_subparsers(dest="cluster", required=True)

    s = csub.add_parser("start", help="ray start: a head node (--head) or a node joining one (--address)")
    role = s.add_mutually_exclusive_group(required=True)
    role.add_argument("--head", action="store_true", help="start the head node of a new cluster")
    role.add_argument("--address", metavar="HOST:PORT", help="join the cluster whose head is at HOST:PORT")
    s.add_argument("--port", type=int, help="head only: the port of the head (Ray's default: 6379)")
    s.add_argument("--dashboard-port", type=int, help="head only: the dashboard's port (Ray's default: 8265)")
    s.add_argument("--dashboard-host", help="head only: the dashboard's address to bind (Ray's default: "
                                            "127.0.0.1; 0.0.0.0 to reach it from other machines)")
    s.add_argument("--num-gpus", type=int, help="GPUs this node offers (default: Ray counts them)")
    s.add_argument("--num-cpus", type=int, help="CPUs this node offers (default: Ray counts them)")
    s.add_argument("--temp-dir", type=Path, help="Ray's session files and logs (Ray's default: /tmp/ray)")
    s.set_defaults(func=cmd_start)

    st = csub.add_parser("status", help="ray status (nodes, resources, demands) and the dashboard address")
    st.add_argument("--address", metavar="HOST:PORT", help="the head (default: the cluster Ray finds here)")
    st.set_defaults(func=cmd_status)

    sp = csub.add_parser("stop", help="ray stop: every Ray process of this user on this machine")
    sp.add_argument("--force", action="store_true", help="SIGKILL instead of SIGTERM")
    sp.set_defaults(func=cmd_stop)


def _flags(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    """``--name=value`` for each of ``names`` given on the command line (dashes for underscores)."""
    return [f"--{n.replace('_', '-')}={getattr(args, n)}" for n in names if getattr(args, n) is not None]


def start_command(args: argparse.Namespace) -> list[str]:
    """The ``ray start`` command line of ``artifex cluster start``'s flags (checked)."""
    cmd = [str(ray_executable()), "start"]
    head_only = ("port", "dashboard_port", "dashboard_host")
    if args.head:
        cmd += ["--head", *_flags(args, head_only)]
    else:
        for flag in head_only:
            if getattr(args, flag) is not None:
                raise InvalidRequestError(flag, "is for the head node (--head); a joining node takes the head's "
                                                "--address only")
        cmd.append(f"--address={args.address}")
    for flag in ("num_gpus", "num_cpus", "port", "dashboard_port"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise InvalidRequestError(flag, f"must be >= 0, got {value}")
    cmd += _flags(args, ("num_gpus", "num_cpus"))
    if args.temp_dir is not None:
        cmd.append(f"--temp-dir={args.temp_dir.expanduser().resolve()}")
    return cmd


def _noted_auth_env() -> dict[str, str]:
    """``auth_env()``, saying on stderr what it set."""
    env, note = auth_env()
    if note:
        print(f"artifex cluster: {note}", file=sys.stderr)
    return env


def cmd_start(args: argparse.Namespace) -> int:
    cmd = start_command(args)
    return run_ray(cmd, None if args.head else _noted_auth_env())


def cmd_status(args: argparse.Namespace) -> int:
    cmd = [str(ray_executable()), "status"] + ([f"--address={args.address}"] if args.address else [])
    code = run_ray(cmd, _noted_auth_env())
    if code != 0:
        return code
    url = dashboard_address(args.address)
    print(f"Ray dashboard: {url or 'not running (start the head with ray[default] installed)'}", flush=True)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    return run_ray([str(ray_executable()), "stop"] + (["--force"] if args.force else []))
