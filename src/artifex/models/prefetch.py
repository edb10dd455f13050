"""A checkpoint's weight files read into the operating system's page cache while the process is still importing
its libraries, so that the load that follows reads memory instead of the disk.

A CLI run spends its first seconds importing torch, diffusers and transformers (single-threaded Python) before
the first weight is read; the disk is idle all that time. ``start(path)`` reads the weight files in the order the
loader asks for them (the DiT experts, the VAE, the text encoder) on a daemon thread, in large chunks (each read
releases the GIL, so the imports keep their core). A checkpoint already cached reads at memory speed and costs a
core for a second or two; one on a cold disk arrives while the imports run.

It reads nothing when the host has too little memory to keep the files cached (``MemAvailable`` short of their
size plus a margin: the reads would evict each other), when ``ARTIFEX_PREFETCH=off``, or when the checkpoint is
not a local directory. ``stop()`` ends it once the load is done. ``report()`` is the sidecar's ``prefetch``
section. ``evict(path)`` drops the files from the page cache (``posix_fadvise(DONTNEED)``): the benchmarks' cold
runs.

Torch-free: the CLI starts it before importing anything heavy.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from artifex.env import switch

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
CHUNK = 64 * 2**20  # bytes per read: few GIL hand-overs, a small buffer
MARGIN = 4 * 2**30  # memory left over after the files are cached (bytes)
GIB = 2**30

# Load order: what the loader reads first comes first (diffusers and official layouts); the first key found in a
# file's path gives its rank (lower sorts earlier), so the folder names come before the file names they hold.
_ORDER = (("transformer_2", 1), ("transformer", 0), ("high_noise", 0), ("low_noise", 1), ("vae", 2),
          ("text_encoder", 3), ("t5", 3), ("wav2vec", 4), ("diffusion_pytorch_model", 0))


def _rank(path: Path, root: Path) -> tuple:
    rel = path.relative_to(root).as_posix().lower()
    for key, rank in _ORDER:
        if key in rel:
            return (rank, rel)
    return (5, rel)


def weight_files(path: Path) -> list[Path]:
    """The weight files under a checkpoint directory, in load order."""
    files = [p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()]
    return sorted(files, key=lambda p: _rank(p, path))


def mem_available() -> int | None:
    """Bytes the kernel says can be had without swapping (``MemAvailable``), or None where it is not there."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def enabled() -> bool:
    return switch("ARTIFEX_PREFETCH")


class Prefetch:
    """One checkpoint being read into the page cache on a daemon thread."""

    def __init__(self, root: Path, files: list[Path], skipped: str | None = None):
        self.root, self.files, self.skipped = root, files, skipped
        self.total = sum(f.stat().st_size for f in files)
        self.done_bytes = 0
        self.error: str | None = None
        self.started = time.perf_counter()
        self.finished: float | None = None
        self._stop = threading.Event()
        self._thread = None
        if skipped is None:
            self._thread = threading.Thread(target=self._run, name="artifex-prefetch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        try:
            for path in self.files:
                with open(path, "rb", buffering=0) as f:
                    while not self._stop.is_set():
                        n = f.readinto(view)
                        if not n:
                            break
                        self.done_bytes += n
                if self._stop.is_set():
                    break
        except OSError as e:  # a file the loader will report on properly; the prefetch just ends
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.finished = time.perf_counter()

    def stop(self, timeout: float = 5.0) -> None:
        """End the reading (the load is done: what is left would only be read twice)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def report(self) -> dict:
        out = {"files": len(self.files), "gib": round(self.total / GIB, 3)}
        if self.skipped:
            return out | {"skipped": self.skipped}
        end = self.finished if self.finished is not None else time.perf_counter()
        out |= {"read_gib": round(self.done_bytes / GIB, 3), "seconds": round(end - self.started, 4),
                "state": "error" if self.error else "done" if self.done_bytes >= self.total else
                "stopped" if self._stop.is_set() else "reading"}
        return out | ({"error": self.error} if self.error else {})


_LOCK = threading.Lock()
_CURRENT: list[Prefetch] = []


def start(source: str | os.PathLike | None) -> Prefetch | None:
    """Start reading the weight files of the checkpoint directory ``source`` (None, a hub id or a file: nothing);
    once per directory per process. Returns the prefetch, or None when ``source`` is not a local directory."""
    if source is None:
        return None
    root = Path(source).expanduser()
    if not root.is_dir():
        return None
    root = root.resolve()
    with _LOCK:
        for p in _CURRENT:
            if p.root == root:
                return p
        files = weight_files(root)
        size = sum(f.stat().st_size for f in files)
        avail = mem_available()
        skipped = None
        if not enabled():
            skipped = "ARTIFEX_PREFETCH=off"
        elif not files:
            skipped = "no weight files"
        elif avail is not None and avail < size + MARGIN:
            skipped = (f"the host has {avail / GIB:.1f} GiB available, under the checkpoint's {size / GIB:.1f} GiB "
                       f"+ {MARGIN // GIB} GiB")
        p = Prefetch(root, files, skipped)
        _CURRENT.append(p)
        return p


def stop_all() -> None:
    with _LOCK:
        running = list(_CURRENT)
    for p in running:
        p.stop()


def report() -> dict | None:
    """The sidecar's ``prefetch`` section: the checkpoints this process prefetched (by directory), or None."""
    with _LOCK:
        running = list(_CURRENT)
    return {str(p.root): p.report() for p in running} or None


def evict(path: str | os.PathLike) -> int:
    """Drop the weight files of a checkpoint directory from the page cache (written pages are synced first);
    the bytes asked to be dropped. The kernel drops what no one has mapped or locked."""
    files = weight_files(Path(path))
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return sum(f.stat().st_size for f in files)


__all__ = ["Prefetch", "enabled", "evict", "mem_available", "report", "start", "stop_all", "weight_files"]
