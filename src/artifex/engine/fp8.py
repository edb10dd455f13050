"""The fp8 compute mode, applied to an engine's experts from outside, with its error measured at load.

``fp8 = gemm``: every linear layer of the transformer blocks becomes an ``Fp8Linear``
(e4m3 weights with per-output-channel scales, per-token e4m3 activations, row-wise
``torch._scaled_mm``); ``fp8 = all`` also sends self-attention through ``fa3-fp8`` (e4m3
q/k/v with per-head scales; cross-attention runs the same kernel in bf16, ``cross_chain``).
Embeddings, norms, the timestep MLP and the output head stay in the compute precision, and
so do the block layers named by ``fp8_keep`` (sensitive layers: glob patterns over the
model's names, each checked to match at least one layer).

Before an expert is quantized, one forward on a small fixed probe (random latents at a
quarter of the model's default width and height, 5 frames, t = 500, random text) runs with
the bf16 weights and again with the fp8 ones; the relative L2 between the two outputs goes
into the plan and every sidecar. It is an indication measured on this model's weights, not a
bound for every prompt; ``artifex bench dit`` reports the error at full size.
"""

from __future__ import annotations

import fnmatch
import logging

import torch
from torch import nn

from artifex.attention.select import rel_l2
from artifex.errors import InvalidRequestError
from artifex.kernels import fp8 as kernels

log = logging.getLogger("artifex")


def check_fp8(mode: str, device: torch.device) -> None:
    """Refuse fp8 compute where row-wise fp8 matmuls cannot run, naming why."""
    if mode == "off":
        return
    decision = kernels.decide(device)
    if decision.path != "scaled_mm":
        raise InvalidRequestError("fp8", f"fp8 compute cannot run here: {decision.reason}", ["off"])


def keep_patterns(model: nn.Module, keep: str) -> tuple[str, ...]:
    """``fp8_keep``'s comma-separated patterns, each checked against the names of ``model``'s block linears."""
    patterns = tuple(p.strip() for p in keep.split(",") if p.strip())
    names = [f"blocks.{n}" for n, m in model.blocks.named_modules() if isinstance(m, nn.Linear)]
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            raise InvalidRequestError("fp8_keep", f"{p!r} matches no linear layer of the DiT blocks",
                                      f"glob patterns over names such as {', '.join(names[:4])}, ... "
                                      f"(blocks.0 to blocks.{len(model.blocks) - 1})")
    return patterns


def _output(out) -> torch.Tensor:
    """The prediction of a forward: diffusers' models return a tuple here, S2V's its tensor."""
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def quantize_experts(spec, experts: list[torch.nn.Module], device: torch.device, dtype: torch.dtype,
                     keep: str = "") -> dict:
    """Quantize every expert's block linears in place (on ``device``), but those ``keep`` names (``fp8_keep``);
    returns the probe's report, with the layers kept."""
    report: dict = {"mode_layers": None, "probe": [], "probe_input": None, "kept": []}
    patterns = keep_patterns(experts[0], keep) if experts else ()
    m = spec.spatial_multiple
    w, h = (max(v // 4 // m, 1) * m for v in spec.sizes[0])  # a quarter of the default size, still valid
    _, t, lh, lw = spec.latent_shape(w, h, 5)
    report["probe_input"] = f"{w}x{h}x5, t=500, seeded random latents and text"
    g = torch.Generator("cpu").manual_seed(0)
    for i, expert in enumerate(experts):
        if any(isinstance(m, kernels.Fp8Linear) for m in expert.blocks.modules()):  # components another engine
            report["probe"].append({"expert": i, "rel_l2_vs_bf16": None,  # quantized: their bf16 weights are gone
                                    "note": "already in fp8 (quantized by an earlier engine over these components)"})
            continue
        home = next(expert.parameters()).device
        expert.to(device)
        x = torch.randn(1, expert.config.in_channels, t, lh, lw, generator=g).to(device, dtype)
        text = torch.randn(1, spec.text_len, expert.config.text_dim, generator=g).to(device, dtype)
        probe = {"hidden_states": x, "timestep": torch.tensor([500.0], device=device), "encoder_hidden_states": text}
        if spec.task == "s2v":  # the clip's audio, the reference and a full motion history
            cfg = expert.config
            probe.update(
                audio_features=torch.randn(1, cfg.audio_layers, cfg.audio_dim, 4 * t, generator=g).to(device, dtype),
                ref_latents=torch.randn(1, cfg.in_channels, 1, lh, lw, generator=g).to(device, dtype),
                motion_latents=torch.randn(1, cfg.in_channels, sum(cfg.zip_frame_buckets), lh, lw,
                                           generator=g).to(device, dtype))
        else:
            probe["return_dict"] = False
        ref = _output(expert(**probe)).float()
        layers = kernels.quantize_linears(expert, include=("blocks.*",),
                                          exclude=kernels.DEFAULT_EXCLUDE + patterns, path="scaled_mm")
        by_keep = {f"excluded by {p!r}" for p in patterns}
        report["kept"] = sorted(n for n, why in layers.skipped.items() if why in by_keep)
        err = rel_l2(_output(expert(**probe)).float(), ref)
        report["probe"].append({"expert": i, "rel_l2_vs_bf16": round(err, 5)})
        report["mode_layers"] = layers.summary()
        log.info("fp8 expert %d: %s; probe rel L2 vs %s %.4f", i, layers.summary(), dtype, err)
        expert.to(home)
    return report
