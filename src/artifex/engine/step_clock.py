"""When each denoising step ended: the sidecar's ``denoise_steps``, which shows what a process's first step pays.

In a fresh ``artifex generate`` the TI2V-5B 720p denoise took 2.7 s longer than the same denoise in a server after
its warm-up (ttv-h200.json): the first use of each kernel (Triton's cache read, cuBLAS, the attention backend) falls
in the first steps. ``StepClock`` marks the start of the denoise stage, the end of its preparation (the sampler and
the attention backend: ``Engine.start_denoising``) and the end of each step; ``summary()`` gives the preparation's
seconds, the first and second steps', the median and the last step's, and the steps' sum.

On CUDA the marks are events on the current stream: nothing waits for the GPU while the steps run, and a step's
seconds are the device's time from the previous mark to its own (an idle device waiting for the host counts too, so
the first step's host-side first uses show). Elsewhere they are the host's clock.
"""

from __future__ import annotations

import statistics
import time

import torch


class StepClock:
    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        self._marks: list = []
        self.mark()

    def mark(self) -> None:
        """The end of the preparation (the first call after the clock's start), then of each step."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))  # the clock's device (a job may move on)
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())

    def _intervals(self) -> list[float]:
        if self.cuda:
            self._marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self._marks, self._marks[1:])]
        return [b - a for a, b in zip(self._marks, self._marks[1:])]

    def summary(self) -> dict | None:
        """{clock, prepare_s, steps, first_s, second_s, median_s, last_s, steps_s}, or None before the first step."""
        intervals = self._intervals() if len(self._marks) > 2 else []
        if not intervals:
            return None
        prepare, steps = intervals[0], intervals[1:]
        r = lambda v: round(v, 4)  # noqa: E731
        return {"clock": "cuda events" if self.cuda else "host", "prepare_s": r(prepare), "steps": len(steps),
                "first_s": r(steps[0]), "second_s": r(steps[1]) if len(steps) > 1 else None,
                "median_s": r(statistics.median(steps)), "last_s": r(steps[-1]), "steps_s": r(sum(steps))}


__all__ = ["StepClock"]
