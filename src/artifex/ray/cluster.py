"""Ray cluster helpers: importing Ray with a clear error, Ray's own ``ray`` command, cluster tokens, the dashboard.

``artifex cluster start | status | stop`` (``artifex.cli.cluster``) runs Ray's ``ray start`` / ``ray status`` /
``ray stop`` for you:

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

import os
import shlex
import subprocess
import sys
from pathlib import Path

from artifex.errors import ArtifexError

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


def run_ray(cmd: list[str], env: dict[str, str] | None = None) -> int:
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
