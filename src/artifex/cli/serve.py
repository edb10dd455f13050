"""``artifex serve`` and ``artifex monitor``.

Heavy imports (FastAPI, uvicorn, torch) happen inside the commands, so ``artifex --help``
stays fast. Where the engines run is an executor pool: this process (default), Ray actors
(``--ray``), or torch.distributed ranks this server starts for a multi-GPU layout
(``--layout CxU``).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path

from artifex.cli.common import add_config_flags, add_request_flags, config_flags
from artifex.env import read_env
from artifex.errors import InvalidRequestError
from artifex.models import prefetch, read_ahead

log = logging.getLogger("artifex.serve")

_FLAG_SETTINGS = ("host", "port", "max_queue", "max_steps", "max_frames", "max_width", "max_height", "max_attempts",
                  "max_prompt_chars", "max_image_pixels", "max_audio_seconds")


def default_data_dir() -> Path:
    return read_env().home / "serve"


def _checkpoint(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--checkpoint must look like MODEL=PATH_OR_HUB_ID, got {text!r}")
    return name.strip().lower(), path


def _lora_set(text: str) -> tuple[str, str]:
    name, sep, specs = text.partition("=")
    if not sep or not name.strip() or not specs.strip():
        raise argparse.ArgumentTypeError(f"--lora-set must look like NAME=[high=|low=]FILE[:SCALE][,...], got {text!r}")
    return name.strip().lower(), specs


def _shape(text: str) -> tuple[int, int, int]:
    try:
        w, h, f = (int(x) for x in text.lower().split("x"))
        return w, h, f
    except ValueError:
        raise argparse.ArgumentTypeError(f"warm-up shape must look like WIDTHxHEIGHTxFRAMES, got {text!r}") from None


def add_commands(sub) -> None:
    """Register ``serve`` and ``monitor`` on the ``artifex`` subparsers."""
    s = sub.add_parser("serve", help="run the HTTP video-generation service (jobs, progress, web page, metrics)",
                       description="Serve models over HTTP: a persistent job queue (SQLite in the data directory), "
                                   "progress as server-sent events, the OpenAI Videos API shape, a web page at /, "
                                   "Prometheus /metrics. A bearer token is required unless --no-auth (loopback only).")
    s.add_argument("--model", action="append", required=True, metavar="NAME",
                   help="a model to serve (repeatable); tiny ones (tiny-ti2v, ...) run on a CPU")
    s.add_argument("--checkpoint", action="append", type=_checkpoint, default=[], metavar="MODEL=PATH",
                   help="checkpoint directory or hub id of a model (repeatable; default: the model's own)")
    s.add_argument("--lora-set", action="append", type=_lora_set, default=[], metavar="NAME=SPECS",
                   help="a LoRA set requests may name (\"lora\": NAME), e.g. lightning=high=h.safetensors,"
                        "low=l.safetensors (repeatable; [serve.loras] in --config too); switching sets reloads the "
                        "engine with them fused (the time is in the job's timings as lora_switch)")
    s.add_argument("--host", help="address to bind (default: 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default: 8000)")
    s.add_argument("--data-dir", type=Path, help="jobs database, outputs, uploads, token "
                                                 "(default: $ARTIFEX_HOME/serve)")
    s.add_argument("--token-file", type=Path, help="file holding the API token (default: $ARTIFEX_API_TOKEN, "
                                                   "else <data dir>/api_token, generated on the first start)")
    s.add_argument("--no-auth", action="store_true", help="no token (allowed only when --host is a loopback address)")
    s.add_argument("--max-queue", type=int, help="queued jobs before 429 + Retry-After (default: 64)")
    s.add_argument("--max-disk", help="disk cap for finished videos, e.g. 50G; oldest evicted first; 0 = none "
                                      "(default: 50G)")
    s.add_argument("--max-steps", type=int, help="request limit (default: 100)")
    s.add_argument("--max-frames", type=int, help="request limit (default: 121)")
    s.add_argument("--max-width", type=int, help="request limit (default: 1280)")
    s.add_argument("--max-height", type=int, help="request limit (default: 1280)")
    s.add_argument("--max-upload-mb", type=float, help="largest image upload (default: 20)")
    s.add_argument("--max-media-mb", type=float, help="largest audio or pose-video upload, s2v models (default: 50)")
    s.add_argument("--max-audio-seconds", type=int, help="longest audio accepted, s2v models (default and most: 600)")
    s.add_argument("--max-image-pixels", type=int, help="largest image in pixels (default: 40 million)")
    s.add_argument("--max-prompt-chars", type=int, help="longest prompt (default: 4000)")
    s.add_argument("--max-attempts", type=int, help="runs of a job interrupted by crashes before it fails "
                                                    "(default: 3)")
    s.add_argument("--warmup-shape", action="append", type=_shape, default=[], metavar="WxHxF",
                   help="warm up at this shape before ready (repeatable; default: each model's default shape)")
    s.add_argument("--no-warmup", action="store_true", help="report ready without a warm-up generation")
    w = s.add_argument_group("multi-GPU layout (torch.distributed ranks started by the server)")
    w.add_argument("--layout", metavar="CxU", help="serve each model on cfg x ulysses ranks of this machine, e.g. 2x1 "
                   "(CFG-parallel) or 1x2 (Ulysses); one GPU per rank with CUDA, else gloo processes on the CPU")
    w.add_argument("--layout-backend", default="auto", choices=["auto", "gloo", "nccl"],
                   help="torch.distributed backend of the layout's ranks (default: nccl with CUDA, else gloo)")
    r = s.add_argument_group("Ray cluster (pip install 'artifex[ray]')")
    r.add_argument("--ray", metavar="auto|HOST:PORT",
                   help="run the engines as Ray actors: auto = the cluster running on this machine, else a local "
                        "one; HOST:PORT = the cluster of that head (artifex cluster start)")
    r.add_argument("--ray-workers", type=int, metavar="N",
                   help="actors per served model (default: every GPU group of the cluster, shared among the "
                        "models; 1 on a cluster without GPUs)")
    r.add_argument("--ray-gpus-per-worker", type=int, metavar="G",
                   help="GPUs per actor: 1, 2 (the model split over two GPUs of one node), or 0 for CPU actors "
                        "(default: 1 when the cluster has GPUs, else 0)")
    s.add_argument("--debug", action="store_true", help="verbose (DEBUG) logs")
    s.add_argument("--log-format", choices=("json", "text"), default="json", help="log lines (default: json)")
    add_config_flags(s)
    s.set_defaults(func=cmd_serve)

    m = sub.add_parser("monitor", help="show a running server's queue, jobs, stage times and GPU live")
    server_flags(m)
    m.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    m.add_argument("--once", action="store_true", help="print one snapshot and exit")
    m.set_defaults(func=cmd_monitor)

    c = sub.add_parser("submit", help="generate on a running artifex serve (its model loaded and warm: the job "
                                      "costs its stages only); the mp4 is downloaded here",
                       description=SUBMIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    server_flags(c)
    add_request_flags(c, "a model the server serves (GET /api/models)")
    c.add_argument("--lora", help="a LoRA set the server registered")
    c.add_argument("--output", type=Path, help="mp4 path (default: <output dir>/<job id>.mp4)")
    c.add_argument("--no-wait", action="store_true", help="print the job's id once it is queued, and exit")
    c.set_defaults(func=cmd_submit)


SUBMIT_HELP = """One generation on a running `artifex serve`, which has imported the libraries, loaded the model
and warmed it up once: the job costs its stages only, where `artifex generate` first pays a fresh process's
imports and load. This command imports no torch. Inputs (--image, --audio, --pose-video) are sent as base64
data: URLs within the server's upload limits; progress is printed per stage and every 10% of the denoise; the
mp4's path goes to stdout. Ctrl-C cancels the job on the server. Exit status: 0 with the video written, 1 when
the job failed or was cancelled, 2 for a request the server refused or a server that cannot be reached.
"""

# JobCreate's fields that come straight from a flag of the same name
SUBMIT_FIELDS = ("model", "prompt", "negative_prompt", "preset", "frames", "steps", "guidance", "guidance_low",
                 "shift", "sampler", "timesteps", "sigmas", "switch_step", "lora", "seed")


def server_flags(p: argparse.ArgumentParser) -> None:
    """Where a server client (monitor, submit) finds the server and its API token."""
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: http://127.0.0.1:8000)")
    p.add_argument("--token-file", type=Path, help="file holding the API token (default: $ARTIFEX_API_TOKEN, "
                                                   "else <data dir>/api_token)")
    p.add_argument("--data-dir", type=Path, help="the server's data directory, to read its token "
                                                 "(default: $ARTIFEX_HOME/serve)")


def client_token(args: argparse.Namespace) -> str | None:
    """The API token a client sends: $ARTIFEX_API_TOKEN, else --token-file, else the data directory's token file
    (None where none exists: a server run with --no-auth)."""
    from artifex.serve.auth import TOKEN_FILE_NAME

    token = read_env().api_token
    if not token:
        path = args.token_file or (args.data_dir or default_data_dir()) / TOKEN_FILE_NAME
        if path.exists():
            token = path.read_text().strip()
    return token


def build_serve_config(args: argparse.Namespace):
    """(OptimizationConfig, ServeSettings): defaults < $ARTIFEX_CONFIG < --config < flags."""
    from artifex.config import OptimizationConfig
    from artifex.serve.settings import ServeSettings, load_config_file, parse_bytes

    config, serve_file = OptimizationConfig(), {}
    env = read_env()
    for path in (env.config, getattr(args, "config", None)):
        if path:
            config, serve_file = load_config_file(path, config, serve_file)
    config = config.merged(config_flags(args))

    settings = ServeSettings(
        models=tuple(dict.fromkeys(m.strip().lower() for m in args.model)),
        data_dir=(args.data_dir or default_data_dir()).expanduser().resolve(),
        checkpoints=dict(args.checkpoint), auth=not args.no_auth, token_file=args.token_file,
    ).merged(serve_file)
    overrides = {k: getattr(args, k) for k in _FLAG_SETTINGS if getattr(args, k) is not None}
    if args.max_disk is not None:
        overrides["max_disk"] = parse_bytes(args.max_disk, "max_disk")
    for flag, key in (("max_upload_mb", "max_upload_bytes"), ("max_media_mb", "max_media_bytes")):
        mib = getattr(args, flag)
        if mib is not None:
            if not math.isfinite(mib) or mib <= 0:
                raise InvalidRequestError(flag, f"must be a positive number of MiB, got {mib}")
            overrides[key] = int(mib * 2**20)
    if args.warmup_shape:
        overrides["warmup_shapes"] = tuple(args.warmup_shape)
    if args.lora_set:
        overrides["loras"] = {**settings.loras, **dict(args.lora_set)}
    if args.no_warmup:
        overrides["warmup"] = False
    if args.debug:
        overrides["debug"] = True
    settings = settings.merged(overrides)
    from artifex.models.registry import get_model

    for name in settings.models:
        if not get_model(name).runnable:
            raise InvalidRequestError("model", f"{name} cannot be served: its pipeline is not built yet")
    for name in settings.checkpoints:
        if name not in settings.models:
            raise InvalidRequestError("checkpoint", f"{name} is not among the served models", settings.models)
    return config, settings


def start_reading(args: argparse.Namespace, settings, config) -> None:
    """While the server starts and imports: the first model's checkpoint into the page cache (``prefetch``) where
    this process loads it (not with Ray), and its weights onto the GPU (``read_ahead``) where this process keeps
    them: not for the ranks of a layout (their own processes load), nor for several models (another's load may come
    first and drop what it read)."""
    if getattr(args, "ray", None) or not settings.models:
        return
    checkpoint = settings.checkpoints.get(settings.models[0])
    prefetch.start(checkpoint)
    if not getattr(args, "layout", None) and len(settings.models) == 1:
        read_ahead.start(checkpoint, config)


def cmd_serve(args: argparse.Namespace) -> int:
    from artifex.serve.auth import check_no_auth, resolve_token
    from artifex.serve.logs import setup_logging

    setup_logging(args.debug or getattr(args, "verbose", False), args.log_format, read_env().log_level)
    config, settings = build_serve_config(args)
    config.check_supported()
    if not settings.auth:
        check_no_auth(settings.host)
        token = None
    else:
        token, source = resolve_token(settings.data_dir, settings.token_file)
        log.info("API token from %s", source)
    start_reading(args, settings, config)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log.info("environment: %s", {k: os.environ.get(k) for k in ("PYTORCH_CUDA_ALLOC_CONF", "TOKENIZERS_PARALLELISM",
                                                               "CUDA_VISIBLE_DEVICES")})
    log.debug("serve settings: %s; config: %s", settings, config.to_dict())

    import uvicorn

    from artifex.serve.app import create_app
    from artifex.serve.service import Service

    service = Service(settings, config, token, pool=build_pool(args, settings))
    app = create_app(service)
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=True,
                timeout_graceful_shutdown=3, server_header=False,
                log_level="debug" if settings.debug else "info")
    return 0


def build_pool(args: argparse.Namespace, settings):
    """Where the engines run: ``--ray`` a started ``RayPool`` (connected, its groups checked); ``--layout`` a
    ``WorldPool`` (ranks of this machine per model); else None (engines in this process)."""
    if args.layout and args.ray:
        raise InvalidRequestError("layout", "a torch.distributed layout runs on this machine's ranks; Ray places "
                                  "one engine per actor: choose --layout or --ray")
    if args.layout:
        from artifex.distributed.world import WorldPool, parse_layout

        pool = WorldPool(parse_layout(args.layout), backend=args.layout_backend)
        pool.start(list(settings.models))
        return pool
    if not args.ray:
        for flag in ("ray_workers", "ray_gpus_per_worker"):
            if getattr(args, flag) is not None:
                raise InvalidRequestError(flag, "is for Ray workers; add --ray auto or --ray HOST:PORT")
        return None
    from artifex.ray.executor import RayPool

    pool = RayPool(args.ray, workers=args.ray_workers, gpus_per_worker=args.ray_gpus_per_worker)
    pool.start(list(settings.models))
    log.info("Ray cluster %s, dashboard %s", pool.gcs_address, pool.dashboard or "not running")
    return pool


def cmd_monitor(args: argparse.Namespace) -> int:
    from artifex.serve import monitor

    try:
        return monitor.run(args.url, client_token(args), args.interval, args.once)
    except KeyboardInterrupt:
        return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from artifex.serve import client

    body = {k: getattr(args, k) for k in SUBMIT_FIELDS if getattr(args, k) is not None}
    if args.size:
        body["size"] = "{}x{}".format(*args.size)
    for field in ("image", "audio", "pose_video"):
        if getattr(args, field) is not None:
            body[field] = client.data_url(Path(getattr(args, field)), field)
    return client.run(client.Client(args.url, client_token(args)), body, args.output, read_env().output_dir,
                      wait=not args.no_wait)
