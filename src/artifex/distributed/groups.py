"""Process groups of a parallel layout, and joining the job's torch.distributed world.

Tensors travel over torch.distributed: NCCL between GPUs (one GPU per rank), gloo on CPUs.
Every rank builds every group, in the same order, as torch.distributed requires.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from artifex.distributed.layout import ParallelLayout
from artifex.errors import InvalidRequestError

BACKENDS = ("auto", "gloo", "nccl")


@dataclass
class ParallelGroups:
    """This rank's place in the layout and the groups it belongs to (None where a degree is 1)."""

    layout: ParallelLayout
    rank: int
    cfg_rank: int
    ulysses_rank: int
    cfg_ranks: list[int]
    ulysses_ranks: list[int]
    cfg_group: dist.ProcessGroup | None
    ulysses_group: dist.ProcessGroup | None
    # every rank of the layout (the VAE decode is split over them); None with one rank
    layout_ranks: list[int] = field(default_factory=lambda: [0])
    layout_group: dist.ProcessGroup | None = None

    @property
    def writes_output(self) -> bool:
        """Global rank 0 writes the video (and decodes it, alone or with the other ranks)."""
        return self.rank == 0


def build_groups(layout: ParallelLayout) -> ParallelGroups:
    """Create the CFG and Ulysses groups of ``layout`` (and one of all its ranks) in the initialised default world."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call init_distributed() or run under torchrun")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != layout.world_size:
        raise InvalidRequestError("world_size", f"{layout.describe()} needs {layout.world_size} processes, "
                                  f"{world} are in this world", [layout.world_size])
    cfg_rank, ulysses_rank = layout.coords(rank)
    mine: dict[str, tuple[list[int], dist.ProcessGroup | None]] = {}
    for kind, sets, degree in (("ulysses", layout.ulysses_groups(), layout.ulysses),
                               ("cfg", layout.cfg_groups(), layout.cfg)):
        for ranks in sets:
            group = dist.new_group(ranks) if degree > 1 else None  # every rank creates every group
            if rank in ranks:
                mine[kind] = (ranks, group)
    everyone = list(range(layout.world_size))
    layout_group = dist.new_group(everyone) if layout.world_size > 1 else None
    return ParallelGroups(layout=layout, rank=rank, cfg_rank=cfg_rank, ulysses_rank=ulysses_rank,
                          cfg_ranks=mine["cfg"][0], ulysses_ranks=mine["ulysses"][0],
                          cfg_group=mine["cfg"][1], ulysses_group=mine["ulysses"][1],
                          layout_ranks=everyone, layout_group=layout_group)


def pick_backend(requested: str = "auto") -> str:
    """NCCL when CUDA is there (one GPU per rank), else gloo; an explicit choice that cannot run is refused."""
    if requested not in BACKENDS:
        raise InvalidRequestError("backend", f"unknown torch.distributed backend {requested!r}", BACKENDS)
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise InvalidRequestError("backend", "nccl needs CUDA GPUs and this torch build sees none", ["gloo"])
    return requested


def rank_device(backend: str) -> str:
    """This rank's device: cuda:LOCAL_RANK under NCCL, cpu under gloo."""
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"


def init_distributed(backend: str = "auto") -> tuple[str, str]:
    """Join the world torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT): returns (backend, device)."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise InvalidRequestError("environment", f"{', '.join(missing)} not set: start this with torchrun "
                                  "(torchrun --nproc-per-node N -m artifex.cli.launch ...) or artifex launch")
    backend = pick_backend(backend)
    device = rank_device(backend)
    if not dist.is_initialized():
        if backend == "nccl":
            dist.init_process_group(backend, device_id=torch.device(device))
        else:
            dist.init_process_group(backend)
    return backend, device
