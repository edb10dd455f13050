"""The opt-in light decoder (``OptimizationConfig.decoder = "light"``): TAEHV instead of the Wan VAE, with its error
measured against the VAE on a bounded sample of every video it decodes.

``Engine.decode_chunks`` hands its normalized latents here when the engine has a ``LightDecoder``. The light
decode streams chunks of latent frames (``CHUNK``) through ``artifex.models.taehv``, so the mp4 encoder works
while the next chunk decodes, as it does behind the VAE. Then the first ``light_decoder_check`` latent frames go
through the full VAE as the engine would decode them (its dtype, layout, tiles); both decoders are causal, so these
are the full decode's own first 1 + 4 (N - 1) frames, and the light decode's frames are compared with them: PSNR
(8-bit scale: peak 255, the [-1, 1] pixels times 127.5) and the largest absolute difference on the [-1, 1] scale.
The cost of the check is about N / T' of a full decode (T' latent frames), and its seconds are reported; the
result goes to the sidecar's ``decoder`` key (``report``).

The latents TAEHV reads: madebyollin's taew* files read the DiT's (normalized) latents; LightX2V's lighttae*
files read them un-normalized with the VAE's latents_mean/std (``light_decoder_latents``).

Under a parallel layout only the writing process decodes (the others would only repeat it); the check runs on that
process alone, through the VAE's one-process decode.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from artifex.config import OptimizationConfig
from artifex.engine.vae import decode_any
from artifex.models.registry import ModelSpec
from artifex.models.taehv import TaehvDecoder, load_taehv

if TYPE_CHECKING:
    from artifex.engine.pipeline import Engine

CHUNK = 2  # latent frames per light-decoded chunk (8 frames; the first chunk 5)


def latents_kind(config: OptimizationConfig) -> str:
    """``light_decoder_latents`` resolved: "raw" or "normalized" ("auto": raw for LightX2V's lighttae* files)."""
    if config.light_decoder_latents != "auto":
        return config.light_decoder_latents
    return "raw" if Path(config.light_decoder).name.lower().startswith("lighttae") else "normalized"


@dataclass
class LightDecoder:
    """A loaded TAEHV decoder, what it reads, and the report of its last decode."""

    model: TaehvDecoder
    path: str
    latents: str  # "normalized" or "raw"
    check_frames: int  # latent frames checked against the full VAE (0: none)
    report: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"kind": "light", "architecture": f"taehv-{self.model.variant}", "file": self.path,
                "latents": self.latents, "widths": list(self.model.widths),
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch.")}

    @torch.no_grad()
    def stream(self, engine: Engine, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """Pixels (1, 3, t, H, W) in [-1, 1] of ``latents`` (1, z, T', h, w, normalized), chunk by chunk; then the
        check against the full VAE (module docstring) sets ``report``."""
        self.report = self.describe()
        if not engine.layout.writes_output:
            return
        z = latents.float()
        if self.latents == "raw":
            mean, std = engine._latent_stats(z)
            z = z * std + mean
        check = min(self.check_frames, latents.shape[2])
        frames = 1 + 4 * (check - 1) if check else 0
        kept: list[torch.Tensor] = []  # the light decode's first ``frames`` frames, for the check
        got = 0
        for pixels in self.model.stream(z, CHUNK):
            if got < frames:
                kept.append(pixels[:, :, :frames - got].float())
                got += kept[-1].shape[2]
            yield pixels
        self.report["check"] = self.measure(engine, latents[:, :, :check], kept) if check else None

    def measure(self, engine: Engine, sample: torch.Tensor, light: list[torch.Tensor]) -> dict:
        """The light frames ``light`` against the full VAE's decode of ``sample`` (the first latent frames)."""
        start = time.perf_counter()
        full = full_decode(engine, sample)
        ours = torch.cat(light, dim=2).to(full.device)
        diff = ours - full
        mse = (diff * 127.5).pow(2).mean().item()
        return {"latent_frames": sample.shape[2], "frames": full.shape[2],
                "sampled": f"the first {sample.shape[2]} latent frames (video frames 0-{full.shape[2] - 1}), decoded "
                           "by both; the full VAE is causal, so these are its full decode's own frames",
                "psnr_db": round(10 * math.log10(255**2 / mse), 2) if mse > 0 else None,  # None: identical
                "max_abs_error": round(diff.abs().max().item(), 5),
                "scale": "PSNR on 8-bit levels (peak 255); max_abs_error on the [-1, 1] pixels",
                "seconds": round(time.perf_counter() - start, 4)}


@torch.no_grad()
def full_decode(engine: Engine, latents: torch.Tensor) -> torch.Tensor:
    """``latents`` (normalized) through the engine's Wan VAE as ``Engine.decode_chunks`` runs it on one process
    (un-normalized, in the VAE's dtype and layout, tiled if the plan tiles): pixels (1, 3, F, H, W), float32."""
    mean, std = engine._latent_stats(latents)
    with engine.placement.vae() as vae:
        z = (latents.float() * std + mean).to(vae.device, vae.dtype)
        if engine.plan.channels_last:
            z = z.contiguous(memory_format=torch.channels_last_3d)
        return torch.cat([p.float() for p in decode_any(vae, z)], dim=2)


def load_light_decoder(spec: ModelSpec, config: OptimizationConfig, device: torch.device,
                       dtype: torch.dtype) -> LightDecoder | None:
    """The light decoder ``config`` asks for, on ``device`` in ``dtype`` (the VAE's precision), checked against
    ``spec``'s VAE; None for ``decoder = "full"``. A missing file or one for the other VAE is a
    ``CheckpointError``."""
    if config.decoder != "light":
        return None
    patch = spec.vae.spatial_stride // 8  # TAEHV upsamples 8x; Wan2.2's VAE adds a 2x2 patch
    model = load_taehv(config.light_decoder, spec.vae.z_dim, patch).to(device, dtype)
    return LightDecoder(model, str(Path(config.light_decoder).expanduser()), latents_kind(config),
                        config.light_decoder_check)


def decoder_report(light: LightDecoder | None) -> dict:
    """The sidecar's ``decoder`` key: the full VAE, or the light decoder and its measured error."""
    if light is None:
        return {"kind": "full"}
    return light.report or light.describe()
