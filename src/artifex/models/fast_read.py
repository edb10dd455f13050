"""Safetensors files read straight to the device a component loads on: page cache -> pinned buffer -> GPU, on threads.

diffusers' and transformers' readers map each file and copy tensor by tensor from the mapping to the GPU: each
copy comes from pageable memory, so the driver stages it through its own small pinned buffer, one copy after
another (on an H200, 22.5 GiB of TI2V-5B from the page cache took 4.4 s: about 5 GB/s). Here a file's tensor bytes
are read in large chunks (``os.preadv``, which releases the GIL) into pinned host buffers, several threads at a
time, each chunk copied to its tensors on the GPU asynchronously on the thread's own stream while the thread reads
its next chunk into its second buffer.

``read_safetensors(files, device, dtype_of)`` returns ``{name: tensor}`` on ``device``, each tensor cast to
``dtype_of(name, file dtype)`` file by file (a file's tensors are cast once all of its bytes arrived, so a
checkpoint stored in fp32 never holds more than one file's fp32 copy on the device). On the CPU it reads each
tensor's bytes into its own memory directly (no buffer), large tensors in pieces shared over the threads; with
``pin=True`` (a CUDA machine's host home: the text encoder an offload tier copies in for each encode)
that memory is page-locked, the files' tensors packed into pinned chunks as ``pack`` lays them out, so that the
placement has nothing left to pin or copy; pinned memory is pinned by registering ordinary pages
(``pin_by_registering``: ~4x cudaHostAlloc's rate on an H200 host). The loader (``loader.py``) hands the result
to the model classes (meta-device skeleton + ``load_state_dict(assign=True)`` for diffusers' models; transformers'
``from_pretrained(state_dict=...)`` for the text encoder). ``ARTIFEX_FAST_READ=off`` keeps the libraries' readers.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from artifex.env import switch
from artifex.errors import CheckpointError
from artifex.models import read_ahead

log = logging.getLogger("artifex")

MAX_HEADER = 100 * 2**20
CHUNK = 16 * 2**20  # bytes per pinned buffer (each thread holds two); 8 x 16 MiB read fastest on an H200
THREADS = 8
_MAX_READ = 1 << 30  # bytes per preadv call (Linux caps one read near 2 GiB)
PIECE = 64 * 2**20  # bytes of one thread's read into host memory (a large tensor is shared over the threads)
PIN_CHUNK = 2**30  # bytes of one pinned host allocation (a power of two: the pinned allocator rounds each up to one)
PIN_ALIGN = 512  # offset of each tensor inside a pinned chunk

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def enabled() -> bool:
    return switch("ARTIFEX_FAST_READ")


def read_header(path: Path) -> tuple[int, dict]:
    """A safetensors file's header: (offset of its tensor data, {name: {dtype, shape, data_offsets}}), checked
    against the file's length. Every problem is a ``CheckpointError`` naming the file."""
    if not path.is_file():
        raise CheckpointError(path, "is missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(path, f"is corrupt: {size} bytes is too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n < 2 or n > min(size - 8, MAX_HEADER):
            raise CheckpointError(path, "is corrupt: not a safetensors file (bad header length)")
        try:
            meta = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(path, "is corrupt: its safetensors header is not valid JSON") from None
    if not isinstance(meta, dict):
        raise CheckpointError(path, "is corrupt: its safetensors header is not a JSON object")
    entries = {k: v for k, v in meta.items() if k != "__metadata__"}
    for name, e in entries.items():
        if not (isinstance(e, dict) and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
                and isinstance(e.get("shape"), list)):
            raise CheckpointError(path, f"is corrupt: header entry {name!r} lacks its shape or data_offsets")
    data = max((e["data_offsets"][1] for e in entries.values()), default=0)
    if 8 + n + data != size:
        raise CheckpointError(path, f"is truncated or corrupt: its header describes {8 + n + data} bytes, "
                                    f"the file holds {size}")
    return 8 + n, entries


REGISTER_THREADS = 8  # threads that fault in a new pinned allocation's pages (torch's pinned_num_register_threads)
REGISTER_SETTINGS = f"pinned_use_cuda_host_register:True,pinned_num_register_threads:{REGISTER_THREADS}"
_REGISTER = {"state": None}  # None: not decided yet; True: pinning by registering; False: cudaHostAlloc
_REGISTER_LOCK = threading.Lock()


def _user_allocator_settings() -> str:
    """The allocator settings the environment gives torch (the newer variable first, as torch reads them)."""
    return os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or ""


def _set_allocator(settings: str) -> None:
    """torch's allocator ``settings``, after the environment's own (torch sets each key a call does not name back
    to its default: a user's ``max_split_size_mb`` would be lost)."""
    user = _user_allocator_settings()
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch >= 2.9; older: the CUDA one
    (setter or torch.cuda.memory._set_allocator_settings)(",".join(p for p in (user.strip(" ,"), settings) if p))


def empty_pinned_cache() -> None:
    """Pinned blocks nobody holds back to the system (torch's host allocator keeps freed ones locked for reuse)."""
    if torch.cuda.is_available():
        empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
        try:
            (empty or getattr(torch._C, "_host_emptyCache", lambda: None))()
        except RuntimeError as e:  # best effort: the blocks stay cached for reuse
            log.debug("emptying the pinned cache failed: %s", e)


def pin_by_registering() -> bool:
    """From here on, pinned host memory is allocated as ordinary pages, faulted in on ``REGISTER_THREADS`` threads
    and then page-locked with ``cudaHostRegister`` (torch's ``pinned_use_cuda_host_register``), not by
    ``cudaHostAlloc``: on an H200 host, cudaHostAlloc pinned 2.84 GB/s, this 11.42 GB/s, and an offload tier's
    homes (24.5 GiB for TI2V-5B) read into pinned memory in 4.07 s against 11.59 s (``fast-read-h200.json``).
    Decided once per process: not where ``ARTIFEX_PIN_REGISTER=off``, nor where the allocator's own variables
    already say how to pin, nor without CUDA. Returns whether it is on."""
    with _REGISTER_LOCK:
        if _REGISTER["state"] is None:
            on = switch("ARTIFEX_PIN_REGISTER") and "pinned_use_cuda_host_register" not in _user_allocator_settings()
            if on and torch.cuda.is_available():
                try:
                    _set_allocator(REGISTER_SETTINGS)
                except (RuntimeError, AttributeError) as e:
                    log.warning("pinning by cudaHostRegister is not available (%s); cudaHostAlloc pins",
                                str(e).splitlines()[0])
                    on = False
            _REGISTER["state"] = on and torch.cuda.is_available()
        return _REGISTER["state"]


# Pinned buffers of at least HUGE_MIN bytes (the homes' 1 GiB chunks; not the read buffers) made of 2 MiB pages
# (ARTIFEX_PIN_HUGE_PAGES): anonymous memory the kernel is asked to back with transparent huge pages, faulted in on
# REGISTER_THREADS threads and registered with cudaHostRegister by Artifex, unregistered and unmapped when the last
# tensor viewing it goes. 512 times fewer pages to fault in, lock, and unlock at exit than torch's 4 KiB ones.
HUGE_PAGE = 2 * 2**20
HUGE_MIN = 64 * 2**20
_HUGE = {"off": False}  # set once registering such a buffer failed: torch's allocator from then on


def _cuda_register(ptr: int, size: int) -> None:
    err = torch.cuda.cudart().cudaHostRegister(ptr, size, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {size} bytes failed: {err}")


def _cuda_unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


def _release(mm, ptr: int, unregister) -> None:
    """The last view of a huge-page buffer is gone: unlock its pages, then unmap them (in that order: the
    registration names the mapped range)."""
    try:
        unregister(ptr)
    finally:
        mm.close()


def huge_page_buffer(nbytes: int, register=_cuda_register, unregister=_cuda_unregister) -> torch.Tensor:
    """``nbytes`` of host memory in 2 MiB transparent huge pages (where the kernel allows them: with
    transparent_hugepage ``never`` they are 4 KiB pages, still correct), faulted in on threads, locked by
    ``register(ptr, size)``; ``unregister(ptr)`` runs, and the memory is unmapped, once no tensor views it. A failed
    registration unmaps it and raises RuntimeError."""
    import mmap
    import weakref

    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # a kernel without transparent huge pages: 4 KiB ones
        mm.madvise(mmap.MADV_HUGEPAGE)
    view = memoryview(mm)
    buf = torch.frombuffer(view, dtype=torch.uint8)  # holds ``view``, which holds the mapping
    step = -(-size // REGISTER_THREADS)
    _run_threads(lambda k: buf[k * step:(k + 1) * step:4096].zero_(), REGISTER_THREADS)  # a write faults a page in
    ptr = buf.data_ptr()
    try:
        register(ptr, size)
    except BaseException:
        del buf
        view.release()
        mm.close()
        raise
    # not at interpreter exit: the process's end gives the pages back (and CUDA may be gone by then)
    weakref.finalize(view, _release, mm, ptr, unregister).atexit = False
    return buf[:nbytes]


def pinned_buffer(nbytes: int) -> torch.Tensor:
    """``nbytes`` of page-locked host memory (needs CUDA: raises RuntimeError without it), pinned as
    ``pin_by_registering`` says, in 2 MiB pages from ``HUGE_MIN`` bytes where ARTIFEX_PIN_HUGE_PAGES is on; where
    registering fails (e.g. a locked-memory limit), cudaHostAlloc from then on (torch does not free the pages of a
    registration it could not finish: one buffer's worth is lost then)."""
    if nbytes >= HUGE_MIN and not _HUGE["off"] and switch("ARTIFEX_PIN_HUGE_PAGES") and pin_by_registering():
        try:
            return huge_page_buffer(nbytes)
        except (RuntimeError, OSError) as e:  # a refused registration, or no memory left to map
            log.warning("pinning in 2 MiB pages failed (%s); torch's pinned allocator from now on",
                        str(e).splitlines()[0])
            _HUGE["off"] = True
    if pin_by_registering():
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError as e:
            log.warning("pinning by cudaHostRegister failed (%s); cudaHostAlloc pins from now on",
                        str(e).splitlines()[0])
            with _REGISTER_LOCK:
                _set_allocator("pinned_use_cuda_host_register:False")
                _REGISTER["state"] = False
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def pack(sizes: list[int], chunk: int = PIN_CHUNK) -> list[tuple[int, list[tuple[int, int]]]]:
    """Pinned chunks for tensors of ``sizes`` bytes, largest first, each in the first chunk with room (one larger
    than ``chunk`` gets its own): ``[(bytes used, [(index into sizes, byte offset), ...]), ...]``, every offset a
    multiple of ``PIN_ALIGN``. One pinned allocation per tensor would waste up to half of it to the rounding."""
    used: list[int] = []
    members: list[list[tuple[int, int]]] = []
    for k in sorted(range(len(sizes)), key=lambda k: -sizes[k]):
        size = -(-sizes[k] // PIN_ALIGN) * PIN_ALIGN
        c = next((c for c in range(len(used)) if used[c] + size <= chunk), None)
        if c is None:
            c = len(used)
            used.append(0)
            members.append([])
        members[c].append((k, used[c]))
        used[c] += size
    return list(zip(used, members, strict=True))


def _allocate(specs: list[tuple[list[int], torch.dtype]], device: torch.device, pin: bool) -> list[torch.Tensor]:
    """Empty tensors of ``specs`` (shape, dtype) on ``device``; with ``pin``, views into pinned chunks (``pack``),
    or ordinary host memory where pinning fails (host memory locked out: a warning, the placement tries again)."""
    if pin:
        sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in specs]
        out: list = [None] * len(specs)
        try:
            for used, members in pack(sizes, PIN_CHUNK):
                buf = pinned_buffer(used)
                for k, offset in members:
                    shape, dtype = specs[k]
                    out[k] = buf[offset:offset + sizes[k]].view(dtype).view(shape)
            return out
        except RuntimeError as e:
            log.warning("pinned host memory for the weights failed (%s); read to pageable memory",
                        str(e).splitlines()[0])
    return [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in specs]


def tensor_names(files: list[Path]) -> set[str]:
    """The tensor names the files' headers hold (no tensor data read)."""
    return {name for path in files for name in read_header(Path(path))[1]}


class _File:
    """One file's tensors, allocated on the device in the file's dtypes, sorted by where their bytes lie."""

    def __init__(self, path: Path, device: torch.device, allocate: bool = True):
        self.path = path
        self.start, entries = read_header(path)
        self.names, self.begins, self.ends, specs = [], [], [], []
        for name, e in sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if e.get("dtype") not in DTYPES:
                raise CheckpointError(path, f"holds tensor {name!r} of dtype {e.get('dtype')!r}; readable: "
                                            f"{', '.join(DTYPES)}")
            shape, dtype = e["shape"], DTYPES[e["dtype"]]
            begin, end = e["data_offsets"]
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise CheckpointError(path, f"is corrupt: tensor {name!r} has {end - begin} bytes for shape "
                                            f"{shape} in {e['dtype']}")
            self.names.append(name)
            self.begins.append(begin)
            self.ends.append(end)
            specs.append((shape, dtype))
        self.specs = specs
        self.tensors = _allocate(specs, device, False) if allocate else []  # else: pinned by read_safetensors
        self.size = max(self.ends, default=0)

    def pieces(self, lo: int, hi: int) -> Iterable[tuple[torch.Tensor, int, int, int]]:
        """(destination bytes, its offset, chunk offset, length) of each tensor piece in data bytes [lo, hi)."""
        i = bisect.bisect_right(self.ends, lo)
        while i < len(self.names) and self.begins[i] < hi:
            a, b = max(self.begins[i], lo), min(self.ends[i], hi)
            if b > a:
                yield _bytes(self.tensors[i]), a - self.begins[i], a - lo, b - a
            i += 1


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _pread_into(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:done + _MAX_READ]], offset + done)
        if n <= 0:
            raise CheckpointError(path, f"ended early: {offset + done} bytes read of {offset + len(view)}")
        done += n


def _run_threads(work: Callable[[int], None], threads: int) -> None:
    """Run ``work(k)`` on ``threads`` threads (k = 0..threads-1); the first error is raised once all stopped."""
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            work(k)
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            errors.append(e)

    pool = [threading.Thread(target=run, args=(k,), name=f"artifex-read-{k}", daemon=True) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]


def _read_cpu(file: _File, threads: int) -> None:
    """Each tensor's bytes read into its own memory, in pieces of at most ``PIECE`` bytes taken in turn by the
    threads."""
    fd = os.open(file.path, os.O_RDONLY)
    pieces = [(i, lo, min(lo + PIECE, file.ends[i] - file.begins[i])) for i in range(len(file.tensors))
              for lo in range(0, file.ends[i] - file.begins[i], PIECE)]
    lock, next_piece = threading.Lock(), [0]
    try:
        def work(k: int) -> None:
            while True:
                with lock:
                    p = next_piece[0]
                    next_piece[0] += 1
                if p >= len(pieces):
                    return
                i, lo, hi = pieces[p]
                view = memoryview(_bytes(file.tensors[i]).numpy())[lo:hi]
                _pread_into(fd, view, file.start + file.begins[i] + lo, file.path)

        _run_threads(work, threads)
    finally:
        os.close(fd)


def _read_chunked(file: _File, device: torch.device, threads: int, chunk: int) -> None:
    """The file's data in ``chunk``-byte pieces, taken in turn by the threads: read into one of the thread's two
    buffers, copied to the tensors (on a GPU: from pinned buffers, asynchronously on the thread's own stream, the
    buffer reused once that copy is done)."""
    cuda = device.type == "cuda"
    fd = os.open(file.path, os.O_RDONLY)
    count = (file.size + chunk - 1) // chunk
    lock, next_chunk = threading.Lock(), [0]

    def work(k: int) -> None:
        stream = torch.cuda.Stream(device) if cuda else None
        size = min(chunk, file.size)
        buffers = [pinned_buffer(size) if cuda else torch.empty(size, dtype=torch.uint8) for _ in range(2)]
        views = [memoryview(b.numpy()) for b in buffers]
        done: list = [None, None]
        turn = 0
        while True:
            with lock:
                c = next_chunk[0]
                next_chunk[0] += 1
            if c >= count:
                break
            lo, hi = c * chunk, min((c + 1) * chunk, file.size)
            if done[turn] is not None:
                done[turn].synchronize()  # the copies out of this buffer have finished
            _pread_into(fd, views[turn][: hi - lo], file.start + lo, file.path)
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                for dst, at, src, n in file.pieces(lo, hi):
                    dst[at:at + n].copy_(buffers[turn][src:src + n], non_blocking=cuda)
                if cuda:
                    done[turn] = torch.cuda.Event()
                    done[turn].record(stream)
            turn ^= 1
        if cuda:
            stream.synchronize()

    try:
        if cuda:  # the tensors were allocated on the current stream: the threads' streams write them after that
            torch.cuda.current_stream(device).synchronize()
        _run_threads(work, threads)
    finally:
        os.close(fd)


def read_safetensors(files: list[Path], device: str | torch.device,
                     dtype_of: Callable[[str, torch.dtype], torch.dtype],
                     threads: int = THREADS, chunk: int = CHUNK, chunked: bool | None = None, pin: bool = False,
                     ahead: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of ``files`` on ``device``, cast to ``dtype_of(name, dtype in the file)``. A name in two files
    is an error (shards of one model do not overlap). ``chunked`` (default: on a GPU) reads through buffers of
    ``chunk`` bytes; else each tensor is read into its own memory (a CPU's). ``pin``: on the CPU, that memory is
    pinned (where CUDA is present), every file's tensors packed together into chunks (``pack``); a tensor that
    needs a cast is pinned later, by the placement. ``ahead``: a file the read-ahead (``read_ahead``) already read to
    ``device`` is taken from it instead of read again (its tensors cast the same way)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    pin = pin and device.type == "cpu" and torch.cuda.is_available()
    files = [Path(p) for p in files]
    pinned: list[_File | None] = []
    if pin:  # one packing over every file's tensors: each shard's last chunk, rounded up, would waste up to half
        pinned = [_File(p, device, allocate=False) for p in files]
        flat, k = _allocate([spec for f in pinned for spec in f.specs], device, True), 0
        for f in pinned:
            f.tensors, k = flat[k:k + len(f.specs)], k + len(f.specs)
        del flat
    out: dict[str, torch.Tensor] = {}
    for i, path in enumerate(files):
        held = read_ahead.take(path, device) if ahead and not pin else None
        if held is not None:
            names, tensors = held
        else:
            file = pinned[i] if pin else _File(path, device)
            if pin:
                pinned[i] = None
            if file.size:
                if device.type == "cuda" if chunked is None else chunked:
                    _read_chunked(file, device, threads, chunk)
                else:
                    _read_cpu(file, threads)
            names, tensors = file.names, file.tensors
            del file
        for name, t in zip(names, tensors, strict=True):
            if name in out:
                raise CheckpointError(path, f"holds tensor {name!r}, which an earlier shard holds too")
            want = dtype_of(name, t.dtype)
            out[name] = t if want == t.dtype else t.to(want)
        del names, tensors  # the uncast tensors of this file go before the next file's arrive
    return out
