"""The memory planner: predicted peak device memory of each tier, and the fastest tier that fits.

Peak = the most, over the stages (text encoding, denoising, VAE decode), of the weights
on the device in that stage plus that stage's activations. Weights are counted exactly
from the modules (or from the model classes instantiated on the meta device when
nothing is loaded). Activations follow the shapes: the DiT's grow with tokens x width,
the VAE decode's with the pixels of one frame (it decodes frame by frame with a cache; tiled, the whole
video it returns counts too),
and the text encoder's are small. The per-token and per-pixel constants are fitted to
stage peaks measured on the GPU (`python -m artifex.bench.memory OUT`, see benchmarks/results/LOG.md);
a tier fits a budget with ``HEADROOM`` to spare. `artifex plan` prints the table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from artifex.config import parse_budget  # noqa: F401  (where the budget is read; the planner takes it from here)
from artifex.engine.placement import TIERS
from artifex.errors import InvalidRequestError
from artifex.models.registry import ModelSpec

GIB = 2**30

# Activation constants (bytes), fitted to stage peaks measured on the GPU (benchmarks/results/memory-stages-*.json):
# DiT per token and batch element, per unit of width: the engine's own forward (eager, as by default; the FFN's
# GELU in the GEMM epilogue), 2-block models at real widths over one CFG step: 55.3 KB/token for TI2V-5B (dim
# 3072), 92.2 KB/token for A14B (dim 5120) on the H200 (memory-stages-denoise-h200.json; the same under block
# offload once the streamed blocks are counted). The width-wide fp32 residual and norm temporaries set the peak,
# not the FFN's (B, L, ffn) product, so width alone predicts it (diffusers' forward: 83 and 114 KB/token).
# VAE decode as the engine runs it (``engine.vae.decode_any``, each chunk turned into uint8 frames on the GPU; H200):
# streamed (frame by frame, causal caches included), bytes per output pixel of one frame, per VAE and precision; tiled
# (diffusers' tiles, the whole video returned at once), the tiles' own working set with diffusers' default 256-pixel
# tiles plus bytes per element of the whole video (the video, diffusers' tile list and blend, the uint8 conversion's
# temporaries), fitted to the 832x480 and 1280x720 decodes of the Wan2.1 VAE.
DIT_BYTES_PER_TOKEN_DIM = 18.0
# diffusers' own forward (``fast_dit`` off), per unit of width and of FFN width: 83.1 and 113.7 KB/token measured
# for TI2V-5B and A14B (memory-stages-denoise-h200.json, path "diffusers")
DIFFUSERS_BYTES_PER_TOKEN_DIM = 15.0
DIFFUSERS_BYTES_PER_TOKEN_FFN = 2.67
DIT_FORWARDS = ("artifex", "diffusers", "diffusers_per_token")
VAE_BYTES_PER_PIXEL = {"wan2.2": {"fp32": 23_700.0, "bf16": 11_870.0}, "wan2.1": {"fp32": 22_660.0, "bf16": 11_340.0}}
VAE_TILE_BYTES = {"wan2.2": {"fp32": 0.515e9, "bf16": 0.114e9}, "wan2.1": {"fp32": 0.347e9, "bf16": 0.079e9}}
VAE_TILED_VIDEO_BYTES = {"fp32": 17.1, "bf16": 9.65}
TEXT_ACTIVATION_BYTES = 0.45 * GIB
SLACK = 1.08  # allocator rounding and fragmentation
# A tier fits a budget when its predicted peak (allocated bytes) is at most this share of it: the budget caps what
# the caching allocator reserves, and under that cap fragmentation needs room. Measured on the H200: A14B 1280x720
# with a whole-frame decode predicted at 0.90 of 24 GiB ran out in the decode (19.1 GiB allocated, 24.0 reserved);
# runs at 0.74 of 16 GiB and 0.52 of 24 GiB completed (benchmarks/results/LOG.md, 2026-11-26).
HEADROOM = 0.85


def fits(peak_bytes: int, budget: int) -> bool:
    return peak_bytes <= HEADROOM * budget


@dataclass
class Weights:
    """Bytes of each component as it sits on the device."""

    text_encoder: int
    vae: int
    experts: list[int]
    expert_block: int  # the largest repeated block of an expert (block offload keeps ~2 on the device)
    expert_leaf: int  # the largest single layer (leaf offload)
    expert_rest: int  # expert parameters outside the repeated blocks (embeddings, output)


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def weights_of(text_encoder, vae, experts, fp8_weights: bool = False) -> Weights:
    def expert_bytes(e):
        total = module_bytes(e)
        if fp8_weights:  # linear weights stored in 1 byte
            lin = sum(m.weight.numel() * (m.weight.element_size() - 1) for m in e.modules()
                      if isinstance(m, torch.nn.Linear))
            total -= lin
        return total

    blocks = list(experts[0].blocks)
    block = max(expert_bytes(b) for b in blocks)
    leaf = max(module_bytes(m) // (2 if fp8_weights else 1) for m in experts[0].modules()
               if isinstance(m, torch.nn.Linear))
    rest = expert_bytes(experts[0]) - sum(expert_bytes(b) for b in blocks)
    return Weights(module_bytes(text_encoder), module_bytes(vae), [expert_bytes(e) for e in experts], block, leaf,
                   rest)


@dataclass
class Estimate:
    tier: str
    peak_bytes: int
    stages: dict[str, int] = field(default_factory=dict)
    # What the tier costs in time besides memory: bytes it copies from host to GPU memory for each request (the
    # on-demand text encoder, skipped when the prompt cache answers; swapped experts; an on-demand VAE), and for
    # each DiT forward pass (a group-offload tier streams the running expert's weights through the GPU every pass).
    copy_per_request: int = 0
    copy_per_forward: int = 0

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    @property
    def stages_gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 2) for k, v in self.stages.items()}

    def to_dict(self) -> dict:
        """The peak and the stages in GiB, unrounded: whoever prints them rounds both the same way, so a table
        never shows a peak below one of its own stages (rounding the stages to 2 decimals first and then to 1,
        the peak straight to 1, printed a peak of 12.1 beside a stage of 12.149 -> 12.15 -> 12.2)."""
        d = asdict(self)
        d["peak_gib"] = self.peak_gib
        d["stages_gib"] = {k: v / GIB for k, v in self.stages.items()}
        d["copy_per_request_gib"], d["copy_per_forward_gib"] = self.copy_per_request / GIB, self.copy_per_forward / GIB
        for k in ("stages", "copy_per_request", "copy_per_forward"):
            del d[k]
        return d


def activations(spec: ModelSpec, width: int, height: int, frames: int, batch: int, vae_tiling: bool,
                dit_forward: str = "artifex", vae_precision: str = "fp32", vae_tile_size: int = 0) -> dict[str, int]:
    """Activation bytes of each stage. ``dit_forward`` (``DIT_FORWARDS``): the engine's DiT forward, diffusers'
    (``fast_dit`` off), or diffusers' with one timestep per token (TI2V given an image)."""
    if dit_forward not in DIT_FORWARDS:
        raise ValueError(f"dit_forward {dit_forward!r}; one of {', '.join(DIT_FORWARDS)}")
    a = spec.transformer
    tokens = spec.tokens(width, height, frames)
    if dit_forward == "artifex":
        dit = batch * tokens * DIT_BYTES_PER_TOKEN_DIM * a.dim
        # the running expert's cached cross-attention K/V (``engine.dit``): every block, CFG's two contexts, bf16
        dit += a.layers * 2 * 2 * spec.text_len * a.dim * 2
        if batch == 1:  # CFG in two passes: the first block's self-attention branch held between them, bf16
            dit += tokens * a.dim * 2  # (``engine.dit.share_first_block``)
    else:
        dit = batch * tokens * (DIFFUSERS_BYTES_PER_TOKEN_DIM * a.dim + DIFFUSERS_BYTES_PER_TOKEN_FFN * a.ffn)
    if dit_forward == "diffusers_per_token":  # fp32 modulation per token (6 x dim) and its projection
        dit += batch * tokens * 6 * a.dim * 4 * 2
    precision = "bf16" if vae_precision == "bf16" else "fp32"
    if vae_tiling:  # the tiles' working set, scaled by the tile's area, and the whole video returned at once
        tile = VAE_TILE_BYTES[spec.vae.kind][precision] * ((vae_tile_size or 256) / 256) ** 2
        decode = tile + 3 * spec.decode_frames(frames) * width * height * VAE_TILED_VIDEO_BYTES[precision]
    else:  # streamed: one latent frame's activations and pixels at a time
        decode = VAE_BYTES_PER_PIXEL[spec.vae.kind][precision] * width * height
    return {"encode_text": int(TEXT_ACTIVATION_BYTES), "denoise": int(dit), "decode": int(decode)}


def estimate(spec: ModelSpec, w: Weights, tier: str, width: int, height: int, frames: int, batch: int = 1,
             vae_tiling: bool = False, dit_forward: str = "artifex", vae_precision: str = "fp32",
             vae_tile_size: int = 0) -> Estimate:
    act = activations(spec, width, height, frames, batch, vae_tiling, dit_forward, vae_precision,
                      vae_tile_size)
    all_experts, one_expert = sum(w.experts), max(w.experts)
    if tier == "resident":
        on = {"encode_text": w.text_encoder + w.vae + all_experts}
        on["denoise"] = on["decode"] = on["encode_text"]
    elif tier in ("text_offload", "expert_swap"):
        experts = all_experts if tier == "text_offload" else one_expert
        on = {"encode_text": w.text_encoder + w.vae + experts, "denoise": w.vae + experts, "decode": w.vae + experts}
    elif tier == "model_offload":
        on = {"encode_text": w.text_encoder, "denoise": one_expert, "decode": w.vae}
    else:
        on = {"encode_text": w.text_encoder, "denoise": streamed_bytes(w, tier), "decode": w.vae}
    stages = {k: int((on[k] + act[k]) * SLACK) for k in act}
    return Estimate(tier, max(stages.values()), stages, *copies(w, tier))


def copies(w: Weights, tier: str) -> tuple[int, int]:
    """(bytes per request, bytes per DiT forward pass) that ``tier`` copies from host to GPU memory (the
    placement's moves: ``engine.placement``), in a steady stream of requests."""
    text = 0 if tier == "resident" else w.text_encoder
    if tier in ("resident", "text_offload"):
        return text, 0
    if tier in ("expert_swap", "model_offload"):  # each expert comes in once a request (the next starts again with
        # the first); model_offload brings the VAE in for the decode too
        return text + sum(w.experts) + (w.vae if tier == "model_offload" else 0), 0
    return text + w.vae, max(w.experts)  # group offload: the running expert's groups, every pass


def streamed_bytes(w: Weights, tier: str) -> int:
    """Expert weights on the device while a group-offload tier denoises: the running group and the prefetched
    next one (a block, or a layer), and the parameters outside the blocks."""
    return 2 * (w.expert_block if tier == "block_offload" else w.expert_leaf) + w.expert_rest


def prefetch_peak(est: Estimate, w: Weights) -> int:
    """A swap tier's denoise stage with the next expert copied in beside the active one (its last step)."""
    return est.stages["denoise"] + int(max(w.experts) * SLACK)


def prefetch_fits(est: Estimate, w: Weights, budget: int | None) -> bool:
    """Whether a swap tier may prefetch the next expert: there is one (A14B), and ``prefetch_peak`` fits
    ``budget`` (never without a budget: a CPU)."""
    return (budget is not None and len(w.experts) > 1 and est.tier in ("expert_swap", "model_offload")
            and fits(prefetch_peak(est, w), budget))


def tiers_for(spec: ModelSpec) -> list[str]:
    """The tiers that differ for this model (expert_swap only for the two-expert A14B)."""
    return [t for t in TIERS if t != "expert_swap" or spec.experts == 2]


def choose_tier(estimates: list[Estimate], budget: int, requested: str = "auto") -> tuple[str, list[str]]:
    """The fastest tier whose predicted peak fits ``budget`` (with ``HEADROOM``); refusals say the numbers."""
    by_tier = {e.tier: e for e in estimates}
    if requested != "auto":
        e = by_tier[requested]
        if not fits(e.peak_bytes, budget):
            ok = ", ".join(x.tier for x in estimates if fits(x.peak_bytes, budget)) or "none"
            raise InvalidRequestError("memory_tier", f"{requested} needs ~{e.peak_gib:.1f} GiB by the planner (a "
                                                     f"budget of ~{e.peak_gib / HEADROOM:.1f} GiB), over the "
                                                     f"{budget / GIB:.1f} GiB budget; tiers that fit: {ok}")
        return requested, []
    for e in estimates:
        if fits(e.peak_bytes, budget):
            return e.tier, [f"memory: {e.tier} (~{e.peak_gib:.1f} GiB predicted) is the fastest tier within the "
                            f"{budget / GIB:.1f} GiB budget"]
    smallest = min(estimates, key=lambda e: e.peak_bytes)
    raise InvalidRequestError("vram_budget", f"{budget / GIB:.1f} GiB is too little for this model, size and frame "
                                             f"count even at {smallest.tier}: it needs ~{smallest.peak_gib:.1f} GiB, a "
                                             f"budget of at least ~{smallest.peak_gib / HEADROOM:.1f} GiB "
                                             "(try fp8_weights, vae_tiling, a smaller size or fewer frames)")


def plan_memory(spec: ModelSpec, weights: Weights, width: int, height: int, frames: int, batch: int,
                vae_tiling: bool, dit_forward: str, budget: int | None, requested: str = "auto",
                vae_precision: str = "fp32", vae_tile_size: int = 0):
    """(tier, vae_tiling, estimates, reasons): the fastest tier that fits, tiling the VAE only when no untiled
    tier fits. Without a budget (a CPU) the requested tier, or resident."""
    def table(tiling: bool) -> list[Estimate]:
        return [estimate(spec, weights, t, width, height, frames, batch, tiling, dit_forward, vae_precision,
                         vae_tile_size) for t in tiers_for(spec)]

    ests = table(vae_tiling)
    if budget is None:
        return (requested if requested != "auto" else "resident"), vae_tiling, ests, []
    try:
        tier, reasons = choose_tier(ests, budget, requested)
        return tier, vae_tiling, ests, reasons
    except InvalidRequestError:
        if vae_tiling:
            raise
    tiled = table(True)
    tier, reasons = choose_tier(tiled, budget, requested)
    return tier, True, tiled, reasons + ["memory: VAE tiling turned on: no tier fits the budget with a whole-frame "
                                         "decode"]
