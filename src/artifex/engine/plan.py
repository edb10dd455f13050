"""The plan: how a model runs on this machine, decided once, with the reasons.

The request says what to generate; the config says what the user wants switched on;
the plan is what will actually happen here (device, precision, attention, where each
model lives, CFG batching, compile), and every result carries it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch

from artifex.config import OptimizationConfig
from artifex.errors import InvalidRequestError
from artifex.models.loader import CheckpointInfo
from artifex.models.registry import ModelSpec

log = logging.getLogger("artifex")

# Activations, the VAE decode and allocator slack on top of the weights, as a share of the
# weights; a deliberately rough guard until the memory planner exists.
_HEADROOM = 0.35


@dataclass
class Plan:
    device: str
    precision: str  # DiT and text encoder
    vae_precision: str
    attention: str  # as requested ("auto" or a backend); each result records the backend chosen per shape
    placement: str  # "resident", "expert_swap", "model_offload"
    cfg_batch: int  # 2: cond and uncond in one batch
    compile: bool
    tf32: bool
    channels_last: bool
    vae_slicing: bool
    vae_tiling: bool
    config_hash: str
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidRequestError("device", f"{name} asked for, but this torch build sees no CUDA GPU",
                                      "cpu, auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidRequestError("device", f"{name} does not exist",
                                      [f"cuda:{i}" for i in range(torch.cuda.device_count())])
    return dev


def make_plan(spec: ModelSpec, config: OptimizationConfig, info: CheckpointInfo) -> Plan:
    """Decide placement, batching and compile for ``spec`` under ``config`` on this machine."""
    reasons = list(config.check_supported())
    device = resolve_device(config.device)
    total = sum(info.weight_bytes.values())

    if config.offload_to_cpu:
        placement = "model_offload"
        reasons.append("offload_to_cpu: models wait in CPU memory and move to the device only while they run")
    elif spec.experts < 2 or config.experts == "resident":
        placement = "resident"
    elif config.experts == "swap":
        placement = "expert_swap"
        reasons.append("experts=swap: one expert on the device at a time, swapped once at the MoE switch")
    elif device.type != "cuda":
        placement = "resident"
    else:
        free, _ = torch.cuda.mem_get_info(device)
        need = total * (1 + _HEADROOM)
        if need <= free:
            placement = "resident"
        else:
            placement = "expert_swap"
            reasons.append(f"both experts resident would need ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB "
                           "free: one expert at a time, swapped once at the MoE switch")

    cfg_batch = 2 if config.max_batch_size >= 2 else 1
    if cfg_batch == 2:
        reasons.append("max_batch_size >= 2: CFG's conditional and unconditional passes run as one batch")
    if config.use_torch_compile:
        reasons.append("use_torch_compile: repeated transformer blocks compiled (first steps include compile time)")
    return Plan(
        device=str(device),
        precision=config.precision,
        vae_precision="fp32",
        attention=config.attention,
        placement=placement,
        cfg_batch=cfg_batch,
        compile=config.use_torch_compile,
        tf32=config.tf32,
        channels_last=config.use_channels_last,
        vae_slicing=config.vae_slicing,
        vae_tiling=config.vae_tiling,
        config_hash=config.hash(),
        reasons=reasons,
    )
