"""A14B on two devices, one expert resident on each, queued jobs pipelined.

Device 0 holds the text encoder and expert 0 (high-noise); device 1 holds expert 1
(low-noise) and the VAE. Each job goes through two stages, each a thread bound to its device:

- stage A (device 0): resolve the request, encode the text (and an I2V image, on device 1's
  VAE), draw the noise, run the high-noise steps up to the switch; then move the latents,
  the scheduler with its multistep state, the embeddings and the image condition to
  device 1 and queue the job;
- stage B (device 1): the low-noise steps, the VAE decode, the mp4 and its sidecar.

While job N is in stage B, job N+1 is in stage A: its high-noise steps run beside job N's
low-noise steps and decode. Both stages call the engine's own stage methods
(``Engine.prepare``, ``encode``, ``start_denoising``, ``denoise``, ``finish``), so a job
computes exactly what ``Engine.generate`` computes.

Why one engine can serve both threads: every model is only ever used by one stage thread
(text encoder and expert 0 by A; expert 1 and the VAE by B), and the per-request state
lives in the job. The DiT's caches (text K/V, RoPE tables; ``engine/dit.py``) and the
engine's CFG pair memo are kept per expert and keyed by tensor identity; each stage clears
its own expert's at the end of its steps (``Engine.denoise`` clears the experts it ran), so
stage A starting job N+1 on expert 0 never touches what stage B holds on expert 1. Expert 1
gets its own attention runtime, so stage A choosing a backend for job N+1's shape never
changes the chain that job N's low-noise steps use. The only model both threads may need is
the VAE, for an I2V image encode in stage A beside a decode in stage B: ``Placement.vae``
lets one caller in at a time.

Errors: a job that fails (in either stage) does not stop the others; ``run`` finishes every
job it can and then raises ``ExpertPipelineError`` holding each failed job's exception and
the results of the others (their videos are written).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterable
from pathlib import Path

import torch

from artifex.attention import install
from artifex.engine.pipeline import (
    Engine,
    EventCallback,
    GenerationJob,
    GenerationResult,
    ProgressEvent,
    matmul_precision,
)
from artifex.engine.request import GenerationRequest
from artifex.errors import ArtifexError, GenerationCancelled, InvalidRequestError
from artifex.models.registry import MODELS
from artifex.multidevice.split import move_tensors
from artifex.sysinfo import peak_memory, reset_peak_memory


class ExpertPipelineError(ArtifexError):
    """Some jobs of a pipelined batch failed. ``errors``: job index -> exception; ``results``: in request order,
    None where the job failed."""

    def __init__(self, errors: dict[int, BaseException], results: list[GenerationResult | None]):
        self.errors, self.results = errors, results
        detail = "; ".join(f"job {i}: {type(e).__name__}: {e}" for i, e in sorted(errors.items()))
        super().__init__(f"{len(errors)} of {len(results)} jobs failed: {detail}")


def _device(d: str | torch.device) -> torch.device:
    d = torch.device(d)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def default_devices(engine: Engine) -> tuple[str, str]:
    """The engine's GPU and another one; on a CPU-only engine ("cpu", "cpu")."""
    if engine.device.type != "cuda":
        return "cpu", "cpu"
    if torch.cuda.device_count() < 2:
        raise InvalidRequestError("devices", f"the expert pipeline needs 2 GPUs, this machine has "
                                  f"{torch.cuda.device_count()}", ["cuda:0,cuda:1"])
    first = _device(engine.device)
    return str(first), "cuda:1" if first.index == 0 else "cuda:0"


def move_scheduler(scheduler, device: torch.device) -> None:
    """Move a diffusers scheduler's tensor state (timesteps, the multistep history, the last sample) to ``device``.
    Tensors the scheduler keeps on the CPU on purpose (its sigmas) stay there."""
    for name, value in vars(scheduler).items():
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            setattr(scheduler, name, value.to(device))
        elif isinstance(value, list | tuple) and any(isinstance(v, torch.Tensor) and v.device.type != "cpu"
                                                     for v in value):
            setattr(scheduler, name, move_tensors(value, device))


class ExpertPipeline:
    """An A14B engine spread over two devices, expert 0 on the first and expert 1 on the second; ``run`` pipelines
    a list of requests through the two. ``close`` (or leaving a ``with`` block) puts every model back on the
    engine's device."""

    def __init__(self, engine: Engine, devices: tuple[str | torch.device, str | torch.device] | None = None):
        c = engine.c
        if len(c.experts) != 2:
            two = [n for n, s in MODELS.items() if s.experts == 2 and s.runnable]
            raise InvalidRequestError("model", f"the expert pipeline puts one expert on each device; {engine.spec.name}"
                                      f" has {len(c.experts)} expert(s)", two)
        if engine.plan.placement != "resident":
            raise InvalidRequestError("placement", f"the expert pipeline keeps each expert resident on its device; "
                                      f"placement {engine.plan.placement!r} (from memory_tier / experts / "
                                      f"offload_to_cpu) moves models", ["resident"])
        first, second = (_device(d) for d in (devices or default_devices(engine)))
        if first.type == "cuda" and first == second:
            raise InvalidRequestError("devices", f"the two stages need two devices, got {first} twice",
                                      "two different CUDA devices, e.g. cuda:0,cuda:1 (cpu,cpu on a CPU)")
        if first != _device(engine.device):
            raise InvalidRequestError("devices", f"device 0 must be the engine's device {engine.device}, got {first}",
                                      [str(engine.device)])
        self.engine, self.first, self.second = engine, first, second
        self.devices = [str(first), str(second)]
        # A tier step-down would move every model onto the engine's one device.
        self._layout = engine.layout
        engine.layout = dataclasses.replace(engine.layout, oom_step_down=False)
        # Expert 1's own attention runtime: stage A preparing the next job's shape leaves stage B's chain alone.
        self.second_attention = dataclasses.replace(engine.attention, choices={})
        install([c.experts[1]], self.second_attention)
        c.text_encoder.to(first)
        c.experts[0].to(first)
        c.experts[1].to(second)
        c.vae.to(second)

    def close(self) -> None:
        """Every model back on the engine's device, one attention runtime again."""
        e = self.engine
        install(e.c.experts, e.attention)
        for m in (e.c.text_encoder, e.c.vae, *e.c.experts):
            m.to(e.device)
        e.layout = self._layout

    def __enter__(self) -> ExpertPipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the batch -------------------------------------------------------------------------
    def run(self, requests: Iterable[GenerationRequest], on_event: EventCallback | None = None,
            output_dir: str | Path | None = None) -> list[GenerationResult]:
        """Generate one video per request, pipelined over the two devices; results in request order.

        ``on_event`` gets every job's progress with ``ProgressEvent.job`` set to the request's index; it is called
        from both stage threads, so it must be thread-safe, and what it raises fails that job (e.g.
        ``GenerationCancelled``). Raises ``ExpertPipelineError`` at the end if any job failed."""
        requests = list(requests)
        results: list[GenerationResult | None] = [None] * len(requests)
        errors: dict[int, BaseException] = {}
        handoff: queue.Queue = queue.Queue()  # a queued job holds only latents, embeddings, scheduler state
        stop = threading.Event()

        def emit_for(index: int) -> EventCallback:
            def emit(event: ProgressEvent) -> None:
                if stop.is_set():
                    raise GenerationCancelled("the batch was interrupted")
                if on_event is not None:
                    on_event(dataclasses.replace(event, job=index))
            return emit

        def stage_a() -> None:
            try:
                self._bind(self.first)
                for index, request in enumerate(requests):
                    try:
                        handoff.put(self._stage_a(index, request, emit_for(index)))
                    except Exception as e:  # this job fails; the next one starts
                        errors[index] = e
            finally:
                handoff.put(None)  # stage B ends after the last job, whatever happened here

        def stage_b() -> None:
            self._bind(self.second)
            while (job := handoff.get()) is not None:
                index = job.sidecar_extra["parallel"]["job"]
                try:
                    results[index] = self._stage_b(job, output_dir)
                except Exception as e:
                    errors[index] = e

        threads = [threading.Thread(target=stage_a, name="artifex-stage-a", daemon=True),
                   threading.Thread(target=stage_b, name="artifex-stage-b", daemon=True)]
        with matmul_precision(self.engine.plan.tf32):  # process-wide: set once for both threads
            for d in (self.first, self.second):
                reset_peak_memory(d)
            for t in threads:
                t.start()
            try:
                for t in threads:
                    t.join()
            except BaseException:  # e.g. Ctrl-C: both stages stop at their next step
                stop.set()
                for t in threads:
                    t.join()
                raise
        for index, result in enumerate(results):  # a stage thread that stopped early (e.g. its device failed)
            if result is None and index not in errors:
                errors[index] = RuntimeError("the job did not finish: a stage thread stopped before it")
        if errors:
            raise ExpertPipelineError(errors, results)
        return results  # type: ignore[return-value]

    def _bind(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.set_device(device)

    # -- the two stages --------------------------------------------------------------------
    @torch.no_grad()  # grad mode is per thread
    def _stage_a(self, index: int, request: GenerationRequest, emit: EventCallback) -> GenerationJob:
        """Device 0: resolve, encode, the high-noise steps; then the job moves to device 1."""
        eng = self.engine
        job = eng.prepare(request, emit)
        job.memory = {"tier": "resident", "step_downs": [], "layout": "expert_pipeline"}
        # 1. Text embeddings and 2. seeded noise and image condition, on device 0.
        eng.encode(job)
        # 3a. The high-noise steps: expert 0 while t >= boundary * 1000.
        eng.start_denoising(job)
        switch = job.experts.index(1) if 1 in job.experts else len(job.experts)
        eng.denoise(job, until=switch)  # clears expert 0's caches of this job at the end
        job.mark("denoise_high")
        # Hand over: everything stage B reads, on device 1.
        for name in ("latents", "cond", "uncond", "condition"):
            setattr(job, name, move_tensors(getattr(job, name), self.second))
        move_scheduler(job.scheduler, self.second)
        job.noise, job.device = None, self.second  # the start latents are not needed any more
        job.timings["stage_a"] = round(job.elapsed(), 4)
        job.sidecar_extra["parallel"] = {
            "mode": "expert_pipeline", "devices": self.devices, "job": index,
            "stage_a": {"device": self.devices[0], "steps": [0, switch], "s": job.timings["stage_a"],
                        "timings": ["encode_text", "encode_image", "denoise_high"],
                        "peak_memory": peak_memory(self.first)},
            "stage_b": {"device": self.devices[1], "steps": [switch, len(job.experts)],
                        "timings": ["queued", "denoise_low", "decode", "write"]},
        }
        emit(ProgressEvent("handoff", switch, len(job.experts), job.elapsed()))
        return job

    @torch.no_grad()
    def _stage_b(self, job: GenerationJob, output_dir: str | Path | None) -> GenerationResult:
        """Device 1: the low-noise steps, decode, mp4 and sidecar."""
        eng = self.engine
        job.mark("queued")  # waiting for stage B to finish the job before
        # 3b. The low-noise steps: expert 1 from the switch on, with the scheduler's multistep state carried over.
        self.second_attention.prepare(job.attention_shape, eng.dtype, self.second)
        eng.denoise(job)  # clears expert 1's caches of this job at the end
        job.mark("denoise_low")
        job.timings["denoise"] = round(job.timings["denoise_high"] + job.timings["denoise_low"], 4)
        # 4. Decode and 5. write the mp4 and its sidecar, on device 1.
        return eng.finish(job, output_dir)


# -- artifex batch ---------------------------------------------------------------------------
