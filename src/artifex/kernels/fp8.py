"""An fp8 (e4m3) linear layer for Hopper, swapped into a model from outside.

What ``Fp8Linear`` computes for x (..., K) and an nn.Linear's W (N, K), b (N,):

    w_scale[n] = amax(|W[n, :]|) / 448          once, at swap time (per output channel, fp32)
    W8 = e4m3(W / w_scale)
    x_scale[m] = amax(|x[m, :]|) / 448          every call (per row = per token, fp32)
    x8 = e4m3(x / x_scale)
    y = bf16((x8 @ W8^T) * x_scale * w_scale^T + b), then cast to x's dtype

- real path: ``torch._scaled_mm(x8, W8.t(), scale_a=(M, 1), scale_b=(1, N), bias=bf16 b,
  out_dtype=bf16)``; on CUDA it needs x8 row-major, W8.t() column-major (W8 stored (N, K)
  contiguous, so ``.t()`` is), K and N multiples of 16; row-wise scales need bf16 output.
- twin: the same quantization, dequantized and multiplied with ``F.linear`` in x's dtype; runs
  anywhere and is what the tests compare the real path with.
- ``decide(device)``: which path runs, and why, checked once per device with a tiny real call.
- ``quantize_linears(model, include, exclude)``: swaps matching nn.Linear layers for
  Fp8Linear in place and reports what it swapped and what it skipped, with reasons. Models
  stay plain nn.Modules; nothing inside their forward knows about fp8.

The per-row activation quantization is plain PyTorch (abs, amax, divide, cast): eager it costs
several passes over the activations; inside torch.compile'd blocks it fuses into the kernel that
produces them (the adaptive norms), in two or three passes over each row.

``quantize_rows_fused`` is the one-pass form for activations that come out of an opaque kernel
(the attention output, the up-projection's GEMM): a Triton program holds one whole row in
registers, applies tanh-GELU if asked (the feed-forward's activation, so the bf16 GELU output is
never written), takes its amax and writes the e4m3 row and its scale. Measured on an H200 at
TI2V-5B 720p, inductor's looped GELU + quantize reduction over 14,336-wide rows took 40.9 ms per
forward (benchmarks/results/dit-h200-run1.json, the fp8 rows' top kernels); this kernel does the
same rows in 0.53 ms against 1.21 ms per call (benchmarks/results/kernels-rows-h200.json).
``Fp8Linear.forward_quantized`` takes its output.

``unquantized()`` suspends the fp8 compute for the steps that ``fp8_bf16_steps`` keeps out of it: inside it,
each Fp8Linear multiplies its unquantized input with its dequantized weight in the input's dtype (the "plain"
path: the activations are not rounded to e4m3, the weights keep their e4m3 rounding), and the attention
runtimes take their plain kernels (``artifex.attention.processor``). Compiled blocks see the switch as a
guarded global: one more graph, compiled at its first use.
"""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass, field
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from artifex.kernels import FP8, FP8_MAX, Decision
from artifex.kernels.triton_util import triton, triton_decision

if triton is not None:
    import triton.language as tl

Tensor = torch.Tensor
_TINY = 1e-12  # floor of amax, so an all-zero row or channel gets a finite scale
# Layers kept in their precision by default: embedders and the timestep projection (small, early,
# sensitive), the final projection to latents, and anything named as a norm.
DEFAULT_EXCLUDE = ("*embed*", "*time_proj*", "proj_out", "*norm*")


# -- quantization -------------------------------------------------------------------------
def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """e4m3 values and fp32 scales (..., 1), one scale per row (the last dim is reduced)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(_TINY) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(values: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (values.to(torch.float32) * scale).to(dtype)


def quantize_rows_twin(x: Tensor, gelu: bool = False) -> tuple[Tensor, Tensor]:
    """``quantize_rows_fused``'s twin: optional tanh-GELU in fp32, then ``quantize_rows`` over (M, K) rows."""
    rows = x.reshape(-1, x.shape[-1]).float()
    return quantize_rows(F.gelu(rows, approximate="tanh") if gelu else rows)


if triton is not None:

    @triton.jit
    def _quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, width, stride_row, tiny, fp8_max,
                              BLOCK: tl.constexpr, GELU: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        x = tl.load(x_ptr + row * stride_row + cols, mask=mask, other=0.0).to(tl.float32)
        if GELU:  # tanh form: 0.5 x (1 + tanh(u)), tanh(u) = 1 - 2 / (exp(2u) + 1)
            u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            x = 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), tiny) / fp8_max
        values = tl.minimum(tl.maximum(x / scale, -fp8_max), fp8_max)
        tl.store(out_ptr + row * width + cols, values.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row, scale)


def _launch_rows(x: Tensor, gelu: bool, out_dtype: torch.dtype = FP8) -> tuple[Tensor, Tensor]:
    """One program per row. ``out_dtype`` float32 keeps the scaled values before the e4m3 cast (the CPU tests:
    Triton's interpreter does not round to e4m3 as the GPU does)."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m, width = rows.shape
    values = torch.empty((m, width), device=x.device, dtype=out_dtype)
    scale = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    if m:
        block = triton.next_power_of_2(width)  # warps: 8 from 2048 lanes on (the 14,336-wide GELU rows 0.546 ms
        # against 0.576 with 16; the 3,072-wide rows 0.114 with 4 or 8: benchmarks/probes/probe10-h100.json)
        _quantize_rows_kernel[(m,)](rows, values, scale, width, rows.stride(0), _TINY, FP8_MAX, BLOCK=block,
                                    GELU=gelu, num_warps=8 if block >= 2048 else 4)
    return values, scale


@torch.library.custom_op("artifex::quantize_rows", mutates_args=())
def _quantize_rows_op(x: Tensor, gelu: bool) -> tuple[Tensor, Tensor]:
    return _launch_rows(x, gelu)


@_quantize_rows_op.register_fake
def _quantize_rows_fake(x, gelu):
    m = x.numel() // x.shape[-1]
    return x.new_empty((m, x.shape[-1]), dtype=FP8), x.new_empty((m, 1), dtype=torch.float32)


def decide_rows(device: torch.device | str, dtype: torch.dtype) -> Decision:
    """Which path ``quantize_rows_fused`` takes: "triton" on CUDA with Triton, else "torch" (the twin), and why
    (decided once per device and dtype: the blocks ask at every forward)."""
    return triton_decision(device, dtype, "the one-pass Triton row quantization")


def rows_path(device: torch.device | str, dtype: torch.dtype) -> str:
    return decide_rows(device, dtype).path


def quantize_rows_fused(x: Tensor, gelu: bool = False, path: str | None = None) -> tuple[Tensor, Tensor]:
    """x (..., K) -> e4m3 (M, K) and fp32 scales (M, 1), one per row, like ``quantize_rows`` of the flattened
    rows; ``gelu`` applies tanh-GELU first (in fp32). ``path``: None = ``rows_path``, "triton" or "torch"."""
    path = path or rows_path(x.device, x.dtype)
    if path == "triton":
        return _quantize_rows_op(x, gelu)
    if path == "torch":
        return quantize_rows_twin(x, gelu)
    raise ValueError(f"unknown path {path!r}; paths: triton, torch")


# -- the decision -------------------------------------------------------------------------
def _probe_scaled_mm(device: torch.device) -> str | None:
    """Run one tiny row-wise scaled matmul on ``device``; the error, or None when it works."""
    try:
        a, sa = quantize_rows(torch.randn(16, 32, device=device))
        w, sw = quantize_rows(torch.randn(16, 32, device=device))
        out = torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=sw.view(1, -1),
                               bias=torch.zeros(16, device=device, dtype=torch.bfloat16), out_dtype=torch.bfloat16)
        ref = dequantize(a, sa) @ dequantize(w, sw).t()
        err = ((out.float() - ref).norm() / ref.norm()).item()
        return None if err < 1e-2 else f"row-wise torch._scaled_mm is wrong here (relative L2 {err:.1e})"
    except Exception as e:  # unsupported architecture, layout or build
        return f"row-wise torch._scaled_mm failed: {type(e).__name__}: {e}"[:300]


@cache
def _decide(device: str) -> Decision:
    dev = torch.device(device)
    if not hasattr(torch, "_scaled_mm"):
        return Decision("twin", f"torch {torch.__version__} has no torch._scaled_mm")
    if dev.type != "cuda":
        return Decision("twin", f"fp8 tensor cores need CUDA sm89+; this run is on {dev.type.upper()}")
    major, minor = torch.cuda.get_device_capability(dev)
    if (major, minor) < (8, 9):
        return Decision("twin", f"fp8 matmul needs sm89 (Ada) or newer; this GPU is sm{major}{minor}")
    why = _probe_scaled_mm(dev)
    if why:
        return Decision("twin", why)
    return Decision("scaled_mm", f"row-wise torch._scaled_mm on {torch.cuda.get_device_name(dev)} (sm{major}{minor})")


def decide(device: torch.device | str) -> Decision:
    """Which path ``Fp8Linear`` takes on ``device``, and why (checked once per device, cached)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _decide(str(dev))


# -- the switch ---------------------------------------------------------------------------
_suspended = False  # a module global: compiled code guards on its value


@contextlib.contextmanager
def unquantized(on: bool = True):
    """Within (when ``on``): fp8 compute suspended (module docstring); restores the previous state on exit."""
    global _suspended
    before, _suspended = _suspended, bool(on) or _suspended
    try:
        yield
    finally:
        _suspended = before


def quantization_suspended() -> bool:
    """Whether the caller runs inside ``unquantized()``."""
    return _suspended


# -- the layer ----------------------------------------------------------------------------
class Fp8Linear(nn.Module):
    """An nn.Linear with an e4m3 weight (per-output-channel scales) and per-token e4m3 activations.

    ``path``: None = ``decide(x.device)`` at call time; "scaled_mm" or "twin" to force one. Inside
    ``unquantized()`` every Fp8Linear takes the "plain" path (``forward_plain``).
    The fp8 weight and its fp32 scale keep their dtypes through ``module.to(dtype)``; the bias
    follows the model's dtype like any parameter.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 path: str | None = None):
        super().__init__()
        if in_features % 16 or out_features % 16:
            raise ValueError(f"fp8 matmul needs both dims to be multiples of 16; got {in_features}x{out_features}")
        self.in_features, self.out_features, self.path = in_features, out_features, path
        self.register_buffer("weight_fp8", torch.zeros(out_features, in_features, device=device, dtype=FP8))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, path: str | None = None) -> Fp8Linear:
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device, path=path)
        values, scale = quantize_rows(w)
        layer.weight_fp8.copy_(values)
        layer.weight_scale.copy_(scale.squeeze(1))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.weight_fp8, self.weight_scale[:, None], dtype)

    def _apply(self, fn, recurse=True):
        # .to(dtype)/.half() must not cast the fp8 weight or its fp32 scale: move them, keep dtypes
        kept = {name: self._buffers.pop(name) for name in ("weight_fp8", "weight_scale")}
        try:
            super()._apply(fn, recurse)
        finally:
            target = fn(torch.empty(0, device=kept["weight_scale"].device)).device
            for name, t in kept.items():
                self._buffers[name] = t.to(target)
        return self

    def forward(self, x: Tensor) -> Tensor:
        path = self._path(x.device)
        if path == "scaled_mm":
            return self.forward_scaled_mm(x)
        if path == "twin":
            return self.forward_twin(x)
        if path == "plain":
            return self.forward_plain(x)
        raise ValueError(f"unknown path {path!r}; paths: scaled_mm, twin, plain")

    def forward_scaled_mm(self, x: Tensor) -> Tensor:
        """The real path: e4m3 x e4m3 on tensor cores, fp32 accumulation, bf16 out."""
        values, scale = quantize_rows(x.reshape(-1, self.in_features))
        return self.forward_quantized(values, scale, x.shape[:-1], x.dtype)

    def forward_quantized(self, values: Tensor, scale: Tensor, lead: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """The scaled_mm path on activations already quantized by row (``quantize_rows_fused``): ``values``
        (M, K) e4m3, ``scale`` (M, 1); the output is reshaped to ``lead`` + (N,) in ``dtype``."""
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        out = torch._scaled_mm(values, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale[None, :],
                               bias=bias, out_dtype=torch.bfloat16)
        return out.reshape(*lead, self.out_features).to(dtype)

    def _path(self, device: torch.device) -> str:
        if quantization_suspended():
            return "plain"
        return self.path or decide(device).path

    def runs_scaled_mm(self, device: torch.device) -> bool:
        return self._path(device) == "scaled_mm"

    def forward_plain(self, x: Tensor) -> Tensor:
        """Unquantized input times the dequantized weight, in x's dtype (the steps kept out of fp8)."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def forward_twin(self, x: Tensor) -> Tensor:
        """The twin: the same quantization, dequantized, F.linear in x's dtype, rounded through bf16."""
        values, scale = quantize_rows(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = F.linear(dequantize(values, scale, x.dtype), self.dequantized_weight(x.dtype), bias)
        return out.to(torch.bfloat16).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"weight=e4m3 per-channel, activations=e4m3 per-token, path={self.path or 'auto'}"


# -- swapping -----------------------------------------------------------------------------
@dataclass
class Fp8Report:
    swapped: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layer name -> why it stays as it is
    bytes_before: int = 0  # weights of the swapped layers, before and after
    bytes_after: int = 0

    def summary(self) -> str:
        """Swapped and kept counts; "kept" counts the layers ``include`` named but that stay as they are."""
        kept = sum(not why.startswith("not matched by include") for why in self.skipped.values())
        return (f"fp8: {len(self.swapped)} linear layers swapped ({self.bytes_before / 2**20:.1f} MiB -> "
                f"{self.bytes_after / 2**20:.1f} MiB), {kept} kept")


def _why_not(name: str, layer: nn.Linear, include, exclude) -> str | None:
    if not any(fnmatch.fnmatchcase(name, p) for p in include):
        return f"not matched by include {list(include)}"
    hit = next((p for p in exclude if fnmatch.fnmatchcase(name, p)), None)
    if hit:
        return f"excluded by {hit!r}"
    if layer.in_features % 16 or layer.out_features % 16:
        return f"dims {layer.in_features}x{layer.out_features} are not multiples of 16"
    if layer.weight.device.type == "meta":
        return "weight is on the meta device (not loaded)"
    if not layer.weight.dtype.is_floating_point or layer.weight.dtype.itemsize < 2:
        return f"weight dtype {layer.weight.dtype} is not a 16/32-bit float"
    return None


def quantize_linears(module: nn.Module, include: tuple[str, ...] | list[str] = ("*",),
                     exclude: tuple[str, ...] | list[str] = DEFAULT_EXCLUDE, path: str | None = None) -> Fp8Report:
    """Swap the nn.Linear layers of ``module`` whose qualified names match ``include`` (glob patterns)
    and none of ``exclude`` for ``Fp8Linear``, in place. Returns what was swapped and skipped."""
    report = Fp8Report()
    targets = []
    for name, layer in module.named_modules():
        if not isinstance(layer, nn.Linear):
            continue
        if not name:
            report.skipped[name] = "the module itself is a Linear: use Fp8Linear.from_linear"
            continue
        why = _why_not(name, layer, include, exclude)
        if why:
            report.skipped[name] = why
        else:
            targets.append((name, layer))
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        new = Fp8Linear.from_linear(layer, path=path)
        report.bytes_before += layer.weight.numel() * layer.weight.element_size()
        report.bytes_after += new.weight_fp8.numel() + new.weight_scale.numel() * 4
        setattr(parent, child, new)
        report.swapped.append(name)
    return report
