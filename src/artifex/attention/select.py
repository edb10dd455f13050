"""Probing, verification and selection of attention backends, decided once with reasons.

- ``verify``: a backend's output against a float64 reference on fresh random inputs
  (self- and cross-attention shapes), within its dtype's bound and finite. A backend
  that fails is never used.
- ``select``: an explicit name is honoured or refused with the reason; ``auto`` times the
  verified backends on the real shape (CUDA) and keeps the fastest, remembering the
  choice on disk keyed by GPU, library versions, shape and dtype; on a CPU it takes the
  first verified backend in preference order. A backend one call shows to be far behind
  is not timed further (``_time_candidates``), and one that compiles for each shape (flex)
  is considered only where no kernel ahead of it passed its check (``COMPILES_PER_SHAPE``).
  The result is a ``Choice``: the chain to run (fastest first, last resort at the end), what
  was rejected and why, timings.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from artifex.attention.backends import BACKENDS, attention_flops, backend_versions, probe
from artifex.attention.ops import LAST_RESORT, runtime_failures
from artifex.errors import ArtifexError, InvalidRequestError

log = logging.getLogger("artifex")

# Relative L2 error allowed against the float64 reference, per input dtype. fp32 allows
# for TF32 on Ampere and newer; the half types for their 8/11-bit mantissas.
BOUNDS = {torch.float32: 5e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CACHE_FORMAT = 1
CPU_TIMING_FLOPS = 2e9  # above this, a CPU takes the preference order instead of timing


class AttentionUnavailableError(ArtifexError):
    """An attention backend asked for explicitly cannot run here; the message says why."""


@dataclass
class Verification:
    backend: str
    ok: bool
    rel_l2: float | None
    bound: float
    reason: str | None = None


@dataclass
class Choice:
    requested: str
    chosen: str
    chain: list[str]
    source: str  # "explicit", "cache", "timed", "preference"
    shape: tuple[int, int, int, int]  # (batch, tokens, heads, head_dim)
    dtype: str
    rejected: dict[str, str] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)
    # Where a timed choice was stored, or a cached one read ("cache"), and when its timings were taken: a cached
    # choice says which file and run it came from, so it can be told from one timed now.
    cache_file: str | None = None
    timed_at: str | None = None
    # Timed once only: slower than SCREEN x the best at that point (``_time_candidates``); and backends ``auto``
    # left out before verifying them, with why (``COMPILES_PER_SHAPE``)
    screened: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def reference_attention(q, k, v, scale=None, causal=False) -> torch.Tensor:
    """float64 softmax(QK^T * scale) V, in (B, L, H, D)."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def verify(name: str, device: torch.device, dtype: torch.dtype, head_dim: int = 128, heads: int = 2,
           scale: float | None = None, causal: bool = False, slices: int = 3) -> Verification:
    """Check ``name`` against the float64 reference on fresh random inputs."""
    backend = BACKENDS[name]
    bound = max(BOUNDS[dtype], backend.bound or 0.0)
    reason = probe(backend, device, dtype, head_dim, causal=causal)
    if reason:
        return Verification(name, False, None, bound, reason)
    gen = torch.Generator("cpu").manual_seed(int.from_bytes(os.urandom(4), "little"))
    worst = 0.0
    for lq, lk in ((257, 257), (257, 77)):  # self-attention, and cross-attention to a short context
        if causal and lq != lk:
            continue
        q, k, v = (torch.randn(2, n, heads, head_dim, generator=gen) for n in (lq, lk, lk))
        ref = reference_attention(q, k, v, scale, causal)
        try:
            out = backend.run(*(t.to(device, dtype) for t in (q, k, v)), scale, causal, 0.0, slices)
        except Exception as e:
            return Verification(name, False, None, bound, f"failed to run: {type(e).__name__}: {e}"[:300])
        if out.shape != ref.shape:
            return Verification(name, False, None, bound, f"returned shape {tuple(out.shape)}, "
                                                          f"expected {tuple(ref.shape)}")
        if not torch.isfinite(out).all():
            return Verification(name, False, None, bound, "produced NaN or Inf")
        worst = max(worst, rel_l2(out.cpu(), ref))
    if worst > bound:
        return Verification(name, False, worst, bound, f"relative L2 {worst:.2e} exceeds the {bound:.0e} bound")
    return Verification(name, True, worst, bound)


def _time_ms(fn, device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def time_backend(name: str, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device,
                 scale=None, causal=False, slices=1, warmup: int = 3, iters: int = 10, seed: int = 0) -> float:
    """Median milliseconds of one attention call at ``shape`` (batch, tokens, heads, head_dim)."""
    b, n, h, d = shape
    gen = torch.Generator(device).manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, d, generator=gen, device=device, dtype=dtype) for _ in range(3))
    run = BACKENDS[name].run
    return _time_ms(lambda: run(q, k, v, scale, causal, 0.0, slices), device, warmup, iters)


def _device_key(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name}|sm{p.major}{p.minor}"
    return "cpu"


def cache_key(device, dtype, shape, scale, causal, dropout) -> str:
    versions = ",".join(f"{k}={v}" for k, v in sorted(backend_versions().items()) if v)
    return "|".join([_device_key(device), f"torch={torch.__version__}", versions, "x".join(map(str, shape)),
                     str(dtype).removeprefix("torch."), f"scale={scale}", f"causal={causal}", f"dropout={dropout}"])


def verify_key(device, dtype, head_dim, scale, causal) -> str:
    """The verification cache's key: what a backend's check depends on (not the sequence length: it runs on small
    random inputs)."""
    versions = ",".join(f"{k}={v}" for k, v in sorted(backend_versions().items()) if v)
    return "|".join([_device_key(device), f"torch={torch.__version__}", versions, str(dtype).removeprefix("torch."),
                     f"head_dim={head_dim}", f"scale={scale}", f"causal={causal}"])


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"),
                                                                                                  dict):
            raise ValueError("unexpected layout")
        return data
    except FileNotFoundError:
        return {"format": CACHE_FORMAT, "entries": {}}
    except (ValueError, OSError) as e:
        log.warning("attention selection cache %s is unreadable (%s); rebuilding it", path, e)
        return {"format": CACHE_FORMAT, "entries": {}}


def _write_cache(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


def verify_cached(name: str, device: torch.device, dtype: torch.dtype, head_dim: int, scale: float | None,
                  causal: bool, slices: int, cache_path: Path | None) -> Verification:
    """``verify`` for a backend named explicitly, unless the cache (``verified`` under ``verify_key``) says it
    passed here before: a process that names fa3-fp8 checks it once per machine and kernel version, not once per
    process and again at its first request. A failure is not trusted from the cache: it is checked again (and a
    pass then kept)."""
    vkey = verify_key(device, dtype, head_dim, scale, causal)
    if cache_path and _read_cache(cache_path).get("verified", {}).get(vkey, {}).get(name) is True:
        return Verification(name, True, None, max(BOUNDS[dtype], BACKENDS[name].bound or 0.0), "cached")
    v = verify(name, device, dtype, head_dim, scale=scale, causal=causal, slices=slices)
    if cache_path and v.ok:
        store = _read_cache(cache_path)
        store.setdefault("verified", {}).setdefault(vkey, {})[name] = True
        _write_cache(cache_path, store)
    return v


# Preference order for `auto` without timing (CPU) and for ties: the kernels that were
# fastest on the H100 at Wan shapes first (DESIGN.md), the generic paths after.
PREFERENCE = ["fa3", "fa4", "sdpa-cudnn", "fa2", "flex", "sage", "sdpa-flash", "xformers", "sdpa",
              "sdpa-efficient"]
# On a CPU, PyTorch's own choice first: eager flex is a reference path there, not a fast one.
CPU_PREFERENCE = ["sdpa", "sdpa-flash", "flex"]
# The guide's use_flash_attention: FlashAttention-3 first, then its automatic fallbacks.
FLASH_FIRST = ["fa3", "fa2", "fa4", "xformers"]


# ``auto``'s timing at a shape it has not met: each candidate once after one warm-up call, and the ones within SCREEN
# of the best so far again for a median (3 warm-up calls, 10 timed). Every candidate fully took 6 x 13 calls: at
# A14B 720p's shape 24 s of the first request there, 8.5 s of it sdpa-efficient's (656 ms a call against fa3's 172,
# attention-h100.md), which a single call rules out.
SCREEN = 1.25
# Backends that compile for each new shape (flex: torch.compile of its kernel, seconds, for its check too) are left
# out of ``auto`` where a kernel ahead of them in PREFERENCE (fa3, fa4, fa2, sdpa-cudnn: before them in BACKENDS)
# passed its check: at every Wan shape flex was slower than both fa3 and sdpa-cudnn (1.3x sdpa-cudnn's time on the
# H100, attention-h100.md; 20.5 against 15.8 ms on the H200, probe-attention-select-h200.json). ``--attention flex``
# still runs it.
COMPILES_PER_SHAPE = ("flex",)


def _time_candidates(ranked: list[str], shape, dtype, device, scale, causal,
                     rejected: dict[str, str]) -> tuple[dict[str, float], list[str]]:
    """Time ``ranked`` (in preference order) at ``shape``: (milliseconds by backend, those timed once only). A
    backend that fails or runs out of memory goes to ``rejected``."""
    b, n, h, d = shape
    full = (3, 10) if device.type == "cuda" else (1, 3)
    timings: dict[str, float] = {}
    screened: list[str] = []
    for name in ranked:
        try:
            if timings:
                once = time_backend(name, shape, dtype, device, scale, causal, warmup=1, iters=1)
                if once > SCREEN * min(timings.values()):
                    timings[name] = once
                    screened.append(name)
                    continue
            timings[name] = time_backend(name, shape, dtype, device, scale, causal, warmup=full[0], iters=full[1])
        except torch.OutOfMemoryError:
            rejected[name] = f"out of memory at {b}x{n}x{h}x{d}"
            torch.cuda.empty_cache()
        except Exception as e:
            rejected[name] = f"failed while timing: {type(e).__name__}: {e}"[:300]
    return timings, screened


def select(requested: str, device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int, int],
           scale: float | None = None, causal: bool = False, dropout: float = 0.0, slices: int = 0,
           prefer: list[str] | None = None, cache_path: Path | None = None) -> Choice:
    """Choose the attention backend for one (shape, dtype) on ``device``."""
    b, n, h, d = shape
    dname = str(dtype).removeprefix("torch.")
    if requested != "auto" and requested not in BACKENDS:
        raise InvalidRequestError("attention", f"unknown attention backend {requested!r}", ["auto", *BACKENDS])
    failed = runtime_failures()

    if requested != "auto":
        reason = failed.get(requested) and f"failed at runtime earlier: {failed[requested]}"
        v = None if reason else verify_cached(requested, device, dtype, d, scale, causal, max(slices, 1), cache_path)
        if reason or not v.ok:
            raise AttentionUnavailableError(f"attention backend {requested!r} cannot run here: {reason or v.reason}")
        if dropout and not BACKENDS[requested].dropout:
            raise AttentionUnavailableError(f"attention backend {requested!r} cannot apply dropout")
        chain = [requested] + ([LAST_RESORT] if requested != LAST_RESORT else [])
        return Choice(requested, requested, chain, "explicit", shape, dname)

    rejected: dict[str, str] = {}
    candidates = []
    # Verifications are kept like the timings (``verify_key``: device, torch and kernel versions, dtype, head_dim):
    # a later process verifies only the backend it will run, not every candidate (flex compiles for its check).
    vkey = verify_key(device, dtype, d, scale, causal)
    store = _read_cache(cache_path) if cache_path else None
    known = dict((store or {}).get("verified", {}).get(vkey, {}))
    checked_now: set[str] = set()
    left_out: dict[str, str] = {}
    for name, backend in BACKENDS.items():
        if not backend.in_auto:
            continue
        if name in COMPILES_PER_SHAPE and (ahead := [c for c in candidates
                                                     if c in PREFERENCE[:PREFERENCE.index(name)]]):
            left_out[name] = f"compiles for each shape; slower than {ahead[0]} at every Wan shape measured"
            continue
        if name in failed:
            rejected[name] = f"failed at runtime: {failed[name]}"
            continue
        why = probe(backend, device, dtype, d, causal=causal, dropout=dropout)
        if why:
            rejected[name] = why
            continue
        if name not in known:
            v = verify(name, device, dtype, d, scale=scale, causal=causal)
            known[name] = True if v.ok else str(v.reason)
            checked_now.add(name)
        if known[name] is not True:
            rejected[name] = f"failed verification: {known[name]}" + ("" if name in checked_now else " (cached)")
            continue
        candidates.append(name)
    order = prefer or []
    base = CPU_PREFERENCE if device.type == "cpu" else PREFERENCE
    ranked = sorted(candidates, key=lambda x: (x not in order, order.index(x) if x in order else 0,
                                               base.index(x) if x in base else 99))
    if not ranked:
        return Choice("auto", LAST_RESORT, [LAST_RESORT], "preference", shape, dname, rejected)

    timings: dict[str, float] = {}
    screened: list[str] = []
    source = "preference"
    cache_file = timed_at = None
    # Time on the real shape on a GPU, and on a CPU when the shape is small enough to be cheap;
    # a stated preference (the guide's use_flash_attention) wins over timing.
    cheap = attention_flops(b, n, n, h, d) <= CPU_TIMING_FLOPS
    if (device.type == "cuda" or cheap) and not prefer:
        key = cache_key(device, dtype, shape, scale, causal, dropout)
        cache = _read_cache(cache_path) if cache_path else {"entries": {}}
        hit = cache["entries"].get(key)
        if hit and isinstance(hit.get("timings_ms"), dict) and set(hit["timings_ms"]) <= set(candidates) \
                and hit["timings_ms"]:
            timings, source = {k: float(v) for k, v in hit["timings_ms"].items()}, "cache"
            cache_file, timed_at = str(cache_path), hit.get("date")
            screened = list(hit.get("screened", []))
        else:
            timings, screened = _time_candidates(ranked, shape, dtype, device, scale, causal, rejected)
            source, timed_at = "timed", time.strftime("%Y-%m-%d %H:%M:%S")
            if cache_path and timings:
                cache["entries"][key] = {"timings_ms": timings, "date": timed_at, "screened": screened}
                _write_cache(cache_path, cache)
                cache_file = str(cache_path)
        ranked = sorted(timings, key=timings.get) + [r for r in ranked if r not in timings and r not in rejected]
        if not ranked:
            return Choice("auto", LAST_RESORT, [LAST_RESORT], "preference", shape, dname, rejected, timings,
                          left_out=left_out)
    while ranked and ranked[0] not in checked_now:  # the backend that will run is verified in this process
        v = verify(ranked[0], device, dtype, d, scale=scale, causal=causal)
        checked_now.add(ranked[0])
        if v.ok:
            break
        known[ranked[0]] = str(v.reason)
        rejected[ranked[0]] = f"failed verification: {v.reason}"
        ranked = ranked[1:]
    if cache_path and checked_now:
        store = _read_cache(cache_path)  # again: the timing above may have written it
        store.setdefault("verified", {})[vkey] = {**store.get("verified", {}).get(vkey, {}), **known}
        _write_cache(cache_path, store)
    if not ranked:
        return Choice("auto", LAST_RESORT, [LAST_RESORT], "preference", shape, dname, rejected, timings,
                      left_out=left_out)
    chain = ranked + ([LAST_RESORT] if LAST_RESORT not in ranked else [])
    choice = Choice("auto", chain[0], chain, source, shape, dname, rejected, timings, cache_file, timed_at,
                    screened, left_out)
    where = {"cache": f"from {cache_file}, timed {timed_at}", "timed": f"timed now, kept in {cache_file}"
             if cache_file else "timed now"}.get(source, source)
    log.info("attention: %s for %s %s (%s); rejected: %s%s", choice.chosen, "x".join(map(str, shape)), dname, where,
             "; ".join(f"{k}: {v}" for k, v in rejected.items()) or "none",
             "".join(f"; {k} left out: {v}" for k, v in left_out.items()))
    return choice


def attention_tflops(shape: tuple[int, int, int, int], ms: float) -> float:
    b, n, h, d = shape
    return attention_flops(b, n, n, h, d) / (ms * 1e-3) / 1e12
