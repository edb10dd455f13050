"""Measured activation memory of each stage at real shapes, to calibrate and check the memory planner.

Random weights at the real widths; the DiT with 2 blocks (activations do not grow with depth: blocks run one
after another), the real VAEs decoding full-size videos, the umt5-xxl encoder on 2 x 512 tokens. Each figure is
the peak allocated during the stage minus what was allocated before it (weights and inputs).
"""

from __future__ import annotations

import logging
import time

import torch

from artifex.bench import report
from artifex.engine import memory
from artifex.models.registry import get_model

log = logging.getLogger("artifex")
GIB = 2**30


def _peak(fn, device) -> tuple[float, float]:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    t = time.perf_counter()
    with torch.no_grad():
        fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / GIB, time.perf_counter() - t


def dit_activation(model: str, width: int, height: int, frames: int, device) -> dict:
    from diffusers import WanTransformer3DModel

    from artifex.models.loader import cast_keeping_fp32

    spec = get_model(model)
    cfg = dict(spec.transformer.diffusers_config(), num_layers=2)
    with torch.device(device):
        m = cast_keeping_fp32(WanTransformer3DModel(**cfg), torch.bfloat16).eval()
    z, t, h, w = spec.latent_shape(width, height, frames)
    x = torch.randn(1, spec.transformer.in_channels, t, h, w, device=device, dtype=torch.bfloat16)
    text = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
    step = torch.tensor([500.0], device=device)
    gib, secs = _peak(lambda: m(hidden_states=x, timestep=step, encoder_hidden_states=text, return_dict=False), device)
    tokens = spec.tokens(width, height, frames)
    predicted = memory.activations(spec, width, height, frames, 1, False, False)["denoise"] / GIB
    return {"stage": "denoise", "model": model, "size": f"{width}x{height}x{frames}", "tokens": tokens,
            "measured_gib": round(gib, 3), "predicted_gib": round(predicted, 3),
            "bytes_per_token": round(gib * GIB / tokens)}


def vae_decode(model: str, width: int, height: int, frames: int, tiled: bool, device) -> dict:
    from diffusers import AutoencoderKLWan

    from artifex.models.configs import vae_kwargs

    spec = get_model(model)
    with torch.device(device):
        vae = AutoencoderKLWan(**vae_kwargs(spec)).eval()
    if tiled:
        vae.enable_tiling()
    _, t, h, w = spec.latent_shape(width, height, frames)
    z = torch.randn(1, spec.vae.z_dim, t, h, w, device=device)
    gib, secs = _peak(lambda: vae.decode(z, return_dict=False), device)
    predicted = (memory.activations(spec, width, height, frames, 1, tiled, False)["decode"]
                 - 3 * frames * width * height) / GIB  # the uint8 copy is made after this stage
    return {"stage": "decode", "model": model, "vae": spec.vae.kind, "size": f"{width}x{height}x{frames}",
            "tiled": tiled, "measured_gib": round(gib, 3), "predicted_gib": round(predicted, 3),
            "seconds": round(secs, 2), "bytes_per_pixel": round(gib * GIB / (width * height))}


def text_encoder(device) -> dict:
    from transformers import UMT5EncoderModel

    from artifex.models.configs import text_encoder_config

    with torch.device(device):
        enc = UMT5EncoderModel(text_encoder_config(get_model("t2v-a14b"))).to(torch.bfloat16).eval()
    ids = torch.randint(0, 32000, (2, 512), device=device)
    mask = torch.ones_like(ids)
    gib, _ = _peak(lambda: enc(ids, mask), device)
    return {"stage": "encode_text", "model": "umt5-xxl", "measured_gib": round(gib, 3),
            "predicted_gib": round(memory.TEXT_ACTIVATION_BYTES / GIB, 3)}


def calibrate(out_dir=None) -> dict:
    device = torch.device("cuda")
    runs = [
        (dit_activation, ("ti2v-5b", 1280, 704, 121)), (dit_activation, ("t2v-a14b", 832, 480, 81)),
        (dit_activation, ("t2v-a14b", 1280, 720, 81)), (text_encoder, ()),
        (vae_decode, ("ti2v-5b", 1280, 704, 121, False)), (vae_decode, ("ti2v-5b", 1280, 704, 121, True)),
        (vae_decode, ("t2v-a14b", 832, 480, 81, False)), (vae_decode, ("t2v-a14b", 1280, 720, 81, False)),
        (vae_decode, ("t2v-a14b", 1280, 720, 81, True)),
    ]
    rows = []
    for fn, args in runs:
        rows.append(fn(*args, device))
        log.info("%s", rows[-1])
        torch.cuda.empty_cache()
    data = report.header(device)
    errs = [abs(r["predicted_gib"] - r["measured_gib"]) / r["measured_gib"] for r in rows if r["measured_gib"] > 0.05]
    data.update(summary={"stage_max_rel_error": round(max(errs), 3)}, stages=rows)
    if out_dir is not None:
        md = report.md_table([["stage", "model", "size", "tiled", "measured GiB", "predicted GiB"]] + [
            [r["stage"], r["model"], r.get("size", "-"), str(r.get("tiled", "-")), str(r["measured_gib"]),
             str(r["predicted_gib"])] for r in rows])
        report.write(out_dir, f"memory-stages-{report.device_slug(device)}", data,
                     f"# Stage activation memory ({data['device']['name']})\n\n`{data['command']}`\n\n" + md)
    return data


if __name__ == "__main__":
    import json
    import sys
    from pathlib import Path

    logging.basicConfig(level=logging.INFO)
    print(json.dumps(calibrate(Path(sys.argv[1]) if len(sys.argv) > 1 else None), indent=1))
