"""A GPU-resident load's weights read to the GPU on a thread while the process still imports its libraries.

A CLI run imports torch, then diffusers, transformers and their Wan model classes (single-threaded Python, seconds)
before ``Engine.load`` reads the first weight; with torch imported, the GPU and the copy engine are idle all that
time. ``start(checkpoint, config)`` is called once torch can be imported and the config is known: where the load
will most likely keep every component on the GPU (no ``vram_budget``, no offload or swap tier asked for, no fp8
weights, the files' bytes well inside the GPU's free memory), a daemon thread reads each component's safetensors
there with ``fast_read`` (the loader's order: DiT experts, VAE, text encoder), in the files' own dtypes.

The load then decides as it always does (``plan_before_load``, ``load_devices``); ``fast_read.read_safetensors``
asks ``take(path, device)`` for each file before reading it, waits for a file still being read, and casts what it
gets exactly as it casts what it reads itself. A file read for another device than the plan chose, or one the
loader did not ask for (a component the tier keeps in host memory, a checkpoint read by the libraries' own
readers), is dropped by ``finish()`` at the end of the load. A failed read (a corrupt file) is dropped too: the
loader reads that file itself and reports it.

The planner is not misled by what the thread holds: it plans with free plus allocated memory.
``ARTIFEX_READ_AHEAD=off`` turns it off. ``report()`` is the sidecar's ``read_ahead`` section.

Torch-free at import: the CLI imports it before anything heavy.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from artifex import timeline
from artifex.env import positive_int, switch

log = logging.getLogger("artifex")

GIB = 2**30
# The thread reads only where the files leave this much of the GPU's free memory for everything else the run
# needs (activations, the decode): a quarter of the card, at least RESERVE_MIN.
RESERVE_FRACTION = 0.25
RESERVE_MIN = 8 * GIB
# The thread's readers (ARTIFEX_READ_AHEAD_THREADS; fast_read's 16 MiB chunks). Each chunk's Python work takes the
# GIL from the imports it overlaps (likely; not profiled): at 8 the imports took ~0.8 s longer on an H100 host, and
# the load 1.1-1.2 s less (benchmarks/probes/probe13-h100-run1.json). Fewer readers: not measured yet (probe13's
# on-4-threads and on-2-threads modes).
THREADS = 8
# Component folders of a diffusers-layout checkpoint in load order.
COMPONENTS = ("transformer", "transformer_2", "vae", "text_encoder")


def enabled() -> bool:
    return switch("ARTIFEX_READ_AHEAD")


def why_not(checkpoint, config, single_files: dict | None = None) -> str | None:
    """Why a load of ``checkpoint`` under ``config`` will not keep everything on the GPU as read, or None."""
    if not enabled():
        return "ARTIFEX_READ_AHEAD=off"
    if not switch("ARTIFEX_FAST_READ"):  # fast_read.enabled(), without importing torch yet
        return "ARTIFEX_FAST_READ=off"
    if checkpoint is None or not (Path(checkpoint).expanduser() / "transformer").is_dir():
        return "not a local diffusers-layout checkpoint directory"
    if config.device == "cpu":
        return "device cpu"
    if config.vram_budget:
        return "vram_budget set: the tier may keep components in host memory"
    if config.requested_tier() not in ("auto", "resident"):
        return "an offload or swap tier asked for"
    if config.fp8_weights:
        return "fp8_weights: the experts are cast in host memory"
    if any(single_files.values() if single_files else ()):
        return "single-file components"
    return None


class ReadAhead:
    """One checkpoint's files being read to one GPU on a daemon thread."""

    def __init__(self, root: Path, config, device=None):
        self.root, self.config = root, config
        self.device = device  # None: the config's GPU, once the thread finds one
        self.sizes: dict[Path, int] = {}  # the files to read (in load order) and their bytes
        self.total = 0
        self.state, self.reason, self.error = "starting", None, None
        self.read_bytes = self.taken_bytes = self.dropped_bytes = 0
        self.started_s = timeline.age()
        self.ended_s: float | None = None
        self.waited = 0.0
        self._held: dict[Path, tuple[list[str], list]] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._planned = self._finished = False
        self._thread = threading.Thread(target=self._run, name="artifex-read-ahead", daemon=True)
        self._thread.start()

    def _plan(self) -> None:
        import torch

        from artifex.models.loader import component_weight_files

        if self.device is None:
            if not torch.cuda.is_available():
                raise _Skip("no CUDA device")
            name = self.config.device  # as the plan resolves it (engine.plan.resolve_device), a bad one left to it
            device = torch.device("cuda" if name == "auto" else name)
            if device.type != "cuda" or (device.index or 0) >= torch.cuda.device_count():
                raise _Skip(f"device {name}")
            self.device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        sizes = {f.resolve(): f.stat().st_size for folder in COMPONENTS if (self.root / folder).is_dir()
                 for f in component_weight_files(self.root / folder)}
        with self._cond:
            self.sizes, self._planned = sizes, True
            self._cond.notify_all()
        self.total = sum(sizes.values())
        if self.device.type != "cuda":  # a test's CPU
            return
        free, card = torch.cuda.mem_get_info(self.device)
        reserve = max(RESERVE_FRACTION * card, RESERVE_MIN)
        if self.total + reserve > free:
            raise _Skip(f"{self.total / GIB:.1f} GiB of weights would leave less than {reserve / GIB:.1f} GiB of "
                        f"the {free / GIB:.1f} GiB free on {self.device}")

    def _run(self) -> None:
        try:
            threads = positive_int("ARTIFEX_READ_AHEAD_THREADS", THREADS)
            self._plan()
            from artifex.models import fast_read

            self.state = "reading"
            for path, size in self.sizes.items():
                if self._stop.is_set():
                    break
                state = fast_read.read_safetensors([path], self.device, lambda _name, dtype: dtype, ahead=False,
                                                   threads=threads)
                with self._cond:
                    self._held[path] = (list(state), list(state.values()))
                    self.read_bytes += size
                    self._cond.notify_all()
                del state
            self.state = "stopped" if self._stop.is_set() and self.read_bytes < self.total else "done"
        except _Skip as e:
            self.state, self.reason = "skipped", str(e)
        except Exception as e:  # noqa: BLE001 (the loader reads what is missing itself, and reports it)
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
            log.info("read-ahead stopped: %s; the load reads the rest itself", self.error)
        finally:
            self.ended_s = timeline.age()
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def take(self, path: Path, device) -> tuple[list[str], list] | None:
        """The names and tensors of ``path`` read to ``device``, waiting while that file is being read; None when
        this read-ahead does not hold it (another device, skipped, failed, a file it was not reading)."""
        path = Path(path).resolve()
        t0 = time.perf_counter()
        with self._cond:  # until the file is read, or it never will be
            while not (self._finished or self._planned and (path not in self.sizes or path in self._held)):
                self._cond.wait()
            self.waited += time.perf_counter() - t0
            if device != self.device or path not in self._held:
                return None
            self.taken_bytes += self.sizes[path]
            return self._held.pop(path)

    def finish(self) -> None:
        """Stop after the file being read, and drop every file nobody took."""
        self._stop.set()
        self._thread.join()
        with self._cond:
            self.dropped_bytes = sum(self.sizes[p] for p in self._held)
            self._held.clear()
        if self.dropped_bytes:
            log.info("read-ahead: %.1f GiB read to %s were not loaded there; dropped", self.dropped_bytes / GIB,
                     self.device)

    def report(self) -> dict:
        out = {"state": self.state, "device": str(self.device) if self.device else None, "files": len(self.sizes),
               "gib": round(self.total / GIB, 3)}
        if self.reason:
            return out | {"reason": self.reason}
        out |= {"read_gib": round(self.read_bytes / GIB, 3), "taken_gib": round(self.taken_bytes / GIB, 3),
                "dropped_gib": round(self.dropped_bytes / GIB, 3), "started_at_s": round(self.started_s, 4),
                "ended_at_s": None if self.ended_s is None else round(self.ended_s, 4),
                "load_waited_s": round(self.waited, 4)}
        return out | ({"error": self.error} if self.error else {})


class _Skip(Exception):
    pass


_LOCK = threading.Lock()
_CURRENT: list[ReadAhead] = []
_LAST: dict = {}


def start(checkpoint, config, single_files: dict | None = None, device=None) -> ReadAhead | None:
    """Read ``checkpoint``'s weights to the GPU ``config`` runs on, on a thread, where the load will most likely keep
    them all there (``why_not``); one at a time (``finish`` ends it). Imports torch (the caller's next import
    would anyway). ``device``: read there instead (the tests' CPU)."""
    with _LOCK:
        if _CURRENT:
            return _CURRENT[0]
        _LAST.clear()
        reason = why_not(checkpoint, config, single_files)
        if reason is not None:
            _LAST.update(state="skipped", reason=reason)
            return None
        with timeline.PROCESS.span("imports"), timeline.importing():
            import torch  # noqa: F401 (here, not on the thread: two threads importing torch at once can deadlock)
        _CURRENT.append(ReadAhead(Path(checkpoint).expanduser().resolve(), config, device))
        return _CURRENT[0]


def take(path: Path, device) -> tuple[list[str], list] | None:
    """``ReadAhead.take`` of the read-ahead under way, or None where there is none."""
    with _LOCK:
        current = _CURRENT[0] if _CURRENT else None
    return current.take(path, device) if current is not None else None


def finish() -> None:
    """The load is done: stop the read-ahead, drop what it read and nobody took, keep its report."""
    with _LOCK:
        current = _CURRENT.pop() if _CURRENT else None
    if current is not None:
        current.finish()
        _LAST.update(current.report())


def report() -> dict | None:
    """The sidecar's ``read_ahead`` section: the read-ahead under way or finished, or why none ran; None where none
    was asked for (no CLI start)."""
    with _LOCK:
        current = _CURRENT[0] if _CURRENT else None
    return current.report() if current is not None else (dict(_LAST) or None)
