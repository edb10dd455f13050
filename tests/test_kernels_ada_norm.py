"""The one-pass adaptive norms: the twin against the block's own expressions, the Triton kernel against the twin.

The Triton kernel runs under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) in a subprocess, when
Triton is installed, alone and inside a tiny model's forward; scripts/check_kernels.py (section ada) checks it
on a GPU in bf16 and with the fp8 row quantization, at the TI2V-5B 720p shape.
"""

from __future__ import annotations

import pytest
import torch
from kernel_support import needs_triton, run_interpreted

from artifex.kernels import ada_norm as an

FORMS = {"norm1": dict(shift=0, scale=1), "norm2": dict(res=True, gate=2, affine=True),
         "norm3": dict(res=True, shift=3, scale=4)}


def _block():
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    torch.manual_seed(0)
    block = WanTransformerBlock(dim=40, ffn_dim=64, num_heads=2, qk_norm="rms_norm_across_heads",
                                cross_attn_norm=True, eps=1e-6).eval()
    with torch.no_grad():
        block.norm2.weight.add_(torch.randn(40) * 0.2)
        block.norm2.bias.add_(torch.randn(40) * 0.1)
    return block


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("per_token", [False, True])
def test_twin_is_the_blocks_own_norms(form, per_token):
    from artifex.engine.dit import _ada

    block = _block()
    spec = dict(FORMS[form])
    norm = {"norm1": block.norm1, "norm2": block.norm2, "norm3": block.norm3}[form]
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 9, 40, generator=g) * 3).bfloat16()
    res = torch.randn(2, 9, 40, generator=g).bfloat16() if spec.pop("res", False) else None
    affine = spec.pop("affine", False)
    mod = torch.randn(3 if per_token else 2, 6, 40, generator=g)
    index = torch.randint(0, 3, (2, 9), generator=g) if per_token else None
    with torch.no_grad():
        bx, bh = _ada(norm, x, mod, index, "torch", res=res, **spec)
        tx, th = an.ada_norm(x, mod, index, norm.eps, res=res, weight=norm.weight if affine else None,
                             bias=norm.bias if affine else None, path="torch", **spec)
    assert torch.equal(bh, th) and bh.dtype == torch.bfloat16
    assert (tx is None) == (res is None) and (tx is None or torch.equal(bx, tx))
    if res is not None:
        assert not torch.equal(bx, x)  # the residual went in
    _, (values, scales) = an.ada_norm(x, mod, index, norm.eps, res=res, quantize=True, path="torch",
                                      weight=norm.weight if affine else None, bias=norm.bias if affine else None,
                                      **spec)
    assert values.dtype == torch.float8_e4m3fn and values.shape == (18, 40) and scales.shape == (18, 1)
    deq = values.float() * scales
    assert ((deq - th.float().reshape(18, 40)).norm() / th.float().norm()).item() < 0.05


def test_arguments_and_decision_are_checked():
    x = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="shift and scale"):
        an.ada_norm(x, torch.zeros(1, 6, 8), None, 1e-6, shift=0)
    with pytest.raises(ValueError, match="unknown path 'x'; paths: triton, torch"):
        an.ada_norm(x, None, None, 1e-6, path="x")
    d = an.decide("cpu", torch.bfloat16)
    assert d.path == "torch" and "CUDA" in d.reason


_INTERPRETED = """
import json, torch
from artifex.kernels import Decision
from artifex.kernels import ada_norm as an
from artifex.kernels.fp8 import _TINY, FP8_MAX
torch.manual_seed(0)
out = {}
for width in (96, 1000):  # a power of two's tail masked; rows not a multiple of the kernel's tile
    b, n = 2, 7
    x, res = torch.randn(b, n, width) * 3, torch.randn(b, n, width)
    mod, index = torch.randn(3, 6, width) * 0.5, torch.randint(0, 3, (b, n))
    w, bias = torch.randn(width) * 0.2 + 1, torch.randn(width) * 0.1
    cases = {"norm1": (dict(shift=0, scale=1), mod[:2], None),
             "norm2": (dict(res=res, gate=2, weight=w, bias=bias), mod[:2], None),
             "norm3_per_token": (dict(res=res, shift=3, scale=4), mod, index),
             "output_per_token": (dict(shift=0, scale=1), mod[:, 4:], index)}  # the model's (R, 2, C) table
    for name, (kw, m, idx) in cases.items():
        tx, th = an.ada_norm_torch(x, m, idx, 1e-6, **kw)
        for quantize in (False, True):
            get = lambda k: an.NO if kw.get(k) is None else kw[k]
            gx, gh, gs = an._launch(x, m, idx, 1e-6, get("shift"), get("scale"), kw.get("res"), get("gate"),
                                    kw.get("weight"), kw.get("bias"), quantize,
                                    torch.float32)  # quantized: the values before the e4m3 cast
            r = {"x": None if tx is None else (gx - tx).abs().max().item()}
            if quantize:
                s = th.reshape(-1, width).abs().amax(-1, keepdim=True).clamp_min(_TINY) / FP8_MAX
                r["values"] = (gh - (th.reshape(-1, width) / s).clamp(-FP8_MAX, FP8_MAX)).abs().max().item()
                r["scale"] = ((gs - s).abs() / s).max().item()
            else:
                r["h"] = ((gh - th).abs().max() / th.abs().max()).item()
            out[f"{name}-{width}-{quantize}"] = r

# inside a tiny model's forward: the block's norms through the kernel vs through the modules
from diffusers import WanTransformer3DModel
from artifex.attention import install
from artifex.attention.processor import AttentionRuntime
from artifex.engine import dit
model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                              out_channels=4, text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2,
                              rope_max_seq_len=64).eval()
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
install([model], AttentionRuntime(chain="sdpa-math"))
dit.accelerate_model(model)
g = torch.Generator().manual_seed(1)
kw = dict(hidden_states=torch.randn(2, 4, 3, 8, 10, generator=g), timestep=torch.tensor([900.0, 300.0]),
          encoder_hidden_states=torch.randn(2, 512, 32, generator=g), return_dict=False)
paths = []
with torch.no_grad():
    ref = model(**kw)[0]
    dit.ada_decide = lambda device, dtype: Decision("triton", "forced for the test")
    real = dit._norm_path
    dit._norm_path = lambda *a: paths.append(real(*a)) or paths[-1]
    tables, real_ada = [], dit.ada_norm
    dit.ada_norm = lambda *a, **k: tables.append(a[1].shape[1]) or real_ada(*a, **k)
    got = model(**kw)[0]
out["model"] = {"rel": ((got - ref).norm() / ref.norm()).item(), "paths": sorted(set(paths)),
                "tables": sorted(set(tables))}
print("RESULT " + json.dumps(out))
"""


@needs_triton
def test_triton_kernel_matches_twin_interpreted():
    results = run_interpreted(_INTERPRETED)
    model = results.pop("model")
    assert model["paths"] == ["triton"] and model["rel"] < 1e-5, model  # fp32: sum order only
    # every norm went through the kernel: norm1 adds the previous block's gated residual (its six vectors and
    # that gate), norm2/norm3 (six), the output norm adds the last block's (shift, scale, gate)
    assert model["tables"] == [3, 6, 7], model
    assert len(results) == 16
    for key, r in results.items():
        assert r["x"] is None or r["x"] == 0.0, (key, r)  # the residual stream: one fp32 add, same rounding
        assert r.get("h", 0) < 1e-6 and r.get("values", 0) < 1e-3 and r.get("scale", 0) < 1e-6, (key, r)
