"""What the Triton kernels of ``artifex.kernels`` share: Triton itself (optional), the GPU queries and the decision
of whether a kernel can run on a device and dtype (made once, with the reason), safe inside compiled code."""

from __future__ import annotations

import os
from functools import cache

import torch

from artifex.kernels import Decision

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INSTALL = "pip install triton (bundled with CUDA builds of PyTorch)"

try:  # Triton is optional: CPU builds of PyTorch come without it
    import triton
except ImportError:  # pragma: no cover - depends on the environment
    triton = None


# The decisions are made on first use, which may be inside a compiled block: dynamo cannot trace torch.cuda's
# queries (they return no tensor), so these two are constants to it (evaluated once, eagerly, while tracing).
@torch.compiler.assume_constant_result
def gpu_name(device: str) -> str:
    """The name of the CUDA device ``device`` ("cuda:0")."""
    return torch.cuda.get_device_name(torch.device(device))


@torch.compiler.assume_constant_result
def gpu_capability(device: str) -> int:
    """The compute capability of the CUDA device ``device`` as major * 10 + minor (90 for sm90)."""
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    return major * 10 + minor


def _triton_blocker(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the Triton kernel cannot run on ``device``/``dtype``, or None (the interpreter counts on CPU)."""
    if triton is None:
        return f"Triton is not installed ({INSTALL})"
    if dtype not in DTYPES:
        return f"dtype {dtype} not supported (bf16, fp16, fp32)"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "needs CUDA (or TRITON_INTERPRET=1 for a slow interpreted check); this run is on CPU"
    if device.type != "cuda":
        return f"needs CUDA; this run is on {device.type.upper()}"
    capability = gpu_capability(str(device))
    if dtype == torch.bfloat16 and capability < 80:
        return f"bf16 needs sm80 or newer; this GPU is sm{capability}"
    return None


def triton_decision(device: torch.device | str, dtype: torch.dtype, what: str,
                    dtypes: tuple[torch.dtype, ...] = DTYPES) -> Decision:
    """"triton" when ``what`` (a Triton kernel of ``artifex.kernels``, named for the reasons) can run on
    ``device`` for ``dtype``, else "torch" (its twin), and why; decided once per kernel, device and dtype.
    The interpreter (TRITON_INTERPRET=1) is a test tool, never the automatic choice."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _triton_decision(str(dev), dtype, what, dtypes)


@cache
def _triton_decision(device: str, dtype: torch.dtype, what: str, dtypes: tuple[torch.dtype, ...]) -> Decision:
    dev = torch.device(device)
    if dev.type != "cuda":
        return Decision("torch", f"{what} needs CUDA; this run is on {dev.type.upper()}")
    if dtype not in dtypes:
        return Decision("torch", f"{what} runs {', '.join(str(d).removeprefix('torch.') for d in dtypes)}; "
                                 f"this is {str(dtype).removeprefix('torch.')}")
    why = _triton_blocker(dev, dtype)
    if why:
        return Decision("torch", why)
    return Decision("triton", f"{what}: Triton {triton.__version__} on {gpu_name(str(dev))}")
