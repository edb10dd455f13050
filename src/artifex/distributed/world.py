"""A parallel layout served from one process: ``WorldExecutor`` starts the layout's ranks on this machine and drives
them, so a server (``artifex serve --layout 2x1``) can run CFG-parallel / Ulysses engines like any other.

    pool = WorldPool(ParallelLayout(cfg=2, ulysses=1))   # what artifex serve --layout 2x1 builds
    (executor,) = pool.executors("t2v-a14b")
    executor.load("t2v-a14b", checkpoint, config)        # spawns 2 ranks; each joins the world and loads
    result = executor.generate(request, on_event)        # every rank runs it; rank 0 writes the mp4

Each rank is a spawned process holding a ``DistributedExecutor`` (NCCL with one GPU per
rank when CUDA is there, gloo on the CPU otherwise) and a pipe to this process. Every
command goes to every rank in the same order, so their collectives match; rank 0 sends the
progress events and the result. Cancelling is agreed on by the ranks: at each denoising
step they all-reduce a cancel flag over a gloo group, so they stop at the same step. A rank
whose process died makes the executor raise ``ExecutorLost`` (the others are stopped; a
server queues the job again and starts fresh ranks).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import pickle
import random
import socket
import time

from artifex.distributed.layout import ParallelLayout
from artifex.engine.executor import Executor, ExecutorLost, ExecutorPool, RemoteError, describe_error, discard_outputs
from artifex.errors import GenerationCancelled, InvalidRequestError

log = logging.getLogger("artifex")

STOP_S = 30.0  # ranks not gone this long after close are killed


def parse_layout(text: str) -> ParallelLayout:
    """'CxU' (e.g. 2x1, 1x2, 2x2) -> ParallelLayout(cfg=C, ulysses=U)."""
    try:
        cfg, ulysses = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise InvalidRequestError("layout", f"must look like CFGxULYSSES, e.g. 2x1; got {text!r}") from None
    return ParallelLayout(cfg, ulysses)


def check_layout(layout: ParallelLayout, models: list[str], backend: str) -> str:
    """Refuse ``layout`` for any of ``models`` on this machine's GPUs (under NCCL) before a rank starts; returns
    the backend the ranks will use."""
    from artifex.distributed.groups import pick_backend
    from artifex.models.registry import get_model

    backend = pick_backend(backend)
    devices = None
    if backend == "nccl":
        import torch

        devices = torch.cuda.device_count()
    for m in models:
        layout.check(get_model(m), world_size=layout.world_size, devices=devices)
    return backend


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, layout: ParallelLayout, backend: str, conn, cancel, load: dict):
    """One rank: join the world, load, then run the commands of the pipe until "close"."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    from artifex.distributed.executor import DistributedExecutor

    if backend == "gloo" or not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the ranks share the CPU
    executor = DistributedExecutor(layout, backend)
    try:
        load_s = executor.load(**load)
        control = dist.new_group(backend="gloo")  # the cancel vote, on the CPU whatever the backend
    except Exception as e:
        conn.send(("error", describe_error(e)))
        executor.close()
        return
    conn.send(("loaded", load_s, executor.engine.spec.experts))

    def vote(stop: bool) -> bool:
        flag = torch.tensor([1 if stop else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control)
        return bool(flag.item())

    try:
        while True:
            command, *args = conn.recv()
            if command == "close":
                break
            if command == "health":
                conn.send(("health", executor.health()))
                continue
            request, output_dir = args

            def on_event(e) -> None:
                if e.stage == "denoise" and vote(cancel.is_set()):  # every rank emits each step: they agree
                    raise GenerationCancelled(f"cancelled at step {e.step}")
                if rank == 0:
                    conn.send(("event", e))

            try:
                result = executor.generate(request, on_event=on_event, output_dir=output_dir)
            except GenerationCancelled:
                conn.send(("cancelled",))
            except Exception as e:
                conn.send(("error", describe_error(e)))
            else:  # plain pickle: the tensors travel as bytes, not as shared-memory handles
                conn.send(("result", pickle.dumps(result) if rank == 0 else None))
    except (EOFError, KeyboardInterrupt):  # the parent is gone
        pass
    finally:
        executor.close()


class WorldExecutor(Executor):
    """The ranks of ``layout`` on this machine, started by ``load`` and driven from this process."""

    kind = "torch.distributed"

    def __init__(self, layout: ParallelLayout, backend: str = "auto"):
        super().__init__()
        self.layout, self.backend = layout, backend
        self._procs: list = []
        self._conns: list = []
        self._cancel = None
        self.identity.update(layout=layout.describe(), world_size=layout.world_size)

    def load(self, model, checkpoint=None, config=None, single_files=None) -> float:
        t0 = time.perf_counter()
        backend = check_layout(self.layout, [model], self.backend)
        self.close()
        self.model = model
        ctx = mp.get_context("spawn")
        self._cancel = ctx.Event()
        port = _free_port()
        load = {"model": model, "checkpoint": checkpoint, "config": config, "single_files": single_files}
        for rank in range(self.layout.world_size):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_rank_main, name=f"artifex-rank-{rank}", daemon=True,
                            args=(rank, self.layout.world_size, port, self.layout, backend, child, self._cancel, load))
            p.start()
            child.close()
            self._procs.append(p)
            self._conns.append(parent)
        self.identity.update(pid=self._procs[0].pid, pids=[p.pid for p in self._procs], backend=backend)
        replies = [self._recv(rank) for rank in range(len(self._conns))]
        for reply in replies:
            if reply[0] == "error":
                self.close()
                raise RemoteError(**reply[1])
        log.info("%s: %s on %d ranks (%s)", model, self.layout.describe(), self.layout.world_size, backend)
        return time.perf_counter() - t0

    def _recv(self, rank: int):
        """The next message of ``rank``; ``ExecutorLost`` when any rank's process is gone (the others would wait in
        a collective for it forever: they are stopped)."""
        conn = self._conns[rank]
        while not conn.poll(0.2):
            dead = [i for i, p in enumerate(self._procs) if not p.is_alive()]
            if dead:
                codes = {i: self._procs[i].exitcode for i in dead}
                self._kill()
                raise ExecutorLost(f"rank(s) {dead} of {self.layout.describe()} exited ({codes})")
        try:
            return conn.recv()
        except (EOFError, OSError) as e:
            self._kill()
            raise ExecutorLost(f"rank {rank} of {self.layout.describe()} is gone ({type(e).__name__})") from None

    def _send_all(self, *message) -> None:
        if not self._conns:
            raise ExecutorLost("no ranks running")
        try:
            for conn in self._conns:
                conn.send(message)
        except (BrokenPipeError, OSError) as e:
            self._kill()
            raise ExecutorLost(f"a rank of {self.layout.describe()} is gone ({type(e).__name__})") from None

    def generate(self, request, on_event=None, output_dir=None):
        from artifex.engine.request import MAX_SEED

        if request.seed is None:  # drawn here: every rank gets the same request
            request = dataclasses.replace(request, seed=random.SystemRandom().randint(0, MAX_SEED))
        self._cancel.clear()
        self._send_all("generate", request, None if output_dir is None else str(output_dir))
        cancelled = False
        while True:
            reply = self._recv(0)
            if reply[0] != "event":
                break
            if on_event is not None and not cancelled:
                try:
                    on_event(reply[1])
                except GenerationCancelled:
                    cancelled = True
                    self._cancel.set()
        replies = [reply] + [self._recv(rank) for rank in range(1, len(self._conns))]
        for r in replies:
            if r[0] == "error":
                raise RemoteError(**r[1])
        if reply[0] == "cancelled":
            raise GenerationCancelled("cancelled by the caller")
        result = pickle.loads(reply[1])
        if cancelled:  # the cancel came after the ranks' last check: rank 0 wrote the files, which go
            discard_outputs(result)
            raise GenerationCancelled("cancelled by the caller after its video was written")
        return result

    def health(self) -> dict:
        self._send_all("health")
        reports = [self._recv(rank)[1] for rank in range(len(self._conns))]
        report = {**reports[0], "ranks": [{"pid": r["pid"], "rss_bytes": r["rss_bytes"]} for r in reports],
                  "gpus": [g for r in reports for g in r["gpus"]]}
        self._report = report
        return report

    def _kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(5)
        self._procs, self._conns = [], []

    def close(self) -> None:
        if not self._procs:
            return
        try:
            for conn in self._conns:
                conn.send(("close",))
        except (BrokenPipeError, OSError):
            pass
        deadline = time.monotonic() + STOP_S
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
        self._kill()


class WorldPool(ExecutorPool):
    """One ``WorldExecutor`` of ``layout`` per served model (under NCCL rank i uses GPU i: served models share
    the GPUs)."""

    kind = "torch.distributed"

    def __init__(self, layout: ParallelLayout, backend: str = "auto"):
        self.layout, self.backend = layout, backend

    def start(self, models: list[str]) -> None:
        check_layout(self.layout, models, self.backend)

    def executors(self, model: str) -> list[Executor]:
        return [WorldExecutor(self.layout, self.backend)]

    def info(self) -> dict:
        return {"kind": self.kind, "layout": self.layout.describe(), "world_size": self.layout.world_size,
                "backend": self.backend, "dashboard": None}
