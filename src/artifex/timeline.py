"""Where a process's time goes, from the moment it started: the clock every sidecar's ``wall`` section reads.

``start()`` is the process's start on the ``time.perf_counter`` clock: read from the kernel
(``/proc/self/stat``: the interpreter's own start-up counts), else the first import of
``artifex`` (which this module is imported by). Process-wide phases are added to one
``PROCESS`` timeline, each with the seconds it took:

- ``startup``: process start to ``artifex`` imported (interpreter, site packages);
- ``imports``: the heavy libraries (torch, diffusers, transformers and their model classes),
  the first time this process imports them;
- ``warm_up``: an executor's warm-up generations (a server's).

``IMPORTS`` splits ``imports`` by what ``import_libraries`` imported, group by group in its order (torch,
torch._dynamo, diffusers, diffusers.models, transformers, then the executor's artifex.engine): each group's
first import, its seconds beyond the groups before it (a group already imported costs nothing). What the
``imports`` phase took besides them is ``elsewhere`` in the wall section (in a CLI process: the request check's
scheduler import, the process's first import of torch and diffusers).

An engine's load stages (checkpoint check and read, plan, placement) are its own
(``Engine.load_timings``); a request's stages are its job's. ``wall_section`` puts the three
together: their sum is at most the process's age, and what is left is ``other_s``
(argument parsing, earlier requests of the same process, idle time between requests).

Torch-free: the CLI imports it before anything heavy.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import sys
import threading
import time

_IMPORTED = time.perf_counter()  # artifex imported (this module is imported by artifex/__init__.py)


def _kernel_start() -> float | None:
    """The process's start on the perf_counter clock, from /proc/self/stat (Linux), or None."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # after the command name, which may hold spaces
        ticks = int(fields[19])  # field 22 of proc(5): start time in clock ticks after boot
        hz = os.sysconf("SC_CLK_TCK")
        # Boot time on the same clock the kernel counts the start in (CLOCK_BOOTTIME), then onto perf_counter's.
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / hz
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    if not 0 <= age < 7 * 24 * 3600:
        return None
    return min(time.perf_counter() - age, _IMPORTED)


_KERNEL_START = _kernel_start()
START = _KERNEL_START if _KERNEL_START is not None else _IMPORTED
START_SOURCE = "process start (/proc/self/stat)" if _KERNEL_START is not None else "artifex imported"


class Timeline:
    """Named phases of a process and their seconds (a phase added twice adds up; a span inside a span of the same
    name, on the same thread, is counted once: by the outer one). Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._seconds: dict[str, float] = {}
        self._open = threading.local()

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self._seconds[name] = self._seconds.get(name, 0.0) + max(seconds, 0.0)

    @contextlib.contextmanager
    def span(self, name: str):
        """Time the block as phase ``name``."""
        open_names = self._open.__dict__.setdefault("names", set())
        if name in open_names:
            yield
            return
        open_names.add(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            open_names.discard(name)
            self.add(name, time.perf_counter() - t0)

    def to_dict(self) -> dict[str, float]:
        with self._lock:
            return {k: round(v, 4) for k, v in self._seconds.items()}


PROCESS = Timeline()
PROCESS.add("startup", _IMPORTED - START)
IMPORTS = Timeline()  # the ``imports`` phase by library group (import_libraries' and the executor's)


def start() -> float:
    return START


def age() -> float:
    """Seconds since the process started."""
    return time.perf_counter() - START


_IMPORTS_DONE = threading.Event()
_IMPORT_LOCK = threading.Lock()  # diffusers' lazy module is not safe to import from two threads at once


_GC_LOCK = threading.Lock()
_GC = {"depth": 0, "active": False, "eligible": None}


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off while a block imports the libraries, then every object alive frozen
    (``gc.freeze``: left out of all later collections) and the collector back on.

    Importing torch, diffusers and transformers builds ~440k long-lived objects, and each full collection while
    they pile up walks all of them: on a 2-core CPU, 7 full collections took 0.52 s of a tiny run's 3.1 s of
    imports; paused only, the same work comes back later as one large collection; paused and frozen, the whole
    run's collections took 0.04 s. The price: the cycles the imports leave unreachable are kept for the
    process's life (10k objects, ~7 MB there).

    Only a process whose first pause comes before it imports torch pauses at all, and only until
    ``import_libraries`` is done: what gets frozen is then the libraries' own objects and the caller's
    arguments, never a tensor or a model someone built (one frozen inside a reference cycle would never be freed).
    Pauses nest (the collector comes back after the outermost); a collector that was off stays off."""
    with _GC_LOCK:
        if _GC["eligible"] is None:
            _GC["eligible"] = "torch" not in sys.modules
        outer = _GC["depth"] == 0
        if outer:
            _GC["active"] = _GC["eligible"] and not _IMPORTS_DONE.is_set() and gc.isenabled()
            if _GC["active"]:
                gc.disable()
        _GC["depth"] += 1
    try:
        yield
    finally:
        with _GC_LOCK:
            _GC["depth"] -= 1
            if _GC["depth"] == 0 and _GC["active"]:
                _GC["active"] = False
                gc.freeze()
                gc.enable()


def _attributes(module: str, *names: str):
    def load() -> None:
        m = importlib.import_module(module)
        for name in names:  # the libraries' lazy modules import a class's module on first access
            getattr(m, name)
    return load


@contextlib.contextmanager
def importing():
    """A block that imports the libraries: the garbage collector paused (``gc_paused``) and importlib.metadata's
    map of packages to distributions answered from disk (``package_map.cached``)."""
    from artifex import package_map
    from artifex.env import read_env

    with gc_paused(), package_map.cached(read_env().home / "package-map.json"):
        yield


# What import_libraries imports, in order, as IMPORTS' groups. torch._dynamo is its own group: diffusers imports it
# unconditionally (diffusers.utils.torch_utils: ``from torch._dynamo import allow_in_graph``), so importing it
# first changes nothing but shows its share. diffusers' model families' packages, transformers.models and two of
# scipy's are deferred (lazy_packages).
def _diffusers() -> None:
    importlib.import_module("diffusers")
    from artifex.lazy_packages import defer_packages

    defer_packages()  # before the first model class: only the Wan classes' own modules import


LIBRARIES = (
    ("torch", _attributes("torch")),
    ("torch._dynamo", _attributes("torch._dynamo")),
    ("diffusers", _diffusers),
    ("diffusers.models", _attributes("diffusers", "AutoencoderKLWan", "WanTransformer3DModel")),
    ("transformers", _attributes("transformers", "AutoTokenizer", "UMT5EncoderModel")),
)


def import_libraries() -> None:
    """Import torch, diffusers, transformers and the Wan model classes once, timed as ``imports`` and by group
    in ``IMPORTS``, inside ``importing()`` (the collector paused, the package map from disk). The first call in a
    process pays; later ones return at once; concurrent callers wait for the first. diffusers and transformers
    load their model modules lazily: without this the import cost would be counted as checkpoint reading."""
    if _IMPORTS_DONE.is_set():
        return
    with _IMPORT_LOCK:
        if _IMPORTS_DONE.is_set():
            return
        if "diffusers" not in sys.modules:  # diffusers reads it once, at its import
            # Shards of one model read on threads (each safetensors file's tensors copied to their device in
            # parallel); HF_ENABLE_PARALLEL_LOADING=no in the environment keeps diffusers' serial read.
            os.environ.setdefault("HF_ENABLE_PARALLEL_LOADING", "yes")
        with PROCESS.span("imports"), importing():
            for name, load in LIBRARIES:
                with IMPORTS.span(name):
                    load()
        _IMPORTS_DONE.set()


def imports_s() -> float:
    """The ``imports`` phase of this process so far (an executor's load reads it before and after)."""
    return PROCESS.to_dict().get("imports", 0.0)


def imports_section() -> dict[str, float]:
    """The ``imports`` phase by group (``IMPORTS``), and ``elsewhere``: the rest of the phase."""
    groups = IMPORTS.to_dict()
    total = imports_s()
    return groups | {"elsewhere": round(max(total - sum(groups.values()), 0.0), 4)}


def wall_section(load: dict[str, float], request: dict[str, float]) -> dict:
    """The sidecar's ``wall`` section at this moment (just after the mp4 closed): the process's age, the process
    phases (``PROCESS``), the engine's ``load`` stages and the ``request``'s stages (seconds each), and
    ``other_s``: the rest of the process's time."""
    process_s = age()
    phases = PROCESS.to_dict()
    stages = {f"process.{k}": v for k, v in phases.items()}
    stages |= {f"load.{k}": v for k, v in load.items()}
    stages |= {f"request.{k}": v for k, v in request.items() if k != "total"}
    accounted = sum(stages.values())
    return {
        "clock": START_SOURCE,
        "process_s": round(process_s, 4),
        "stages_s": stages,
        "stages_sum_s": round(accounted, 4),
        "other_s": round(process_s - accounted, 4),
        "imports_s": imports_section(),  # process.imports by library group (not more stages: inside that one)
        "host_peak_rss_gib": host_peak_rss_gib(),  # a checkpoint read whole into host memory shows here
        # now, by kind: the peak above counts the safetensors pages a read mapped (file) as well as the process's
        # own memory (anon; pinned homes are anon too), and the kernel keeps no peak per kind
        "host_rss_gib": host_rss_gib(),
    }


def host_peak_rss_gib() -> float | None:
    """The most resident host memory this process has held so far (GiB), or None where it cannot be read."""
    try:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    except (ImportError, OSError):
        return None
    return round(kib / 2**20, 3)


def host_rss_gib() -> dict[str, float] | None:
    """This process's resident host memory now, by kind (GiB): anon (its own allocations), file (mapped files,
    e.g. safetensors shards being read), shmem; None where /proc/self/status is not there."""
    kinds = {"RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in kinds:
                    out[kinds[key]] = round(int(value.split()[0]) / 2**20, 3)  # kB
    except (OSError, ValueError, IndexError):
        return None
    return out or None


__all__ = ["IMPORTS", "LIBRARIES", "PROCESS", "START", "START_SOURCE", "Timeline", "age", "host_peak_rss_gib",
           "host_rss_gib", "gc_paused", "import_libraries", "importing", "imports_section", "start", "wall_section"]
