"""The Wan block's adaptive LayerNorms in one pass over each row: gated residual, LayerNorm, modulation and,
for fp8 layers, the row quantization of the result.

What ``ada_norm`` computes for tokens x (B, L, C) and a modulation table ``mod`` (R, k, C) fp32
(``engine.dit.mod_table``; row r of a token is ``index[b, l]``, or b when ``index`` is None):

    if res is given:  x = dtype(x + res * mod[r, gate])      (fp32 inside; gate None: x + res)
                      -> returned: the block's residual stream, rounded as the block rounds it
    n = LayerNorm(x) over C, eps, no affine                  (fp32, biased variance)
    if weight:        n = n * weight + bias                  (norm2: the cross-attention's affine norm)
    if shift/scale:   n = n * (1 + mod[r, scale]) + mod[r, shift]
    h = dtype(n)
    quantize:         h -> e4m3 rows + fp32 scales (M, 1), as ``kernels.fp8.quantize_rows`` of the rounded h

These are the three norms of a block in ``engine.dit`` (norm1 + modulation; residual + norm2; residual + norm3 +
modulation; ``mod`` holds the block's six vectors) and the model's output norm (``norm_out`` + the output shift
and scale: two vectors). Compiled by inductor, each of the block's norms became a looped reduction that read its
rows twice and, with fp8 layers, a third time for the amax. The Triton kernel holds whole rows in registers: one
read of x (and res), one write of x (when res is given) and of h. H200, TI2V-5B 720p, against the twin compiled
by inductor (benchmarks/results/kernels-ada-qk-h200.json): norm1 0.152 vs 0.247 ms, norm3 0.230 vs 0.284, fp8
norm1 0.206 vs 0.374, fp8 norm3 0.259 vs 0.400; fp8 norm2 0.298 vs 0.295 (no gain there).

- ``ada_norm``: the API; ``path`` "triton" (CUDA) or "torch" (the twin: the block's own expressions).
- ``decide``: which path runs on a device and dtype, and why (once per device and dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from artifex.kernels import Decision
from artifex.kernels.fp8 import _TINY, FP8, FP8_MAX, quantize_rows
from artifex.kernels.triton_util import triton, triton_decision

if triton is not None:
    import triton.language as tl

Tensor = torch.Tensor
NO = -1  # "no such modulation vector" for the kernel's integer arguments


def _pick(mod: Tensor, j: int, index: Tensor | None) -> Tensor:
    return mod[:, j].unsqueeze(1) if index is None else mod[:, j][index]


def ada_norm_torch(x: Tensor, mod: Tensor | None, index: Tensor | None, eps: float, shift: int | None = None,
                   scale: int | None = None, res: Tensor | None = None, gate: int | None = None,
                   weight: Tensor | None = None, bias: Tensor | None = None, quantize: bool = False,
                   norm=None):
    """The twin: the block's own expressions (``engine.dit``). Returns (x, h), x None unless ``res`` is given; with
    ``quantize`` h is (e4m3 (M, C), scales (M, 1)). ``norm``: the block's LayerNorm module, called instead of
    ``F.layer_norm`` with ``weight``/``bias``/``eps`` (so its hooks fire, as the block's "torch" path needs)."""
    if res is not None:
        added = res.float() * _pick(mod, gate, index) if gate is not None else res.float()
        x = (x.float() + added).type_as(x)
    if norm is not None:
        n = norm(x.float())
    else:
        n = F.layer_norm(x.float(), x.shape[-1:], None if weight is None else weight.float(),
                         None if bias is None else bias.float(), eps)
    if scale is not None:
        n = n * (1 + _pick(mod, scale, index)) + _pick(mod, shift, index)
    h = n.type_as(x)
    return (x if res is not None else None), (quantize_rows(h.reshape(-1, h.shape[-1])) if quantize else h)


if triton is not None:

    @triton.jit
    def _ada_norm_kernel(x_ptr, res_ptr, mod_ptr, index_ptr, w_ptr, b_ptr, x_out_ptr, h_ptr, scale_ptr,
                         rows, seq_len, width, mod_stride, eps, tiny, fp8_max,
                         SHIFT: tl.constexpr, SCALE: tl.constexpr, GATE: tl.constexpr, HAS_RES: tl.constexpr,
                         HAS_INDEX: tl.constexpr, AFFINE: tl.constexpr, QUANTIZE: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK: tl.constexpr):
        # ROWS consecutive rows per program, one at a time: a row's modulation vectors come from L1 after the
        # program's first row. A tile of 4 rows held at once, as first written, was slower in 5 of the 6 forms
        # (norm3 0.314 against 0.230 ms; benchmarks/results/kernels-ada-h200-run1.json vs kernels-ada-qk-h200.json).
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        if AFFINE:
            w = tl.load(w_ptr + cols, mask=mask, other=0.0)
            b = tl.load(b_ptr + cols, mask=mask, other=0.0)
        for i in range(ROWS):
            row = tl.program_id(0).to(tl.int64) * ROWS + i
            if row < rows:
                if HAS_INDEX:
                    r = tl.load(index_ptr + row).to(tl.int64)
                else:
                    r = row // seq_len
                mod_row = mod_ptr + r * mod_stride + cols
                offs = row * width + cols
                x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                if HAS_RES:
                    res = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                    if GATE >= 0:
                        res = res * tl.load(mod_row + GATE * width, mask=mask, other=0.0)
                    x = (x + res).to(x_out_ptr.dtype.element_ty)  # the residual stream, rounded as the block does
                    tl.store(x_out_ptr + offs, x, mask=mask)
                    x = x.to(tl.float32)
                mean = tl.sum(x, axis=0) / width
                d = tl.where(mask, x - mean, 0.0)
                n = d * tl.rsqrt(tl.sum(d * d, axis=0) / width + eps)
                if AFFINE:
                    n = n * w + b
                if SCALE >= 0:
                    n = n * (1 + tl.load(mod_row + SCALE * width, mask=mask, other=0.0)) \
                        + tl.load(mod_row + SHIFT * width, mask=mask, other=0.0)
                h = n.to(x_ptr.dtype.element_ty)
                if QUANTIZE:  # quantize_rows of the rounded h
                    hf = tl.where(mask, h.to(tl.float32), 0.0)
                    s = tl.maximum(tl.max(tl.abs(hf), axis=0), tiny) / fp8_max
                    q = tl.minimum(tl.maximum(hf / s, -fp8_max), fp8_max)
                    tl.store(h_ptr + offs, q.to(h_ptr.dtype.element_ty), mask=mask)
                    tl.store(scale_ptr + row, s)
                else:
                    tl.store(h_ptr + offs, h, mask=mask)


def _launch(x: Tensor, mod: Tensor | None, index: Tensor | None, eps: float, shift: int, scale: int,
            res: Tensor | None, gate: int, weight: Tensor | None, bias: Tensor | None, quantize: bool,
            h_dtype: torch.dtype) -> tuple[Tensor | None, Tensor, Tensor | None]:
    b, n, c = x.shape
    x = x.contiguous()
    m = b * n
    x_out = torch.empty_like(x) if res is not None else None
    h = torch.empty((m, c) if quantize else (b, n, c), device=x.device, dtype=h_dtype)
    h_scale = torch.empty((m, 1), device=x.device, dtype=torch.float32) if quantize else None
    if m:
        block = triton.next_power_of_2(c)
        rows = 4  # H200, 27,280 x 3,072, rows 1-32 x warps 4-16 (benchmarks/probes/probe3-h200.json): 4 and 4
        def given(t, prep=lambda t: t):  # pointers of absent tensors are never read (their switches are off)
            return x if t is None else prep(t).contiguous()

        _ada_norm_kernel[(triton.cdiv(m, rows),)](
            x, given(res), given(mod), given(index, lambda t: t.reshape(-1)), given(weight, Tensor.float),
            given(bias, Tensor.float), given(x_out), h, given(h_scale),
            m, n, c, 0 if mod is None else mod.shape[1] * c, eps, _TINY, FP8_MAX,
            SHIFT=shift, SCALE=scale, GATE=gate, HAS_RES=res is not None, HAS_INDEX=index is not None,
            AFFINE=weight is not None, QUANTIZE=quantize, ROWS=rows, BLOCK=block,
            num_warps=8 if block >= 8192 else 4)
    return x_out, h, h_scale


# A custom op, so torch.compile treats the launch as one opaque call with known output shapes.
@torch.library.custom_op("artifex::ada_norm", mutates_args=())
def _ada_norm_op(x: Tensor, mod: Tensor | None, index: Tensor | None, eps: float, shift: int, scale: int,
                 res: Tensor | None, gate: int, weight: Tensor | None, bias: Tensor | None,
                 quantize: bool) -> tuple[Tensor, Tensor, Tensor]:
    x_out, h, h_scale = _launch(x, mod, index, eps, shift, scale, res, gate, weight, bias, quantize,
                                FP8 if quantize else x.dtype)
    # custom ops return tensors: absent outputs are empty
    return (x.new_empty(0) if x_out is None else x_out), h, (x.new_empty(0, dtype=torch.float32)
                                                             if h_scale is None else h_scale)


@_ada_norm_op.register_fake
def _ada_norm_fake(x, mod, index, eps, shift, scale, res, gate, weight, bias, quantize):
    b, n, c = x.shape
    x_out = x.new_empty(0) if res is None else torch.empty_like(x)
    if quantize:
        return x_out, x.new_empty((b * n, c), dtype=FP8), x.new_empty((b * n, 1), dtype=torch.float32)
    return x_out, torch.empty_like(x), x.new_empty(0, dtype=torch.float32)


def ada_norm(x: Tensor, mod: Tensor | None, index: Tensor | None, eps: float, shift: int | None = None,
             scale: int | None = None, res: Tensor | None = None, gate: int | None = None,
             weight: Tensor | None = None, bias: Tensor | None = None, quantize: bool = False,
             path: str = "torch"):
    """See the module's docstring. x, res (B, L, C); ``mod`` (R, k, C) fp32 (a block's six vectors, or the
    model's output shift and scale), ``index`` (B, L) or None; ``shift``/``scale``/``gate``: which of ``mod``'s
    vectors (None: not applied). Returns (x, h): x is the
    updated residual stream (None without ``res``), h (B, L, C) in x's dtype, or with ``quantize``
    (e4m3 (B*L, C), fp32 scales (B*L, 1)). ``path``: "triton" or "torch" (``decide`` says which can run)."""
    if (shift is None) != (scale is None):
        raise ValueError("shift and scale come together (modulation), or neither")
    if path == "torch":
        return ada_norm_torch(x, mod, index, eps, shift, scale, res, gate, weight, bias, quantize)
    if path != "triton":
        raise ValueError(f"unknown path {path!r}; paths: triton, torch")
    x_out, h, h_scale = _ada_norm_op(x, mod, index, eps, NO if shift is None else shift,
                                     NO if scale is None else scale, res, NO if gate is None else gate,
                                     weight, bias, quantize)
    return (x_out if res is not None else None), ((h, h_scale) if quantize else h)


def decide(device: torch.device | str, dtype: torch.dtype) -> Decision:
    """"triton" on CUDA with Triton for bf16/fp16, else "torch" (the twin), and why; once per device and dtype."""
    return triton_decision(device, dtype, "the one-pass Triton adaptive norm", (torch.bfloat16, torch.float16))
