"""The plan: how a model runs on this machine, decided once, with the reasons.

The request says what to generate; the config says what the user wants switched on;
the plan is what will actually happen here (device, precision, attention, where each
model lives, CFG batching, compile), and every result carries it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch

from artifex.config import OptimizationConfig, resolve_vae_precision
from artifex.env import switch
from artifex.errors import InvalidRequestError
from artifex.models.registry import ModelSpec

log = logging.getLogger("artifex")



@dataclass
class Plan:
    device: str
    precision: str  # DiT and text encoder
    vae_precision: str  # what runs (config's auto resolved: bf16 on CUDA, fp32 on a CPU)
    attention: str  # as requested ("auto" or a backend); each result records the backend chosen per shape
    placement: str  # a memory tier (artifex.engine.placement.TIERS); a request may move to a leaner one
    cfg_batch: int  # 2: cond and uncond in one batch
    compile: bool
    fast_dit: bool
    fast_vae: bool
    fp8: str  # off, gemm, all
    fp8_bf16_steps: int  # with fp8: the first and last N steps run without it
    tf32: bool
    channels_last: bool
    vae_slicing: bool
    vae_tiling: bool
    config_hash: str
    decoder: str = "full"  # latents to pixels: the VAE, or "light" (TAEHV, engine/decoders.py)
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_device(name: str) -> torch.device:
    """The device to run on, with an index for CUDA (some torch.cuda calls need one)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidRequestError("device", f"{name} asked for, but this torch build sees no CUDA GPU",
                                      "cpu, auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidRequestError("device", f"{name} does not exist",
                                      [f"cuda:{i}" for i in range(torch.cuda.device_count())])
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def memory_budget(config: OptimizationConfig, device: torch.device) -> int | None:
    """Bytes to plan for: vram_budget, else what the GPU has free; None on a CPU without a budget."""
    from artifex.engine.memory import parse_budget

    budget = parse_budget(config.vram_budget)
    if budget is None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free + torch.cuda.memory_allocated(device)  # what this process holds is plannable too
    return budget


def make_plan(spec: ModelSpec, config: OptimizationConfig, components) -> Plan:
    """Decide placement, batching and compile for ``spec`` under ``config`` on this machine."""
    from artifex.engine.memory import plan_memory, weights_of

    reasons = list(config.check_supported())
    device = resolve_device(config.device)
    requested = config.requested_tier()
    cfg_batch = 2 if config.max_batch_size >= 2 else 1
    budget = memory_budget(config, device)
    if budget is not None and device.type == "cuda" and config.vram_budget:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
        reasons.append(f"vram_budget {budget / 2**30:.1f} GiB enforced on {device}")
    vae_precision, why_vae = resolve_vae_precision(config.vae_precision, device.type)
    if why_vae:
        reasons.append(why_vae)
    weights = weights_of(components.text_encoder, components.vae, components.experts, config.fp8_weights)
    w, h = spec.sizes[0]  # planned at the model's default size; each request is planned again at its own
    forward = "artifex" if config.fast_dit else "diffusers"
    placement, vae_tiling, _, why = plan_memory(spec, weights, w, h, spec.frames, cfg_batch, config.vae_tiling,
                                                forward, budget, requested, vae_precision, config.vae_tile_size)
    reasons += why
    if placement != "resident":
        reasons.append(f"memory tier: {placement}")
    reasons += on_demand_reasons(placement, weights, config.text_cache_size)
    if cfg_batch == 2:
        reasons.append("max_batch_size >= 2: CFG's conditional and unconditional passes run as one batch")
    elif config.fast_dit:
        reasons.append("CFG in two passes: the first block's self-attention runs once per step and the second pass "
                       "takes it (the same tensor, bit for bit)")
    if config.use_torch_compile:
        reasons.append("use_torch_compile: repeated transformer blocks compiled (first steps include compile time)")
    elif device.type == "cuda":
        reasons.append("use_torch_compile off (the default): compiling the blocks costs a one-off generation its "
                       "first steps; a server with it on (--preset production or use_torch_compile = true) pays that "
                       "once, in its warm-up")
    if config.fp8 == "off" and device.type == "cuda":
        reasons.append("fp8 off (the default): the exact bf16 model; --fp8 all is faster and lossy (its error vs "
                       "bf16 is probed at load and written to the sidecar)")
    if config.fp8 != "off":
        reasons.append(f"fp8={config.fp8}: DiT block linears as e4m3 matmuls"
                       + (", attention fa3-fp8" if config.fp8 == "all" else "") + "; error vs bf16 probed at load")
    if config.fp8_weights:
        reasons.append("fp8_weights: DiT linear weights stored in float8 e4m3, computed in " + config.precision)
    if config.fp8_bf16_steps:  # the config refuses it with fp8 off
        reasons.append(f"fp8_bf16_steps={config.fp8_bf16_steps}: the first and last {config.fp8_bf16_steps} "
                       "denoising steps run without fp8 compute")
    channels_last = config.use_channels_last or (config.fast_vae and device.type == "cuda")
    if channels_last and not config.use_channels_last:
        reasons.append("fast_vae on CUDA: the VAE runs in channels_last_3d (its fused norms read that layout and "
                       "cuDNN needs no layout transposes: kernels-vae-h100.json)")
    if device.type == "cuda" and config.decoder != "light" and switch("ARTIFEX_DECODE_WARM_UP"):
        reasons.append("decoder warm-up: a process's first decode at a shape is met first by a decode of three latent "
                       "frames beside the denoise (once its steps have met the DiT's kernels, on a side stream), where "
                       "the VAE stays on the GPU and one latent frame's decode fits beside the denoise "
                       "(ARTIFEX_DECODE_WARM_UP=on; off by default)")
    if config.decoder == "light":
        reasons.append(f"decoder=light: TAEHV from {config.light_decoder} decodes instead of the VAE (less detail); "
                       + (f"the VAE decodes the first {config.light_decoder_check} latent frames too, for the "
                          "sidecar's error figures" if config.light_decoder_check else "no error check"))
    return Plan(
        device=str(device),
        precision=config.precision,
        vae_precision=vae_precision,
        attention=config.attention,
        placement=placement,
        cfg_batch=cfg_batch,
        compile=config.use_torch_compile,
        fast_dit=config.fast_dit,
        fast_vae=config.fast_vae,
        fp8=config.fp8,
        fp8_bf16_steps=config.fp8_bf16_steps,
        tf32=config.tf32,
        channels_last=channels_last,
        vae_slicing=config.vae_slicing,
        vae_tiling=vae_tiling,
        config_hash=config.hash(),
        decoder=config.decoder,
        reasons=reasons,
    )


def plan_before_load(spec: ModelSpec, config: OptimizationConfig) -> Plan:
    """The plan from the model's shapes alone (its components on the meta device, nothing read): what
    ``Engine.load`` decides before reading weights, so that each component is read straight to where the memory
    tier keeps it (``placement.load_devices``). The engine plans again on what it loaded."""
    from types import SimpleNamespace

    from artifex.models.configs import meta_components

    text_encoder, vae, experts = meta_components(spec, config.precision)
    return make_plan(spec, config, SimpleNamespace(text_encoder=text_encoder, vae=vae, experts=experts))


def on_demand_reasons(tier: str, weights, text_cache_size: int) -> list[str]:
    """What the tier does with the text encoder and VAE it brings to the device only while they run."""
    from artifex.engine.placement import on_demand

    text, vae = on_demand(tier)
    out = []
    if text:
        out.append(f"{tier}: the text encoder ({weights.text_encoder / 2**30:.1f} GiB) stays in pinned host memory "
                   "and is copied in for each encode, never copied back"
                   + (f"; a prompt or negative prompt met before skips it (the last {text_cache_size} are kept)"
                      if text_cache_size else "; text_cache_size 0: every request encodes"))
    if vae:
        out.append(f"{tier}: the VAE ({weights.vae / 2**30:.1f} GiB) stays in pinned host memory and is copied in "
                   "for each decode")
    return out
