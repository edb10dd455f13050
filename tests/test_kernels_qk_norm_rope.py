"""The fused q/k norm + rotary kernel: its twin against diffusers' Wan attention math, the kernel against the twin.

The twin runs on CPU here. The Triton kernel is checked against the twin with Triton's
interpreter (TRITON_INTERPRET=1, CPU tensors) in a subprocess, when Triton is installed;
scripts/check_kernels.py does the same on a GPU at the real TI2V-5B shape.
"""

from __future__ import annotations

import os

import pytest
import torch
from kernel_support import needs_triton, run_interpreted

from artifex.kernels import qk_norm_rope as qnr

HEADS, HEAD_DIM = 2, 32


def _tiny_wan(dtype=torch.float32):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=16,
                                  out_channels=16, text_dim=32, freq_dim=32, ffn_dim=128, num_layers=1).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # random weights everywhere, norm weights included (they start at ones)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() > 1 else 1.0))
    return model.to(dtype)


def _diffusers_qk(attn, hidden, rotary, monkeypatch):
    """q and k exactly as diffusers' WanAttnProcessor hands them to attention (norms, then its rotary)."""
    from diffusers.models.transformers import transformer_wan

    seen = {}

    def capture(query, key, value, **kwargs):
        seen["q"], seen["k"] = query, key
        return query

    monkeypatch.setattr(transformer_wan, "dispatch_attention_fn", capture)
    transformer_wan.WanAttnProcessor()(attn, hidden, rotary_emb=rotary)
    return seen["q"], seen["k"]


def _rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


LATENT = (1, 16, 3, 8, 12)  # (B, C, F, H, W) -> 3*4*6 = 72 tokens with patch (1, 2, 2)


def test_twin_matches_diffusers_fp32(monkeypatch):
    model = _tiny_wan()
    attn = model.blocks[0].attn1
    tokens = 3 * 4 * 6
    hidden = torch.randn(2, tokens, HEADS * HEAD_DIM, generator=torch.Generator().manual_seed(1))
    rotary = model.rope(torch.empty(LATENT))
    ref_q, ref_k = _diffusers_qk(attn, hidden, rotary, monkeypatch)

    with torch.no_grad():
        q, k = attn.to_q(hidden), attn.to_k(hidden)
        for table in (rotary, qnr.rope_table(model.rope, LATENT)):  # diffusers' table and the compact one
            out_q, out_k = qnr.qk_norm_rope(q, k, attn.norm_q.weight, attn.norm_k.weight, attn.norm_q.eps, *table,
                                            HEADS)
            assert out_q.shape == out_k.shape == (2, tokens, HEADS, HEAD_DIM) and out_q.is_contiguous()
            # fp32 both sides; diffusers rotates with the float64 table, the twin with fp32: ~1e-7 apart
            torch.testing.assert_close(out_q, ref_q, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out_k, ref_k, rtol=1e-5, atol=1e-5)


def test_twin_bf16_at_least_as_accurate_as_diffusers(monkeypatch):
    model = _tiny_wan(torch.bfloat16)
    attn = model.blocks[0].attn1
    hidden = torch.randn(1, 72, HEADS * HEAD_DIM, generator=torch.Generator().manual_seed(2)).bfloat16()
    rotary = model.rope(torch.empty(LATENT))
    ref_q, ref_k = _diffusers_qk(attn, hidden, rotary, monkeypatch)
    with torch.no_grad():
        q, k = attn.to_q(hidden), attn.to_k(hidden)
        out_q, out_k = qnr.qk_norm_rope(q, k, attn.norm_q.weight, attn.norm_k.weight, attn.norm_q.eps, *rotary,
                                        HEADS)
        exact_q, exact_k = qnr.qk_norm_rope(q.float(), k.float(), attn.norm_q.weight, attn.norm_k.weight,
                                            attn.norm_q.eps, *rotary, HEADS)
    assert out_q.dtype == torch.bfloat16
    for ours, theirs, exact in ((out_q, ref_q, exact_q), (out_k, ref_k, exact_k)):
        assert _rel_l2(ours, theirs) < 1e-2  # bf16: diffusers rounds between norm and rotation, the twin does not
        assert _rel_l2(ours, exact) <= _rel_l2(theirs, exact) * 1.05


def test_rope_table_is_diffusers_pairs():
    model = _tiny_wan()
    freqs_cos, freqs_sin = model.rope(torch.empty(LATENT))
    cos, sin = qnr.rope_table(model.rope, LATENT)
    assert cos.shape == sin.shape == (72, HEAD_DIM // 2) and cos.dtype == torch.float32
    # diffusers repeats each frequency for both members of a pair
    torch.testing.assert_close(freqs_cos[0, :, 0].float(), cos.repeat_interleave(2, dim=-1))
    torch.testing.assert_close(freqs_sin[0, :, 0].float(), sin.repeat_interleave(2, dim=-1))


def test_bad_shapes_are_refused():
    q = torch.randn(1, 4, 64)
    w = torch.ones(64)
    cos = sin = torch.ones(4, 16)
    with pytest.raises(ValueError, match="head_dim"):
        qnr.qk_norm_rope(q, q, w, w, 1e-6, cos, sin, heads=3)
    with pytest.raises(ValueError, match="rotary table"):
        qnr.qk_norm_rope(q, q, w, w, 1e-6, torch.ones(5, 16), torch.ones(5, 16), heads=2)
    with pytest.raises(ValueError, match="unknown path"):
        qnr.qk_norm_rope(q, q, w, w, 1e-6, cos, sin, heads=2, path="cuda")


def test_decide_gives_reasons_on_cpu():
    d = qnr.decide("cpu", torch.bfloat16)
    assert d.path == "torch" and "CUDA" in d.reason
    assert qnr.decide(torch.device("cpu"), torch.bfloat16) is d  # decided once
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="cannot run"):
            qnr.qk_norm_rope(torch.randn(1, 4, 64), torch.randn(1, 4, 64), torch.ones(64), torch.ones(64), 1e-6,
                             torch.ones(4, 16), torch.ones(4, 16), heads=2, path="triton")


_INTERPRETED = r"""
import json, torch
from artifex.kernels import qk_norm_rope as qnr
g = torch.Generator().manual_seed(0)
results = {}
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for heads, d, n in ((3, 32, 37), (2, 128, 9)):  # a non-power-of-two head count; Wan's head_dim
        w = heads * d
        qkv = torch.randn(2, n, 3 * w, generator=g) * 2  # q and k as strided views of a fused projection
        q, k = (t.to(dtype) for t in qkv.chunk(3, dim=-1)[:2])
        wq, wk = (torch.randn(w, generator=g).to(dtype) for _ in range(2))
        ang = torch.randn(n, d // 2, generator=g)
        args = (wq, wk, 1e-6, ang.cos(), ang.sin(), heads)
        tq, tk = qnr.qk_norm_rope(q, k, *args, path="triton")
        rq, rk = qnr.qk_norm_rope(q, k, *args, path="torch")
        ulp = torch.finfo(dtype).eps
        worst = max(((a.float() - b.float()).abs() / (b.float().abs() + 1)).max().item()  # relative, absolute below 1
                    for a, b in ((tq, rq), (tk, rk)))
        results[f"{dtype}|{heads}x{d}"] = {"worst_rel_in_ulps": worst / ulp, "shape_ok": tq.shape == (2, n, heads, d)}
        # e4m3 output at the static head scales: the values before the cast (the interpreter does not round to
        # e4m3 as the GPU does) against the twin's fp32 result over the same descales
        inv_q, inv_k = (1 / qnr.fp8_head_scales(wt, heads) for wt in (wq, wk))
        fq, fk = qnr._launch(q, k, wq, wk, 1e-6, ang.cos(), ang.sin(), heads, inv_q, inv_k, torch.float32)
        yq, yk = qnr.qk_norm_rope_torch(q.float(), k.float(), wq, wk, 1e-6, ang.cos(), ang.sin(), heads)
        results[f"fp8 {dtype}|{heads}x{d}"] = {
            "worst_rel_in_ulps": max(((a - b * i[:, None]).abs() / ((b * i[:, None]).abs() + 1)).max().item()
                                     for a, b, i in ((fq, yq, inv_q), (fk, yk, inv_k))) / torch.finfo(torch.float32).eps,
            "shape_ok": fq.shape == (2, n, heads, d)}
print("RESULT " + json.dumps(results))
"""


@needs_triton
def test_triton_kernel_matches_twin_interpreted():
    results = run_interpreted(_INTERPRETED)
    for key, r in results.items():
        assert r["shape_ok"], key
        # fp32 math on both sides: half types may differ by one output rounding, fp32 by a few ulps (sum order;
        # the e4m3 rows are compared at their scale, where fp32's few ulps are 2e-6 of a value, e4m3's step 6e-2)
        bound = 32 if key.startswith("fp8") else 8 if "torch.float32" in key else 1.01
        assert r["worst_rel_in_ulps"] <= bound, (key, r)


def test_fp8_output_fits_e4m3_by_the_weight_bound_alone():
    """``qk_norm_rope_fp8`` (twin): descales from the norm weights only; even a row with all its energy in one
    channel (the bound's worst case) lands inside e4m3 unclipped, and ordinary rows dequantize within e4m3's
    rounding of the bf16 path's values."""
    g = torch.Generator().manual_seed(2)
    heads, d, n = 2, 32, 11
    w = heads * d
    q, k = torch.randn(1, n, w, generator=g) * 3, torch.randn(1, n, w, generator=g)
    q[0, 0] = 0
    q[0, 0, 5] = 1e4  # all of row 0 in one channel: its normed value is sqrt(C) * w[5]
    wq, wk = torch.rand(w, generator=g) + 0.5, torch.rand(w, generator=g) + 0.5
    wq[5] = wq.max() + 1  # ... at the head's largest weight: exactly the bound
    ang = torch.randn(n, d // 2, generator=g) * 0  # no rotation for row 0's check
    (q8, dq), (k8, dk) = qnr.qk_norm_rope_fp8(q, k, wq, wk, 1e-6, ang.cos(), ang.sin(), heads, path="torch")
    assert q8.dtype == k8.dtype == torch.float8_e4m3fn and q8.shape == (1, n, heads, d) and dq.shape == (1, heads)
    ref_q, ref_k = qnr.qk_norm_rope_torch(q, k, wq, wk, 1e-6, ang.cos(), ang.sin(), heads)
    assert q8[0, 0, 0, 5].float().item() == pytest.approx(448, rel=1e-3)  # at the top of the range, not beyond
    assert (ref_q[0, 0, 0, 5] / dq[0, 0]).item() == pytest.approx(448, rel=1e-4)
    for values, descale, ref in ((q8, dq, ref_q), (k8, dk, ref_k)):
        deq = values.float() * descale[:, None, :, None]
        assert ((deq - ref).norm() / ref.norm()).item() < 0.04  # e4m3: 3 mantissa bits
    with pytest.raises(ValueError, match="unknown path"):
        qnr.qk_norm_rope_fp8(q, k, wq, wk, 1e-6, ang.cos(), ang.sin(), heads, path="x")


def test_triton_decision_is_made_inside_compiled_code(monkeypatch):
    """A kernel's first decision may come inside a compiled block (the fp8 row quantization in a fresh process):
    dynamo must take the GPU queries as constants instead of failing on them (torch.* calls that return no
    tensor). The queries are stood in for by torch calls of the same kind, so this runs without a GPU."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: torch.__config__.show()[:0] + "Fake")
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device=None: (9, len(torch.__config__.show()[:0])))

    def f(x):
        d = qnr._triton_decision("cuda:0", torch.bfloat16, "a kernel", qnr.DTYPES)
        return x + 1 if d.path == "triton" else x - 1

    qnr._triton_decision.cache_clear()
    try:
        torch._dynamo.reset()
        out = torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(2))
        d = qnr._triton_decision("cuda:0", torch.bfloat16, "a kernel", qnr.DTYPES)
    finally:
        qnr._triton_decision.cache_clear()
    assert torch.equal(out, torch.full((2,), 1.0 if d.path == "triton" else -1.0))
    if qnr.triton is not None:
        assert d.path == "triton" and d.reason.endswith("on Fake")
