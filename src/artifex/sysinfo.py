"""What ran where: library versions and the device, for sidecars and benchmark reports."""

from __future__ import annotations

import platform
import resource
import sys
from importlib import metadata

import torch

_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "av", "numpy", "safetensors", "tokenizers")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in ("artifex",) + _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["cuda"] = torch.version.cuda
    out["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    return out


def device_info(device: torch.device | str) -> dict:
    device = torch.device(device)
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        p = torch.cuda.get_device_properties(idx)
        return {"type": "cuda", "name": p.name, "capability": f"sm{p.major}{p.minor}",
                "memory_gib": round(p.total_memory / 2**30, 1), "index": idx}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> tuple[int, int] | None:
    """(max allocated, max reserved) bytes since the last reset on a CUDA device; None elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    return None


def peak_memory(device: torch.device, floor: tuple[int, int] | None = None) -> dict:
    """Peak memory of this generation (CUDA) and of the whole process so far (max RSS of host memory).
    ``floor``: peaks (allocated, reserved) kept from before a reset of the counters, folded in."""
    rss = {"cpu_process_max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    peaks = peak_bytes(device)
    if peaks is None:
        return rss
    allocated, reserved = (max(p, f) for p, f in zip(peaks, floor or (0, 0)))
    # host memory too: offload tiers keep weights there (pinned pages count in the RSS once written)
    return {"gpu_max_allocated_gib": round(allocated / 2**30, 3), "gpu_max_reserved_gib": round(reserved / 2**30, 3),
            **rss}
