"""The engine: encode text -> prepare latents -> denoise -> decode -> mp4.

Rule for this file: it holds the common path only, and reads like the algorithm.
Rare features (offload policies, parallel layouts, other attention kernels) enter
through functions defined elsewhere and chosen by the plan; no per-feature branches
inside the denoising loop beyond the MoE switch and CFG.
"""

from __future__ import annotations

import contextlib
import html
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from artifex import timeline
from artifex.attention import Choice, install, runtime_from_config
from artifex.config import OptimizationConfig
from artifex.engine.decoders import load_light_decoder
from artifex.engine.dit import accelerate_model, clear_caches, share_first_block
from artifex.engine.fp8 import check_fp8, quantize_experts
from artifex.engine.layout import EngineLayout
from artifex.engine.memory import weights_of
from artifex.engine.memory_guard import MemoryGuard
from artifex.engine.outputs import build_sidecar, default_output, write_json
from artifex.engine.placement import Placement, load_devices
from artifex.engine.plan import Plan, make_plan, plan_before_load, resolve_device
from artifex.engine.request import GenerationRequest, Settings, resolve_request
from artifex.engine.samplers import checkpoint_shift, make_sampler, scheduler_warnings
from artifex.engine.step_clock import StepClock
from artifex.engine.text_cache import TextCache, encoder_fingerprint, tokenizer_fingerprint
from artifex.engine.vae import accelerate_vae, set_layout
from artifex.engine.video import Mp4Stream, to_uint8_frames
from artifex.env import read_env, switch
from artifex.errors import GenerationCancelled
from artifex.kernels.fp8 import unquantized
from artifex.models import prefetch, read_ahead
from artifex.models.loader import DTYPES, Components, load_components, resolve_checkpoint
from artifex.models.lora import fuse_loras, parse_lora_specs
from artifex.models.registry import ModelSpec, get_model
from artifex.sysinfo import peak_memory

log = logging.getLogger("artifex")


@dataclass
class ProgressEvent:
    """One step of progress. ``stage`` is one of load, encode_text, encode_image, denoise, handoff, decode, write,
    done (handoff: a pipelined job moves to its second device). ``job``: the request's index in a batch."""

    stage: str
    step: int
    total: int
    elapsed_s: float
    timestep: float | None = None
    expert: int | None = None
    job: int | None = None
    clip: int | None = None  # S2V: the clip this event belongs to (0-based), of ``clips``
    clips: int | None = None


EventCallback = Callable[[ProgressEvent], None]


@dataclass
class GenerationResult:
    video_path: Path | None  # None on a rank that does not write (parallel layouts)
    sidecar_path: Path | None
    settings: Settings
    plan: Plan
    timings: dict[str, float]
    peak_memory: dict
    experts_per_step: list[int]
    switch_step: int | None  # first step run by the low-noise expert (A14B), else None
    attention: Choice
    memory: dict  # tier used, the planner's prediction, OOM step-downs
    latents: torch.Tensor = field(repr=False)  # final latents, CPU float32
    sidecar: dict = field(repr=False, default_factory=dict)


@dataclass(eq=False)
class GenerationJob:
    """One request on its way through the engine's stages (``Engine.prepare`` .. ``Engine.finish``): what a stage
    hands the next, on this device or, moved, on another (``artifex.multidevice.experts``)."""

    request: GenerationRequest
    spec: ModelSpec
    settings: Settings
    image: Image.Image | None
    emit: EventCallback
    device: torch.device  # where the job's tensors are
    t0: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    sidecar_extra: dict = field(default_factory=dict)  # keys a layout adds to the sidecar
    # 1. text
    use_cfg: list[bool] = field(default_factory=list)  # per expert
    cond: torch.Tensor | None = None  # (1, text_len, text_dim)
    uncond: torch.Tensor | None = None  # (1, text_len, text_dim), or empty without CFG
    # 2. latents
    noise: torch.Tensor | None = None  # the seeded start (1, z, T', H', W')
    condition: torch.Tensor | None = None  # TI2V: the encoded image; I2V: mask + encoded video
    frame_mask: torch.Tensor | None = None  # TI2V with an image: 0 where the image holds the frame
    # 3. denoising
    scheduler: object = None  # the sampler with its state (UniPC: its multistep history)
    experts: list[int] = field(default_factory=list)  # the expert of each step
    step: int = 0  # steps done
    latents: torch.Tensor | None = None
    attention_shape: tuple[int, int, int, int] | None = None
    attention: Choice | None = None
    step_clock: StepClock | None = None  # the ends of the preparation and of each step (the sidecar's denoise_steps)
    _last: float | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def written(self, video_path: Path | None) -> None:
        """Emit the "write" event once the mp4 is complete: the last point where a cancel stops the job. A cancel
        that lands here removes the mp4, so that a cancelled job leaves no video behind."""
        try:
            self.emit(ProgressEvent("write", 1, 1, self.elapsed()))
        except GenerationCancelled:
            if video_path is not None:
                video_path.unlink(missing_ok=True)
            raise

    def mark(self, name: str) -> None:
        """Record the time since the last mark (or the start) as stage ``name``."""
        now = time.perf_counter()
        self.timings[name] = round(now - (self._last or self.t0), 4)
        self._last = now


def expert_schedule(timesteps: torch.Tensor, boundary: float | None, num_train_timesteps: int,
                    switch_step: int | None = None) -> list[int]:
    """Which expert runs each step: 0 (high-noise) while t >= boundary * T, then 1 (low-noise); with
    ``switch_step`` (a two-expert request's alternative to the boundary) 0 before that step index, 1 from it."""
    if switch_step is not None:
        return [0 if i < switch_step else 1 for i in range(len(timesteps))]
    if boundary is None:
        return [0] * len(timesteps)
    return [0 if float(t) >= boundary * num_train_timesteps else 1 for t in timesteps]


def clean_prompt(text: str) -> str:
    """Repair mojibake (ftfy), undo HTML escapes, collapse whitespace: what Wan's text encoder saw in training."""
    import ftfy

    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split())


def initial_noise(spec: ModelSpec, settings: Settings) -> torch.Tensor:
    """The seeded starting latents (drawn on the CPU, so a seed means the same noise on every device)."""
    shape = (1, *spec.latent_shape(settings.width, settings.height, settings.frames))
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(settings.seed), dtype=torch.float32)


def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """Resize to cover (width, height), centre-crop, and scale to [-1, 1]: (1, 3, H, W)."""
    scale = max(width / image.width, height / image.height)
    w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    im = image.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - width) // 2, (h - height) // 2
    im = im.crop((left, top, left + width, top + height))
    arr = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
    return arr.permute(2, 0, 1).unsqueeze(0)


# The VAE decodes a video one latent frame at a time, carrying a causal cache; every convolution meets its last new
# input shape by the second latent frame (the cache is full from there on: test_vae_video), so a warm-up that
# decodes three has met every shape, and so every kernel and cuDNN plan, of the whole video's decode. At
# 1280x704x121 on the H200 a whole decode took 4.28 s (the server's first job) and the warm-up 10.33 s in all
# (ttv-h200.json).
WARM_UP_DECODE_FRAMES = 3
# Where the decode's first use of each kernel and cuDNN plan costs enough to warm it up beside the denoise
# (``Engine.start_decoder_warm_up``).
DECODER_WARM_UP_DEVICES = ("cuda",)


class Engine:
    """A loaded model and its plan; ``generate`` turns requests into mp4 files.

    ``generate`` reports progress through ``on_event``; a callback that raises
    ``artifex.errors.GenerationCancelled`` stops the generation at that point (between
    denoising steps, at the latest), and no video or sidecar is written.
    """

    def __init__(self, spec: ModelSpec, components: Components, plan: Plan, config: OptimizationConfig,
                 load_s: float = 0.0, load_timings: dict[str, float] | None = None):
        t0 = time.perf_counter()
        self.spec, self.c, self.plan, self.config = spec, components, plan, config
        self.device = torch.device(plan.device)
        self.dtype = DTYPES[plan.precision]
        # Seconds of each load stage (``Engine.load``: resolve, checkpoint_check, checkpoint_read, plan, lora,
        # fp8_quantize, placement); ``load_s`` their whole (the first imports of the libraries are the process's).
        self.load_timings: dict[str, float] = dict(load_timings or {})
        # decoder=light: TAEHV (engine/decoders.py) decodes instead of the VAE; a bad file fails here, before fp8
        self.light_decoder = load_light_decoder(spec, config, self.device, DTYPES[plan.vae_precision])
        self.loras: list[dict] = []  # what from_components fused (file, scale, expert, layers, seconds)
        self.attention = runtime_from_config(config, read_env().home)
        # Where this engine's work runs (one process by default; a parallel layout gives it another).
        self.layout = EngineLayout()
        self.memory_guard = MemoryGuard(self)
        self.text_cache = TextCache(config.text_cache_size)  # prompt embeddings by tokenizer, encoder and text
        self._pair_memo: dict[int, tuple] = {}  # per expert (id): cond and uncond as one batch
        self._decoded: set[tuple] = set()  # the decode shapes (``_decode_key``) this engine has decoded
        self.attention.check_explicit(self.device, self.dtype, spec.transformer.head_dim)
        check_fp8(config.fp8, self.device)
        # The light decoder's file, the attention runtime and the checks above: a load stage like the others
        self.load_timings["setup"] = round(time.perf_counter() - t0, 4)
        t = time.perf_counter()
        self.fp8_report = quantize_experts(spec, components.experts, self.device, self.dtype, config.fp8_keep) \
            if config.fp8 != "off" else None
        if self.fp8_report is not None:
            self.load_timings["fp8_quantize"] = round(time.perf_counter() - t, 4)
        self.weights = weights_of(components.text_encoder, components.vae, components.experts, config.fp8_weights)
        self.placement = Placement(components, plan.placement, self.device, config.fp8_weights, self.dtype)
        t = time.perf_counter()
        self._place_models()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the copies to the device count here, not in the first request
        self.load_timings["placement"] = round(time.perf_counter() - t, 4)
        self.load_s = load_s + (time.perf_counter() - t0)

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def load(cls, model: str, checkpoint: str | None = None, config: OptimizationConfig | None = None,
             single_files: dict[str, str | None] | None = None) -> Engine:
        """Load ``model`` (a registry name) from ``checkpoint`` (directory or hub id; default: the
        model's published checkpoint, or the built-in tiny one) and plan how to run it."""
        timeline.import_libraries()  # the first time in a process: the process's "imports", not this load's
        start = time.perf_counter()
        spec = get_model(model)
        config = config or OptimizationConfig()
        _quiet_libraries()
        path = resolve_checkpoint(spec, checkpoint, read_env().home)
        timings = {"resolve": round(time.perf_counter() - start, 4)}
        # On a GPU the tier first (from the shapes and the budget), so each component is read straight to its
        # place in it; on a CPU everything is read to where it runs anyway.
        devices = {}
        if resolve_device(config.device).type != "cpu":
            t = time.perf_counter()
            before = plan_before_load(spec, config)
            devices = load_devices(before.placement, torch.device(before.device), config.fp8_weights)
            timings["plan_before_load"] = round(time.perf_counter() - t, 4)
        try:
            components = load_components(spec, path, config.precision, single_files, devices=devices)
        finally:
            prefetch.stop_all()  # what it has not read yet the load has read itself
            read_ahead.finish()  # what it read for a place the plan did not choose goes
        timings["checkpoint_check"] = components.timings.get("checkpoint_check", 0.0)
        timings["checkpoint_read"] = round(sum(v for k, v in components.timings.items() if k.startswith("read.")), 4)
        for w in components.info.warnings:
            log.warning(w)
        return cls.from_components(spec, components, config, load_s=time.perf_counter() - start,
                                   load_timings=timings)

    @classmethod
    def from_components(cls, spec: ModelSpec, components: Components, config: OptimizationConfig | None = None,
                        load_s: float = 0.0, load_timings: dict[str, float] | None = None) -> Engine:
        """An engine over components already in memory (loaded, or random weights for benchmarks). ``load_s`` and
        ``load_timings``: what loading them took (``Engine.load``); the stages below are added to both."""
        start = time.perf_counter()
        timings = dict(load_timings or {})
        config = config or OptimizationConfig()
        config.check_supported()
        _quiet_libraries()
        plan = make_plan(spec, config, components)
        for r in plan.reasons:
            log.info("plan: %s", r)
        for w in scheduler_warnings(spec, components.scheduler_config):
            log.warning(w)
        timings["plan"] = round(time.perf_counter() - start, 4)
        # LoRAs go into the weights as loaded: before fp8 quantization and q/k/v fusion (in the constructor).
        t = time.perf_counter()
        loras = fuse_loras(components.experts, parse_lora_specs(config.lora), spec.name, device=plan.device)
        for r in loras:
            log.info("lora: fused %s (scale %g) into expert %d: %d layers in %.2f s", r["file"], r["scale"],
                     r["expert_index"], r["layers"], r["fuse_s"])
        if loras:
            timings["lora"] = round(time.perf_counter() - t, 4)
        if cls is Engine and spec.task == "s2v":  # S2V chains clips to the audio: its own generate
            from artifex.engine.s2v import S2VEngine as cls
        engine = cls(spec, components, plan, config, load_s=load_s + (time.perf_counter() - start),
                     load_timings=timings)
        engine.loras = loras
        return engine

    def _place_models(self) -> None:
        c, p = self.c, self.plan
        install(c.experts, self.attention)  # before compile, so compiled blocks call Artifex attention
        c.vae.to(dtype=DTYPES[p.vae_precision])
        accelerate_vae(c.vae, on=p.fast_vae)  # in place, so components reused by another engine are set either way
        if p.vae_tiling:
            self.tile_vae()
        if p.vae_slicing:
            c.vae.enable_slicing()
        set_layout(c.vae, p.channels_last)
        for expert in c.experts:
            if p.fast_dit:  # fuses q/k/v: after loading and fp8 quantization, before the tier's hooks (apply)
                accelerate_model(expert, compile_blocks=p.compile)
            elif p.compile:
                expert.compile_repeated_blocks(fullgraph=True)
        self.placement.apply()

    def tile_vae(self) -> None:
        """Spatial tiles in the VAE: the config's edge (overlapping by a quarter), else diffusers' default."""
        self.plan.vae_tiling = True
        edge = self.config.vae_tile_size
        if edge:
            self.c.vae.enable_tiling(tile_sample_min_height=edge, tile_sample_min_width=edge,
                                     tile_sample_stride_height=edge * 3 // 4, tile_sample_stride_width=edge * 3 // 4)
        else:
            self.c.vae.enable_tiling()

    def retier(self, tier: str) -> None:
        """Move every model to the placement of ``tier`` (a planner decision or an OOM step-down)."""
        self.placement.move_to(tier)
        self.plan.placement = tier

    # -- stages ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """UMT5 embeddings, zeroed past each prompt's length: (len(prompts), text_len, text_dim). A prompt met
        before (the same cleaned text, tokenizer and encoder weights) comes from ``text_cache``; the others are
        encoded as one batch."""
        cleaned = [clean_prompt(p) for p in prompts]
        keys = self.text_keys(cleaned)
        found = [self.text_cache.get(k) if k is not None else None for k in keys]
        todo = sorted({t for t, f in zip(cleaned, found, strict=True) if f is None})  # each missing text once
        encoded = dict(zip(todo, self._encode_texts(todo), strict=True)) if todo else {}
        rows = []
        for text, key, f in zip(cleaned, keys, found, strict=True):
            if f is None:
                f = encoded[text]
                if key is not None:
                    self.text_cache.put(key, f)
            rows.append(f.to(self.device))
        return torch.stack(rows)

    def text_keys(self, cleaned: list[str]) -> list[tuple | None]:
        """The text cache's keys of these cleaned prompts (None each while the cache is off)."""
        if not self.text_cache.enabled:
            return [None] * len(cleaned)
        tok_fp, enc_fp = tokenizer_fingerprint(self.c.tokenizer), encoder_fingerprint(self.c.text_encoder)
        return [TextCache.key(tok_fp, enc_fp, t, self.spec.text_len, self.dtype) for t in cleaned]

    def _encode_texts(self, cleaned: list[str]) -> torch.Tensor:
        """The text encoder on cleaned prompts: (len(cleaned), text_len, text_dim) in the engine's precision."""
        batch = self.c.tokenizer(cleaned, padding="max_length", max_length=self.spec.text_len, truncation=True,
                                 add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        with self.placement.text_encoder() as enc:
            ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
            hidden = enc(ids, mask).last_hidden_state
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)  # padding positions carry zeros
        return hidden.to(self.dtype)

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """VAE-encode pixels (1, 3, F, H, W) in [-1, 1] to normalized latents (mode of the posterior)."""
        with self.placement.vae() as vae:  # the VAE's device: the engine's, or another in a two-device layout
            z = vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mode().float()
        mean, std = self._latent_stats(z)
        return ((z - mean) / std).to(self.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents -> pixels (1, 3, F, H, W) in [-1, 1]."""
        return torch.cat(list(self.decode_chunks(latents)), dim=2)

    @torch.no_grad()
    def decode_chunks(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """Pixels (1, 3, t, H, W) in [-1, 1] as they are decoded: one latent frame at a time, or the whole video at
        once when the VAE decodes in tiles (``decode_stream``; under a split decode, nothing on a non-writing
        rank)."""
        if self.light_decoder is not None:  # opt-in: TAEHV's chunks, then its error measured on the first frames
            yield from self.light_decoder.stream(self, latents)
            return
        mean, std = self._latent_stats(latents)
        with self.placement.vae() as vae:
            z = (latents * std + mean).to(vae.dtype)
            if self.plan.channels_last:
                z = z.contiguous(memory_format=torch.channels_last_3d)
            yield from self.layout.decode_stream(vae, z)

    @torch.no_grad()
    def decode_only(self, job: GenerationJob) -> None:
        """A non-writing rank's part in a decode split over ranks: the same stages as ``finish``, nothing kept."""
        job.emit(ProgressEvent("decode", 0, 1, job.elapsed()))
        self.placement.park_experts()
        with contextlib.closing(self.decode_chunks(job.latents)) as chunks:
            for _ in chunks:
                pass
        job.mark("decode")

    def decode_to_mp4(self, latents: torch.Tensor, path: Path, fps: int) -> float:
        """Decode ``latents`` into an mp4 at ``path``, encoding each chunk on a thread while the next decodes.
        Returns the seconds spent finishing the file after the last pixels were decoded."""
        out = Mp4Stream(path, fps, background=True)
        try:
            with contextlib.closing(self.decode_chunks(latents)) as chunks:  # the VAE is released even on an error
                for pixels in chunks:
                    out.add(to_uint8_frames(pixels))
            decoded = time.perf_counter()
            out.close()
        except BaseException:
            out.abort()
            raise
        return time.perf_counter() - decoded

    def _decode_key(self, latents: torch.Tensor) -> tuple:
        """What a decode's kernels and cuDNN plans depend on: the latent channels and frame size (each latent frame
        decodes on its own, so not the frame count), the VAE's precision and layout."""
        return (latents.shape[1], *latents.shape[3:], self.plan.vae_precision, self.plan.channels_last)

    def start_decoder_warm_up(self, job: GenerationJob) -> threading.Thread | None:
        """A thread that decodes ``WARM_UP_DECODE_FRAMES`` latent frames of random latents of ``job``'s shape on a side
        CUDA stream while the denoise runs (``generate`` starts it once the steps have met every DiT kernel: after
        the first, or after the first fp8 step), pixels discarded; None where it does not apply.

        A process's first decode at a shape pays for the first use of each of its kernels and cuDNN plans; a one-off
        CLI run pays that after the denoise, on the critical path. The warm-up moves it beside the denoise, where
        the GPU's share it takes is its small decode. It applies on a CUDA device (``DECODER_WARM_UP_DEVICES``)
        where this engine has not decoded the shape yet (a server's warm-up has), the VAE stays on the device
        through the denoise and its working set fits beside the denoise's (``MemoryGuard.decode_warm_up_bytes``), to
        a request that writes its video with the VAE alone (no light decoder, no decode split over ranks);
        it runs only with ``ARTIFEX_DECODE_WARM_UP=on`` (off by default: at TI2V-5B 720p on an H200 it saved the
        decode 0.19 s and cost the denoise's second step 0.39 s, ttv-h200.json). The job's latents and video are
        unchanged: it decodes its own random latents (its own generator: no RNG the request uses moves). Its
        seconds, or its error (the decode then runs without it), go to the sidecar's ``decode_warm_up``."""
        key = self._decode_key(job.noise)
        if (self.device.type not in DECODER_WARM_UP_DEVICES or job.request.warm_up or key in self._decoded
                or "decode_warm_up" in job.sidecar_extra or not job.memory.get("decode_warm_up_fits")
                or not self.layout.writes_output or self.layout.joins_decode or self.light_decoder is not None
                or not switch("ARTIFEX_DECODE_WARM_UP")):
            return None
        frames = min(WARM_UP_DECODE_FRAMES, job.noise.shape[2])
        g = torch.Generator(self.device).manual_seed(0)
        z = torch.randn((*job.noise.shape[:2], frames, *job.noise.shape[3:]), generator=g, device=self.device,
                        dtype=job.noise.dtype)
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))  # the latents and the placed VAE
        report = job.sidecar_extra["decode_warm_up"] = {"latent_frames": frames, "beside": "denoise"}

        def run() -> None:
            t = time.perf_counter()
            try:
                with torch.no_grad(), torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    with contextlib.closing(self.decode_chunks(z)) as chunks:
                        for _ in chunks:
                            pass
                    if stream is not None:
                        stream.synchronize()
                self._decoded.add(key)
            except Exception as e:  # the job's own decode still runs, without the head start
                report["error"] = f"{type(e).__name__}: {e}"
                log.warning("decoder warm-up failed; the decode runs without it: %s", report["error"])
            report["seconds"] = round(time.perf_counter() - t, 4)

        thread = threading.Thread(target=run, name="artifex-decoder-warm-up", daemon=True)
        thread.start()
        return thread

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.c.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=like.device).view(shape)
        std = torch.tensor(cfg.latents_std, dtype=torch.float32, device=like.device).view(shape)
        return mean, std

    def make_scheduler(self, settings: Settings):
        """The request's sampler (``artifex.engine.samplers``): UniPC from the checkpoint's config, Euler or DMD."""
        return make_sampler(settings, self.c.scheduler_config)

    # -- the whole generation -------------------------------------------------------------
    @torch.no_grad()
    def generate(self, request: GenerationRequest, on_event: EventCallback | None = None,
                 output_dir: str | Path | None = None) -> GenerationResult:
        job = self.prepare(request, on_event)
        guard = self.memory_guard
        job.memory = guard.fit(job)
        guard.start()
        with matmul_precision(self.plan.tf32):
            # 1. Text embeddings and 2. seeded noise (1, z, T', H', W') with the image condition, if any.
            self.encode(job)
            guard.stage_peak(job, "encode_text")

            # 3. Denoise every step: the sampler (UniPC by default), the MoE switch at the boundary, CFG per expert
            #    (after an OOM step-down, again from the noise).
            def denoise():
                warm_up: list[threading.Thread | None] = []

                def after_step(step: int) -> None:
                    # Once the steps have met every DiT kernel (the first step; with fp8's unquantized first steps,
                    # the first quantized one too): Triton's compiler is not safe to run from two threads at once,
                    # and the warm-up compiles the VAE's kernels.
                    met = 1 + (self.plan.fp8_bf16_steps if self.plan.fp8 != "off" else 0)
                    if not warm_up and met <= step < len(job.scheduler.timesteps):
                        warm_up.append(self.start_decoder_warm_up(job))

                try:
                    self.start_denoising(job)
                    self.denoise(job, on_step=after_step)
                finally:
                    if warm_up and warm_up[0] is not None:
                        warm_up[0].join()

            guard.stepping_down("denoise", denoise, job)
            if job.frame_mask is not None:  # TI2V: the frames given by the image stay the encoded image
                job.latents = (1 - job.frame_mask) * job.condition + job.frame_mask * job.latents
            job.mark("denoise")
            if (steps := job.step_clock.summary()) is not None:
                job.sidecar_extra["denoise_steps"] = steps
            guard.stage_peak(job, "denoise")
            if not self.layout.writes_output:  # another rank of a parallel group writes (this one may help decode)
                if self.layout.joins_decode:
                    self.decode_only(job)
                return self._result(job, None)

            # 4. Decode to pixels and 5. write the mp4 and its sidecar.
            return self.finish(job, output_dir)

    # -- the stages of a generation, also called one by one (artifex.multidevice.experts) ----------
    def prepare(self, request: GenerationRequest, on_event: EventCallback | None = None) -> GenerationJob:
        """Check and resolve ``request``: the job the stages below carry forward."""
        if get_model(request.model) is not self.spec:
            raise ValueError(f"this engine runs {self.spec.name}, the request asks for {request.model}")
        spec, s, image = resolve_request(request, checkpoint_shift=checkpoint_shift(self.c.scheduler_config))
        for w in s.warnings:
            log.warning(w)
        return GenerationJob(request=request, spec=spec, settings=s, image=image, emit=on_event or (lambda e: None),
                   device=self.device)

    @torch.no_grad()
    def encode_prompts(self, job: GenerationJob) -> None:
        """1. Text: the conditional and (if any expert uses CFG) unconditional embeddings of ``job``."""
        s = job.settings
        job.emit(ProgressEvent("encode_text", 0, 1, job.elapsed()))
        job.use_cfg = [g > 1.0 for g in s.guidance]
        prompts = [s.prompt] + ([s.negative_prompt] if any(job.use_cfg) else [])
        embeds = self.encode_text(prompts)  # (1 or 2, text_len, text_dim)
        job.cond, job.uncond = embeds[:1], embeds[1:2]
        job.mark("encode_text")

    @torch.no_grad()
    def encode(self, job: GenerationJob) -> None:
        """1. The prompt embeddings and 2. the starting latents and image condition of ``job``."""
        s, spec, emit = job.settings, job.spec, job.emit
        self.encode_prompts(job)

        # 2. Latents: seeded noise (1, z, T', H', W') and the image condition, if any.
        job.noise = initial_noise(spec, s).to(self.device)
        if job.image is not None:
            emit(ProgressEvent("encode_image", 0, 1, job.elapsed()))
            pixels = image_to_tensor(job.image, s.width, s.height).unsqueeze(2)  # (1, 3, 1, H, W)
            if spec.expand_timesteps:  # TI2V: the image is the first latent frame
                job.condition = self.encode_video(pixels)
                job.frame_mask = torch.ones_like(job.noise[:, :1])
                job.frame_mask[:, :, 0] = 0  # 0 where the image holds the frame
            else:  # I2V: mask channels + the encoded [image, black frames...] video
                video = torch.cat([pixels, pixels.new_zeros(1, 3, s.frames - 1, s.height, s.width)], dim=2)
                job.condition = torch.cat([self._i2v_mask(job.noise), self.encode_video(video)], dim=1)
            job.mark("encode_image")

    def start_denoising(self, job: GenerationJob) -> None:
        """A fresh scheduler and the expert of each step; the latents back to the noise; the attention backend."""
        job.step_clock = StepClock(self.device)
        s, arch = job.settings, job.spec.transformer
        job.scheduler = self.make_scheduler(s)
        job.scheduler.set_timesteps(s.steps, device=self.device)
        job.experts = expert_schedule(job.scheduler.timesteps, self.c.info.boundary_ratio,
                                      job.scheduler.config.num_train_timesteps, s.switch_step)
        job.latents, job.step = job.noise, 0
        batch = self.layout.attention_batch or (self.plan.cfg_batch if any(job.use_cfg) else 1)
        heads = arch.heads // self.layout.attention_heads_divisor
        job.attention_shape = (batch, job.spec.tokens(s.width, s.height, s.frames), heads, arch.head_dim)
        job.attention = self.attention.prepare(job.attention_shape, self.dtype, self.device)
        job.step_clock.mark()

    @torch.no_grad()
    def denoise(self, job: GenerationJob, until: int | None = None,
                on_step: Callable[[int], None] | None = None) -> None:
        """Steps ``job.step`` up to ``until`` (default: the last) of ``job``'s scheduler; the MoE switch at the
        boundary (``expert_schedule``), CFG per expert; ``on_step(steps done)`` after each. The DiT caches of the
        experts these steps use are cleared at the end (they hold this request's tensors)."""
        s, timesteps = job.settings, job.scheduler.timesteps
        steps = range(job.step, len(timesteps) if until is None else until)
        try:
            for i in steps:
                ts, expert = timesteps[i], job.experts[i]  # expert 0 while t >= boundary * 1000, then 1
                if i > steps.start and job.experts[i - 1] != expert:  # the MoE switch: the last expert's caches go
                    self._forget(self.c.experts[job.experts[i - 1]])
                self.placement.activate_expert(expert)  # a no-op unless the expert changes and must be moved
                if i + 1 < len(timesteps) and job.experts[i + 1] != expert:  # the last step before the switch:
                    self.placement.prefetch_expert(job.experts[i + 1])  # the next expert's copy overlaps it, if room
                x = job.latents
                if job.frame_mask is not None:
                    x = (1 - job.frame_mask) * job.condition + job.frame_mask * job.latents
                elif job.condition is not None:
                    x = torch.cat([job.latents, job.condition], dim=1)
                timestep = self._timestep(ts, job.frame_mask, job.latents)
                with unquantized(self._unquantized_step(i, len(timesteps))):
                    noise = self.predict(self.c.experts[expert], x.to(self.dtype), timestep, job.cond, job.uncond,
                                         s.guidance[expert] if job.use_cfg[expert] else None)
                job.latents = job.scheduler.step(noise, ts, job.latents, return_dict=False)[0]
                job.step = i + 1
                if job.step_clock is not None:
                    job.step_clock.mark()
                job.emit(ProgressEvent("denoise", i + 1, len(timesteps), job.elapsed(), timestep=float(ts),
                                       expert=expert))
                if on_step is not None:
                    on_step(job.step)
        finally:
            for expert in sorted({job.experts[i] for i in steps}):
                self._forget(self.c.experts[expert])

    def _unquantized_step(self, i: int, steps: int) -> bool:
        """Whether step ``i`` of ``steps`` runs without fp8 compute (``fp8_bf16_steps``: the first and last N)."""
        edge = self.plan.fp8_bf16_steps
        return edge > 0 and (i < edge or i >= steps - edge)

    def _forget(self, model) -> None:
        """Drop a request's tensors cached for ``model``: its CFG pair and the DiT's text context and K/V."""
        self._pair_memo.pop(id(model), None)
        clear_caches(model)

    @torch.no_grad()
    def finish(self, job: GenerationJob, output_dir: str | Path | None = None) -> GenerationResult:
        """4. Decode ``job``'s latents and 5. write the mp4 (each decoded chunk goes to the encoder thread at once),
        then the sidecar. A warm-up decodes only its first latent frames (``WARM_UP_DECODE_FRAMES``) where this
        process decodes alone with the VAE (the light decoder's chunks of frames are left whole: it is fast)."""
        s = job.settings
        if job.request.warm_up and not self.layout.joins_decode and self.light_decoder is None:
            job.latents = job.latents[:, :, :WARM_UP_DECODE_FRAMES]
        job.emit(ProgressEvent("decode", 0, 1, job.elapsed()))
        self.placement.park_experts()
        video_path = Path(s.output) if s.output else default_output(output_dir, job.spec.name, s.seed)
        start = time.perf_counter()
        finish = self.memory_guard.stepping_down("decode", lambda: self.decode_to_mp4(job.latents, video_path, s.fps),
                                                 job)
        job.timings["decode"] = round(time.perf_counter() - start - finish, 4)  # with the encoder overlapping
        self._decoded.add(self._decode_key(job.latents))
        job.timings["write"] = round(finish, 4)  # what was left to encode after the last frame decoded
        self.memory_guard.stage_peak(job, "decode")
        job.written(video_path)
        job.timings["total"] = round(job.elapsed(), 4)
        result = self._result(job, video_path)
        result.sidecar = build_sidecar(self, job.request, result, {**self.layout.sidecar, **job.sidecar_extra})
        write_json(result.sidecar_path, result.sidecar)
        job.emit(ProgressEvent("done", 1, 1, job.timings["total"]))
        return result

    def _result(self, job: GenerationJob, video_path: Path | None) -> GenerationResult:
        switch = job.experts.index(1) if 1 in job.experts else None
        return GenerationResult(
            video_path=video_path, sidecar_path=video_path.with_suffix(".json") if video_path else None,
            settings=job.settings, plan=self.plan, timings=job.timings,
            peak_memory=peak_memory(job.device, self.memory_guard.peak_floor),
            experts_per_step=job.experts, switch_step=switch, attention=job.attention, memory=job.memory,
            latents=job.latents.float().cpu())

    def _dit_forward(self, job: GenerationJob) -> str:
        """Which DiT forward the planner counts (``memory.DIT_FORWARDS``): Artifex's, or diffusers' (``fast_dit``
        off), which for TI2V given an image embeds one timestep per token (Artifex's embeds the distinct ones)."""
        if self.plan.fast_dit:
            return "artifex"
        return "diffusers_per_token" if job.image is not None else "diffusers"

    def _i2v_mask(self, latents: torch.Tensor) -> torch.Tensor:
        """I2V's 4-channel mask: 1 for the latent slots holding the given first frame, else 0."""
        _, _, t, h, w = latents.shape
        stride = self.spec.vae.temporal_stride
        mask = torch.zeros(1, stride, t, h, w, device=latents.device)
        mask[:, :, 0] = 1  # the first pixel frame, repeated to fill the first latent frame's slots
        return mask

    def _timestep(self, ts: torch.Tensor, frame_mask: torch.Tensor | None, latents: torch.Tensor) -> torch.Tensor:
        """One timestep per video; TI2V with an image: one per token, 0 on the given frame."""
        if frame_mask is None:
            return ts.expand(latents.shape[0])
        _, ph, pw = self.spec.transformer.patch
        return (frame_mask[0, 0][:, ::ph, ::pw] * ts).flatten().unsqueeze(0)  # (1, tokens)

    def predict(self, model, x, timestep, cond, uncond, guidance: float | None) -> torch.Tensor:
        """The flow prediction of one step: the layout's (CFG-parallel) where it has one, else ``guided``."""
        return (self.layout.predict or self.guided)(model, x, timestep, cond, uncond, guidance)

    def guided(self, model, x, timestep, cond, uncond, guidance: float | None) -> torch.Tensor:
        """The flow prediction, with classifier-free guidance when ``guidance`` is set (fp32 result): two passes
        sharing the first self-attention, or one batch (``plan.cfg_batch`` 2)."""
        if guidance is None:
            return model(hidden_states=x, timestep=timestep, encoder_hidden_states=cond, return_dict=False)[0].float()
        if self.plan.cfg_batch == 2:
            both = model(hidden_states=torch.cat([x, x]), timestep=torch.cat([timestep, timestep]),
                         encoder_hidden_states=self._pair(model, cond, uncond), return_dict=False)[0].float()
            pos, neg = both.chunk(2)
        else:
            with share_first_block(model):  # the two passes' first self-attention is the same: computed once
                pos = model(hidden_states=x, timestep=timestep, encoder_hidden_states=cond,
                            return_dict=False)[0].float()
                neg = model(hidden_states=x, timestep=timestep, encoder_hidden_states=uncond,
                            return_dict=False)[0].float()
        return neg + guidance * (pos - neg)

    def _pair(self, model, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """cond and uncond as one batch, the same tensor for every step of a request (the DiT caches per tensor);
        kept per expert, like the DiT's caches."""
        memo = self._pair_memo.get(id(model))
        if memo is None or memo[0] is not cond or memo[1] is not uncond:
            memo = self._pair_memo[id(model)] = (cond, uncond, torch.cat([cond, uncond]))
        return memo[2]


@contextlib.contextmanager
def matmul_precision(tf32: bool):
    """TF32 for fp32 matmuls/convs for the length of one generation, then restore."""
    old = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old[0])
        torch.backends.cudnn.allow_tf32 = old[1]


def _quiet_libraries() -> None:
    """Loading bars of diffusers/transformers would interleave with ours."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
