"""Prompt embeddings kept between requests: a repeated prompt (or negative prompt) skips the text encoder.

An entry is one prompt's embedding, ``(text_len, text_dim)`` in the engine's precision, in
CPU memory (the memory planner counts no cache on the device; the copy back costs far
less than an encode). Its key says everything the embedding depends on:

- the tokenizer: a fingerprint of its class, vocabulary/model (the fast tokenizer's
  serialized form), special tokens and padding/truncation sides;
- the encoder: a fingerprint of its class, config and weights (name, shape, dtype and the
  bytes of a strided sample of every parameter and buffer: different weights differ there);
- the cleaned text, the text length, the output dtype.

Fingerprints are computed once per tokenizer/encoder object and again only when the
encoder's tensors change (written in place, cast, moved, reloaded); swapping in another
object gives it its own. The cache is bounded by entries (``OptimizationConfig.text_cache_size``)
and bytes, least recently used out first; hits, misses and evictions are counted.
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

DEFAULT_ENTRIES = 64  # umt5-xxl, 512 tokens x 4096 in bf16: 4 MiB an entry
DEFAULT_MAX_BYTES = 512 * 2**20
_SAMPLE = 256  # elements read from each tensor (strided over the whole tensor) for the weights fingerprint

_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_fp_lock = threading.Lock()


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of what the tokenizer does to a text (memoized per tokenizer object)."""
    version = (len(tokenizer), getattr(tokenizer, "padding_side", None), getattr(tokenizer, "truncation_side", None))
    with _fp_lock:
        memo = _fingerprints.get(tokenizer)
    if memo is not None and memo[0] == version:  # an added token or another side: fingerprinted again
        return memo[1]
    h = hashlib.sha256(type(tokenizer).__qualname__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([str(tokenizer.special_tokens_map), getattr(tokenizer, "padding_side", None),
                         getattr(tokenizer, "truncation_side", None)]).encode())
    fp = h.hexdigest()[:16]
    with _fp_lock:
        _fingerprints[tokenizer] = (version, fp)
    return fp


def _state(module: torch.nn.Module) -> tuple:
    """What tells a module's weights apart cheaply: their in-place version counters (an in-place write), and where
    and in what dtype each lives (a cast, a move, a reload or a rebinding gives new storage)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return (sum(t._version for t in tensors), hash(tuple((t.data_ptr(), t.dtype, t.device) for t in tensors)))


def encoder_fingerprint(encoder: torch.nn.Module) -> str:
    """A short hash of the encoder's class, config and weights (memoized per module until its weights change:
    written in place, cast, moved or replaced)."""
    version = _state(encoder)
    with _fp_lock:
        memo = _fingerprints.get(encoder)
    if memo is not None and memo[0] == version:
        return memo[1]
    h = hashlib.sha256(type(encoder).__qualname__.encode())
    config = getattr(encoder, "config", None)
    if config is not None:
        h.update((config.to_json_string() if hasattr(config, "to_json_string") else repr(config)).encode())
    samples = []
    for name, t in list(encoder.named_parameters()) + list(encoder.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        flat = t.detach().reshape(-1)
        if flat.numel():
            step = max(1, flat.numel() // _SAMPLE)
            samples.append(flat[::step][:_SAMPLE].float())
    if samples:  # one copy to the host for every sample
        h.update(torch.cat(samples).cpu().numpy().tobytes())
    fp = h.hexdigest()[:16]
    with _fp_lock:
        _fingerprints[encoder] = (version, fp)
    return fp


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class TextCache:
    """An LRU of prompt embeddings, bounded by ``max_entries`` (0: off) and ``max_bytes``. Thread-safe."""

    def __init__(self, max_entries: int = DEFAULT_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_entries < 0 or max_bytes < 0:
            raise ValueError(f"max_entries and max_bytes must be >= 0, got {max_entries}, {max_bytes}")
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._last: dict[tuple, bool] = {}  # key -> whether its latest lookup hit (for the sidecar)
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = CacheStats()

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    @staticmethod
    def key(tokenizer_fp: str, encoder_fp: str, text: str, text_len: int, dtype: torch.dtype) -> tuple:
        return (tokenizer_fp, encoder_fp, text, text_len, str(dtype))

    def get(self, key: tuple) -> torch.Tensor | None:
        """The embedding stored under ``key`` (CPU), counted as a hit, or None (a miss)."""
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.stats.misses += 1
            else:
                self._entries.move_to_end(key)
                self.stats.hits += 1
            self._remember(key, value is not None)
            return value

    def put(self, key: tuple, value: torch.Tensor) -> None:
        """Store ``value`` (moved to CPU memory), evicting the least recently used entries beyond the bounds; an
        entry larger than ``max_bytes`` is not stored."""
        if not self.enabled:
            return
        value = value.detach().to("cpu", copy=True).contiguous()
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            self._entries[key] = value
            self._bytes += size
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                _, gone = self._entries.popitem(last=False)
                self._bytes -= gone.numel() * gone.element_size()
                self.stats.evictions += 1

    def last_outcome(self, key: tuple) -> bool | None:
        """Whether the latest lookup of ``key`` hit (None: never looked up)."""
        with self._lock:
            return self._last.get(key)

    def _remember(self, key: tuple, hit: bool) -> None:
        self._last.pop(key, None)
        self._last[key] = hit
        while len(self._last) > 4 * max(self.max_entries, 16):  # outcomes of keys long gone are forgotten
            self._last.pop(next(iter(self._last)))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def to_dict(self) -> dict:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self._bytes, "max_entries": self.max_entries,
                    "max_bytes": self.max_bytes, "hits": self.stats.hits, "misses": self.stats.misses,
                    "evictions": self.stats.evictions}


__all__ = ["DEFAULT_ENTRIES", "DEFAULT_MAX_BYTES", "CacheStats", "TextCache", "encoder_fingerprint",
           "tokenizer_fingerprint"]
