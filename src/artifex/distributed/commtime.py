"""Time spent in the collectives of a parallel layout, per kind (all-to-all, all-gather, broadcast).

A ``CommTimer`` is off unless a benchmark hands one to the runner; the layout's code wraps
each collective in ``timer("kind")``. On CUDA two events bracket the call on the current
stream: the end event runs after the stream has waited for the collective, so the time
includes waiting for the slowest peer (skew), not only the transfer. On CPU (gloo's
collectives block) the wall clock is read. ``read`` synchronises once and sums.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter

import torch


class CommTimer:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.seconds: Counter = Counter()
        self.calls: Counter = Counter()
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def __call__(self, kind: str):
        self.calls[kind] += 1
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((kind, start, end))
        else:
            t = time.perf_counter()
            yield
            self.seconds[kind] += time.perf_counter() - t

    def read(self) -> dict[str, dict[str, float]]:
        """{kind: {"s": seconds, "calls": n}} since the last ``reset``."""
        if self._pending:
            torch.cuda.synchronize(self.device)
            for kind, start, end in self._pending:
                self.seconds[kind] += start.elapsed_time(end) / 1e3
            self._pending.clear()
        return {k: {"s": round(self.seconds[k], 4), "calls": self.calls[k]} for k in sorted(self.calls)}

    def reset(self) -> None:
        self.read()
        self.seconds.clear()
        self.calls.clear()


@contextlib.contextmanager
def untimed(kind: str):
    yield


def timer_or_none(timer: CommTimer | None):
    """The context-manager factory collectives use: the timer, or one that does nothing."""
    return timer if timer is not None else untimed
