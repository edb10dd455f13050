"""One adapter per attention kernel, all with the same call shape.

Every backend takes q (B, Lq, H, D), k and v (B, Lk, H, D) and returns (B, Lq, H, D),
the layout the Wan attention processor already holds; the FlashAttention family,
SageAttention and xFormers take it as it is, SDPA and flex get views (no copies).
Each backend states what it needs (device, GPU architecture, dtypes, head_dim, which of
the guide's scale/causal/dropout knobs it honours), so ``probe`` can say why it cannot
run here before anything is tried.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
HALF = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    run: Callable[..., Tensor]  # run(q, k, v, scale, causal, dropout, slices) -> out
    install: str  # how to get it, for the doctor
    devices: tuple[str, ...] = ("cuda",)
    min_sm: int = 0  # lowest CUDA compute capability (major*10+minor)
    max_sm: int = 999
    dtypes: tuple[torch.dtype, ...] = HALF
    max_head_dim: int = 256
    causal: bool = True
    dropout: bool = False
    module: str | None = None  # importable module the kernel lives in
    in_auto: bool = True  # considered by `auto` (sliced and math are explicit or last resort)
    bound: float | None = None  # relative L2 allowed by verification, when looser than the dtype's (fp8)
    plain: str | None = None  # the same kernel without quantizing its inputs (for short-key cross-attention)


# -- kernels -----------------------------------------------------------------------------
def _as_out(result) -> Tensor:
    return result[0] if isinstance(result, tuple) else result


@cache
def _fa3_module():
    """FA3 from the official build (flash_attn_interface) or the fa3-fwd wheel (fa3_fwd_interface)."""
    for name in ("flash_attn_interface", "fa3_fwd_interface"):
        if importlib.util.find_spec(name) is not None:
            return importlib.import_module(name)
    return None


def _fa3(q, k, v, scale, causal, dropout, slices):
    return _as_out(_fa3_module().flash_attn_func(q, k, v, softmax_scale=scale, causal=causal))


def _fa3_fp8(q, k, v, scale, causal, dropout, slices):
    from artifex.kernels.fp8_attention import fa3_fp8_attention

    return fa3_fp8_attention(_fa3_module(), q, k, v, scale, causal, granularity="head")


def _fa3_fp8_qk8(q8, dq, k8, dk, v, scale, causal):
    """fa3-fp8 on q and k quantized upstream (``torch.ops.artifex.attention_qk8``)."""
    from artifex.kernels.fp8_attention import fa3_fp8_attention_qk8

    return fa3_fp8_attention_qk8(_fa3_module(), q8, dq, k8, dk, v, scale, causal)


def _fa2(q, k, v, scale, causal, dropout, slices):
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, dropout_p=dropout, softmax_scale=scale, causal=causal)


def _fa4(q, k, v, scale, causal, dropout, slices):
    from flash_attn.cute import flash_attn_func

    return _as_out(flash_attn_func(q, k, v, softmax_scale=scale, causal=causal))


def _sage(q, k, v, scale, causal, dropout, slices):
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="NHD", is_causal=causal, sm_scale=scale)


def _xformers(q, k, v, scale, causal, dropout, slices):
    import xformers.ops as xops

    bias = xops.LowerTriangularMask() if causal else None
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout, scale=scale)


def _sdpa_with(kernel: str | None):
    def run(q, k, v, scale, causal, dropout, slices):
        ctx = contextlib.nullcontext()
        if kernel is not None:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            ctx = sdpa_kernel([getattr(SDPBackend, kernel)])
        with ctx:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 dropout_p=dropout, is_causal=causal, scale=scale)
        return out.transpose(1, 2)

    return run


_flex_compiled = None


def _flex(q, k, v, scale, causal, dropout, slices):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _flex_compiled
    fn = flex_attention
    if q.is_cuda:  # flex is only fast compiled; on the CPU the eager path is the reference path
        if _flex_compiled is None:
            _flex_compiled = torch.compile(flex_attention, dynamic=False)
        fn = _flex_compiled
    mask = None
    if causal:
        mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, q.shape[1], k.shape[1],
                                 device=q.device)
    with warnings.catch_warnings():  # eager flex on a CPU warns that it is unfused: that is the point there
        warnings.simplefilter("ignore", UserWarning)
        out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask, scale=scale)
    return out.transpose(1, 2)


def _sliced(q, k, v, scale, causal, dropout, slices):
    """Queries in ``slices`` chunks through SDPA: the score matrix is 1/slices the size."""
    slices = max(1, min(slices or 1, q.shape[1]))
    k_, v_ = k.transpose(1, 2), v.transpose(1, 2)
    outs, start = [], 0
    for chunk in q.tensor_split(slices, dim=1):
        n = chunk.shape[1]
        mask = None
        if causal:  # top-left aligned, like SDPA's is_causal on the full matrix
            rows = torch.arange(start, start + n, device=q.device)[:, None]
            mask = rows >= torch.arange(k.shape[1], device=q.device)[None, :]
        outs.append(F.scaled_dot_product_attention(chunk.transpose(1, 2), k_, v_, attn_mask=mask,
                                                   dropout_p=dropout, scale=scale).transpose(1, 2))
        start += n
    return torch.cat(outs, dim=1)


_ALL = [
    Backend("fa3", "FlashAttention-3 (Hopper), official build or the fa3-fwd wheel", _fa3,
            "pip install fa3-fwd (forward kernels, loads on torch 2.11), or build flash-attention/hopper",
            min_sm=90, max_sm=90, module="fa3"),
    # fp8 changes numerics (rel L2 vs bf16 of a few percent), so `auto` never takes it: explicit opt-in only
    Backend("fa3-fp8", "FlashAttention-3 with e4m3 q/k/v, per-(batch, head) amax scales, bf16 out (Hopper)",
            _fa3_fp8, "pip install fa3-fwd (fp8 forward kernels, loads on torch 2.11), or build flash-attention/hopper",
            min_sm=90, max_sm=90, module="fa3", in_auto=False, bound=0.1, plain="fa3"),
    Backend("fa4", "FlashAttention-4 (CuTe DSL, Hopper/Blackwell)", _fa4,
            "pip install flash-attn-4 / flash-attn with the cute interface", min_sm=90, module="flash_attn.cute"),
    Backend("fa2", "FlashAttention-2", _fa2, "pip install flash-attn --no-build-isolation (Ampere or newer)",
            min_sm=80, dropout=True, module="flash_attn"),
    Backend("sdpa-cudnn", "PyTorch SDPA restricted to cuDNN attention", _sdpa_with("CUDNN_ATTENTION"),
            "part of PyTorch (CUDA builds with cuDNN 9)", min_sm=80),
    Backend("sdpa-flash", "PyTorch SDPA restricted to its FlashAttention-2 kernel", _sdpa_with("FLASH_ATTENTION"),
            "part of PyTorch", devices=("cuda", "cpu"), min_sm=80, dtypes=ALL_DTYPES, dropout=True),
    Backend("sdpa-efficient", "PyTorch SDPA restricted to memory-efficient attention",
            _sdpa_with("EFFICIENT_ATTENTION"), "part of PyTorch", min_sm=50, dtypes=ALL_DTYPES, dropout=True),
    Backend("sdpa", "PyTorch SDPA, PyTorch picks the kernel (the default)", _sdpa_with(None), "part of PyTorch",
            devices=("cuda", "cpu"), dtypes=ALL_DTYPES, max_head_dim=1024, dropout=True),
    Backend("flex", "PyTorch FlexAttention (compiled on CUDA)", _flex, "part of PyTorch >= 2.5",
            devices=("cuda", "cpu"), dtypes=ALL_DTYPES, max_head_dim=1024),
    Backend("sage", "SageAttention (int8 QK, fp16 PV)", _sage, "pip install sageattention", min_sm=80,
            module="sageattention"),
    Backend("xformers", "xFormers memory-efficient attention", _xformers, "pip install xformers (matching torch)",
            min_sm=50, dropout=True, module="xformers.ops"),
    Backend("sliced", "queries in chunks through SDPA (the guide's attention_slicing)", _sliced, "part of PyTorch",
            devices=("cuda", "cpu"), dtypes=ALL_DTYPES, max_head_dim=1024, dropout=True, in_auto=False),
    Backend("sdpa-math", "PyTorch SDPA math kernel (plain matmul + softmax; the last resort)", _sdpa_with("MATH"),
            "part of PyTorch", devices=("cuda", "cpu"), dtypes=ALL_DTYPES, max_head_dim=100_000, dropout=True,
            in_auto=False),
]
BACKENDS: dict[str, Backend] = {b.name: b for b in _ALL}


def _importable(module: str) -> bool:
    if module == "fa3":
        return _fa3_module() is not None
    try:
        importlib.import_module(module)
        return True
    except Exception:  # ImportError, or a broken binary raising on import (ABI mismatch)
        return False


def _sm(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def probe(backend: Backend, device: torch.device, dtype: torch.dtype, head_dim: int,
          causal: bool = False, dropout: float = 0.0) -> str | None:
    """Why ``backend`` cannot run here, or None when nothing in its requirements is missing."""
    if device.type not in backend.devices:
        return f"needs {' or '.join(d.upper() for d in backend.devices)}; this run is on {device.type.upper()}"
    if backend.module and not _importable(backend.module):
        return f"not installed ({backend.install})"
    if device.type == "cuda":
        sm = _sm(device)
        if sm < backend.min_sm:
            return f"GPU architecture sm{sm} is too old: needs sm{backend.min_sm} or newer"
        if sm > backend.max_sm:
            return f"built for sm{backend.min_sm}-sm{backend.max_sm}; this GPU is sm{sm}"
    if dtype not in backend.dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in backend.dtypes)
        return f"dtype {str(dtype).removeprefix('torch.')} not supported (supports {names})"
    if head_dim > backend.max_head_dim:
        return f"head_dim {head_dim} not supported (at most {backend.max_head_dim})"
    if causal and not backend.causal:
        return "cannot apply a causal mask"
    if dropout and not backend.dropout:
        return "cannot apply attention dropout"
    return None


def attention_flops(batch: int, q_len: int, k_len: int, heads: int, head_dim: int) -> float:
    """QK^T and PV: 2 matmuls of 2*Lq*Lk*D FLOPs per head."""
    return 4.0 * batch * heads * q_len * k_len * head_dim


def backend_versions() -> dict[str, str | None]:
    """Versions of the optional kernel packages (part of the selection cache key)."""
    from importlib import metadata

    out = {}
    for dist in ("flash-attn", "flash_attn_3", "fa3-fwd", "flash-attn-4", "sageattention", "xformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out
