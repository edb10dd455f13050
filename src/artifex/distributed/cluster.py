"""``artifex cluster start | status | stop``: Ray's own ``ray start`` / ``ray status`` / ``ray stop``, run for you.

    artifex cluster start --head [--port 6379] [--dashboard-port 8265] [--num-gpus N] [--num-cpus N]
    artifex cluster start --address HEAD_IP:6379      # join this machine to the cluster of that head
    artifex cluster status [--address HEAD_IP:6379]   # ray status, then the dashboard's address
    artifex cluster stop                              # ray stop: every Ray process of this user on this machine

Each command prints the ``ray`` command it runs (the ``ray`` next to this Python) and exits
with its status. Ray clusters started with a token (``~/.ray/auth_token``) need it on
every machine that joins or connects: when ``RAY_AUTH_MODE`` is unset and a token is here,
``--address`` commands (and ``artifex serve --ray ADDR``) set ``RAY_AUTH_MODE=token``, as
Ray itself does for a cluster it finds on its own.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from artifex.errors import ArtifexError, InvalidRequestError

INSTALL_HINT = "pip install 'artifex[ray]'"


def ray_missing() -> ArtifexError:
    return ArtifexError(f"Ray is not installed in this environment ({sys.executable}): {INSTALL_HINT}")


def import_ray():
    """The ``ray`` module, or an error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ray_missing() from None
    return ray


def ray_executable() -> Path:
    """The ``ray`` command of this environment (beside ``sys.executable``)."""
    path = Path(sys.executable).with_name("ray")
    if not path.is_file():
        raise ray_missing()
    return path


def auth_env(environ: dict[str, str] | None = None) -> tuple[dict[str, str], str | None]:
    """The environment for talking to a cluster by address: ``RAY_AUTH_MODE=token`` when it is unset and
    a token is at hand (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``). Returns
    (environment, a note saying what was set, or None)."""
    env = dict(os.environ if environ is None else environ)
    if "RAY_AUTH_MODE" in env:
        return env, None
    path = Path(env.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if env.get("RAY_AUTH_TOKEN") or path.is_file():
        env["RAY_AUTH_MODE"] = "token"
        source = "RAY_AUTH_TOKEN" if env.get("RAY_AUTH_TOKEN") else str(path)
        return env, f"RAY_AUTH_MODE=token (the cluster token from {source})"
    return env, None


def use_cluster_token() -> str | None:
    """In this process: ``RAY_AUTH_MODE=token`` when ``auth_env`` says so, seen by Ray even if it was imported
    already (Ray reads the mode into its config at import; ``Config.initialize`` re-reads it, as Ray's own
    auto-detection does). Returns the note, or None when nothing changed."""
    env, note = auth_env()
    if note is None:
        return None
    os.environ["RAY_AUTH_MODE"] = env["RAY_AUTH_MODE"]
    if "ray" in sys.modules and sys.modules["ray"] is not None:
        from ray._raylet import Config

        Config.initialize("")
    return note


def _run(cmd: list[str], env: dict[str, str] | None = None) -> int:
    print(f"artifex cluster: running {shlex.join(cmd)}", file=sys.stderr, flush=True)
    return subprocess.run(cmd, env=env).returncode


def dashboard_address(address: str | None) -> str | None:
    """The Ray dashboard's URL of the cluster at ``address`` (None: the one Ray finds on this machine);
    None when the cluster runs without a dashboard."""
    import logging

    use_cluster_token()
    ray = import_ray()
    ctx = ray.init(address=address or "auto", log_to_driver=False, logging_level=logging.ERROR,
                   configure_logging=False)
    try:
        url = ctx.dashboard_url
    finally:
        ray.shutdown()
    return dashboard_url(url)


def dashboard_url(url: str | None) -> str | None:
    """Ray's ``dashboard_url`` (a bare HOST:PORT) as a URL; None when the cluster runs without a dashboard."""
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


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
    return _run(cmd, None if args.head else _noted_auth_env())


def cmd_status(args: argparse.Namespace) -> int:
    cmd = [str(ray_executable()), "status"] + ([f"--address={args.address}"] if args.address else [])
    code = _run(cmd, _noted_auth_env())
    if code != 0:
        return code
    url = dashboard_address(args.address)
    print(f"Ray dashboard: {url or 'not running (start the head with ray[default] installed)'}", flush=True)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    return _run([str(ray_executable()), "stop"] + (["--force"] if args.force else []))
