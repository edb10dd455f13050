"""The seam every door drives the engine through: one ``Executor`` interface, several places an engine can live.

    executor = LocalExecutor()                       # or DistributedExecutor (a torch.distributed rank),
    executor.load("ti2v-5b", checkpoint, config)     #    WorldExecutor (ranks it starts), RayExecutor (an actor)
    executor.warm_up([(1280, 704, 121)])
    result = executor.generate(request, on_event)    # GenerationResult; the mp4 is at request.output, here
    executor.health(); executor.close()

Executors differ only in where the engine runs, how a call reaches it, and how its
process is watched. Loading, warm-up and generation are the engine's own; an executor
whose process died raises ``ExecutorLost`` (the request did nothing wrong: a server
queues it again), a request the engine refused raises the engine's own error (an
``ArtifexError``; from another process as ``RemoteError`` with the same code).
"""

from __future__ import annotations

import abc
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from artifex.errors import ArtifexError, GenerationCancelled, InvalidRequestError

if TYPE_CHECKING:
    from artifex.config import OptimizationConfig
    from artifex.engine.pipeline import Engine, EventCallback, GenerationResult
    from artifex.engine.request import GenerationRequest

log = logging.getLogger("artifex")

Shape = tuple[int | None, int | None, int | None]  # width, height, frames (None: the model's default)

# Loading is not thread-safe (accelerate's empty-weights context patches torch globally), and two warm-ups
# (compile) at once would only slow each other: engines of one process load and warm up one at a time.
LOAD_LOCK = threading.Lock()


class ExecutorLost(Exception):
    """The process holding an engine is gone (a dead Ray actor or rank, a lost node): the request did nothing
    wrong and may run again elsewhere."""


class RemoteError(ArtifexError):
    """An error raised by an engine in another process, carried back by code (``describe_error``'s)."""

    def __init__(self, code: str, message: str, param: str | None = None):
        self.code, self.param = code, param
        super().__init__(message)


def discard_outputs(result: GenerationResult) -> None:
    """Remove a result's mp4 and sidecar: a job whose cancel arrived after they were written (its engine's last
    check had passed) leaves nothing behind, as one cancelled in time does."""
    for p in (result.video_path, result.sidecar_path):
        if p is not None:
            Path(p).unlink(missing_ok=True)


def describe_error(e: BaseException) -> dict:
    """An error as plain data that crosses processes: {code, message, param}; codes: invalid_request (a field
    of the request), generation_error (another refusal of the engine), internal_error (anything else)."""
    if isinstance(e, RemoteError):
        return {"code": e.code, "message": str(e), "param": e.param}
    if isinstance(e, InvalidRequestError):
        return {"code": "invalid_request", "message": str(e), "param": e.field}
    if isinstance(e, ArtifexError):
        return {"code": "generation_error", "message": str(e), "param": None}
    return {"code": "internal_error", "message": f"{type(e).__name__}: {e}", "param": None}


def process_report(devices: list[int]) -> dict:
    """Memory and load of this process: resident memory, the node's load average, and per GPU (of
    ``devices``, CUDA indices as this process sees them) allocated / reserved / used / total bytes."""
    out: dict = {"pid": os.getpid(), "rss_bytes": None, "loadavg_1m": round(os.getloadavg()[0], 2), "gpus": []}
    try:
        with open("/proc/self/statm") as f:
            out["rss_bytes"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    if devices:
        import torch

        for i in devices:
            free, total = torch.cuda.mem_get_info(i)
            g = {"index": i, "name": torch.cuda.get_device_name(i), "allocated_bytes": torch.cuda.memory_allocated(i),
                 "reserved_bytes": torch.cuda.memory_reserved(i), "used_bytes": total - free, "total_bytes": total,
                 "utilization_percent": None}
            try:
                g["utilization_percent"] = torch.cuda.utilization(i)
            except Exception:  # no NVML (pip install artifex[gpu])
                pass
            out["gpus"].append(g)
    return out


def _warmup_image(path: Path, width: int, height: int) -> Path:
    """A structured synthetic picture for warming up image-conditioned models."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // max(width, 1), y * 255 // max(height, 1), ((x // 16 + y // 16) % 2) * 180], -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


def warm_up_requests(model: str, image_required: bool, folder: Path, shapes: Iterable[Shape] | None):
    """One two-step request per shape (first-call costs: compile, kernel choice), writing into ``folder``, marked
    ``warm_up`` (only its first latent frames decoded); an s2v model's with a 1 s tone as its audio (one clip)."""
    from artifex.engine.request import GenerationRequest, resolve_request
    from artifex.models.registry import get_model

    audio = None
    if get_model(model).task == "s2v":
        from artifex.models.s2v.audio import write_tone

        audio = str(write_tone(folder / f"{model}.wav", 1.0))
    for width, height, frames in shapes or ((None, None, None),):
        image = str(_warmup_image(folder / f"{model}.png", width or 832, height or 480)) if image_required else None
        req = GenerationRequest(model=model, prompt="warm-up", image=image, width=width, height=height,
                                frames=frames, steps=2, seed=0, output=str(folder / f"{model}.mp4"), audio=audio,
                                warm_up=True)
        resolve_request(req)
        yield req


class Executor(abc.ABC):
    """One engine and the way to reach it. ``identity`` says where it runs (kind, node, pid, gpus); ``report``
    is its last memory/load report (``health``)."""

    kind = "abstract"

    def __init__(self):
        self.model: str | None = None
        self.identity: dict = {"kind": self.kind, "node": os.uname().nodename, "pid": None, "gpus": []}
        self._report: dict = {}
        self.imports_s: float | None = None  # of the last load: the libraries' first import in the engine's process

    @property
    def report(self) -> dict:
        """The last memory/load report (cheap: no call to the engine's process)."""
        return self._report

    @abc.abstractmethod
    def load(self, model: str, checkpoint: str | None = None, config: OptimizationConfig | None = None,
             single_files: dict[str, str | None] | None = None) -> float:
        """Load ``model`` and plan how to run it; returns the seconds it took."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest, on_event: EventCallback | None = None,
                 output_dir: str | Path | None = None) -> GenerationResult:
        """One request to an mp4 and its sidecar (at ``request.output``, else a new file in ``output_dir``, on this
        machine). ``on_event`` may raise ``GenerationCancelled`` to stop it; nothing is written then."""

    @abc.abstractmethod
    def health(self) -> dict:
        """Memory and load of the engine's process(es) now; ``ExecutorLost`` when they are gone."""

    def warm_up(self, shapes: Iterable[Shape] | None = None, should_stop: Callable[[], bool] = lambda: False) -> float:
        """One two-step generation per shape before serving (the first call's compile and kernel choice)."""
        from artifex.models.registry import get_model

        t0 = time.perf_counter()
        folder = Path(tempfile.mkdtemp(prefix="artifex-warmup-"))
        try:
            for req in warm_up_requests(self.model, get_model(self.model).image == "required", folder, shapes):
                if should_stop():
                    break
                result = self.generate(req)
                log.debug("warm-up %s: %s", self.model, result.timings, extra={"model": self.model})
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return time.perf_counter() - t0

    def restart(self) -> None:
        """Drop a dead or unresponsive engine; the next ``load`` brings up a fresh one."""
        self.close()

    def close(self) -> None:  # noqa: B027  (nothing to free by default)
        """Free the engine (and its processes)."""


class LocalExecutor(Executor):
    """The engine in this process (one GPU, or the CPU)."""

    kind = "local"

    def __init__(self, engine: Engine | None = None):
        super().__init__()
        self.identity["pid"] = os.getpid()
        self.engine: Engine | None = None
        self.devices: list[int] = []  # the engine's CUDA device, if any
        if engine is not None:
            self._attach(engine)

    def _attach(self, engine: Engine) -> None:
        self.engine, self.model = engine, engine.spec.name
        if engine.device.type == "cuda":
            self.devices = [engine.device.index or 0]
            self.identity["gpus"] = [str(i) for i in self.devices]

    def load(self, model, checkpoint=None, config=None, single_files=None) -> float:
        from artifex import timeline

        t0, imported = time.perf_counter(), timeline.imports_s()
        with LOAD_LOCK:  # the libraries' lazy imports are not thread-safe either
            # torch and the engine's modules, the first time: the process's
            with timeline.PROCESS.span("imports"), timeline.importing():
                timeline.import_libraries()  # first, so that its groups hold the libraries and this one artifex's
                with timeline.IMPORTS.span("artifex.engine"):
                    from artifex.engine.pipeline import Engine
            engine = Engine.load(model, checkpoint=checkpoint, config=config, single_files=single_files)
        self.imports_s = round(timeline.imports_s() - imported, 4)
        self._attach(engine)
        log.info("loaded %s; plan: %s", model, engine.plan.to_dict(), extra={"model": model})
        return time.perf_counter() - t0

    def warm_up(self, shapes=None, should_stop=lambda: False) -> float:
        from artifex import timeline

        with LOAD_LOCK, timeline.PROCESS.span("warm_up"):  # the process's time, in every later sidecar's wall
            return super().warm_up(shapes, should_stop)

    def generate(self, request, on_event=None, output_dir=None):
        if self.engine is None:
            raise ExecutorLost("no engine loaded")
        return self.engine.generate(request, on_event=on_event, output_dir=output_dir)

    def health(self) -> dict:
        return process_report(self.devices)

    @property
    def report(self) -> dict:
        """Memory and load now (this process: cheap to read at any time)."""
        return process_report(self.devices)

    def restart(self) -> None:
        raise RuntimeError("an engine in this process cannot be restarted")

    def close(self) -> None:
        self.engine = None


class ExecutorPool(abc.ABC):
    """Where a server's engines come from: ``start`` once for the served models, then ``executors(model)`` gives
    the (unloaded) executors of one model, each driven by its own worker thread."""

    kind = "abstract"

    def start(self, models: list[str]) -> None:  # noqa: B027  (a local pool needs nothing)
        """Connect and check that every model's executors can be placed."""

    @abc.abstractmethod
    def executors(self, model: str) -> list[Executor]:
        """The executors of ``model`` (one per engine the pool runs for it)."""

    def info(self) -> dict:
        return {"kind": self.kind, "dashboard": None}

    def shutdown(self) -> None:  # noqa: B027
        """Give back what ``start`` took."""


class LocalPool(ExecutorPool):
    """One engine per served model, in this process."""

    kind = "local"

    def executors(self, model: str) -> list[Executor]:
        return [LocalExecutor()]


__all__ = ["Executor", "ExecutorLost", "ExecutorPool", "GenerationCancelled", "LocalExecutor", "LocalPool",
           "RemoteError", "describe_error", "process_report"]
