"""The fp8 linear: quantization, its twin against the full-precision linear, the real torch._scaled_mm path
against the twin (where torch runs it on a CPU), and swapping into a tiny Wan transformer."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from kernel_support import needs_triton, run_interpreted
from torch import nn

from artifex.kernels import fp8


def _rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@functools.cache
def _cpu_scaled_mm_blocker() -> str | None:
    return fp8._probe_scaled_mm(torch.device("cpu"))


def test_quantize_round_trip():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-3, 3, 64)[:, None]  # rows of very different ranges
    x[3] = 0.0
    values, scale = fp8.quantize_rows(x)
    assert values.dtype == torch.float8_e4m3fn and scale.shape == (64, 1) and scale.dtype == torch.float32
    back = fp8.dequantize(values, scale)
    assert torch.isfinite(back).all() and (back[3] == 0).all()
    # e4m3 keeps 3 mantissa bits: half an ulp is 2^-4 relative; below its normal range the spacing is 2^-9
    assert ((back - x).abs() <= x.abs() * 2**-4 + scale * 2**-9).all()
    # each row's largest magnitude lands on e4m3's largest value and comes back as itself
    torch.testing.assert_close(back.abs().amax(1), x.abs().amax(1), rtol=1e-6, atol=0)
    assert _rel_l2(back, x) < 0.03


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_twin_close_to_linear(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(512, 256)
    x = torch.randn(3, 77, 512)
    ref = lin(x)  # fp32 reference
    layer = fp8.Fp8Linear.from_linear(lin, path="twin").to(dtype)
    out = layer(x.to(dtype))
    assert out.dtype == dtype and out.shape == ref.shape
    err, err_bf16 = _rel_l2(out, ref), _rel_l2(lin.to(dtype)(x.to(dtype)), ref)
    print(f"fp8 twin ({dtype}) relative L2 vs fp32 linear: {err:.4f}; the {dtype} linear itself: {err_bf16:.4f}")
    assert err < 0.05  # measured 0.036 (weights and activations both e4m3)
    # the twin is the quantized operands' exact product, up to the final bf16 rounding
    values, scale = fp8.quantize_rows(x.to(dtype))
    exact = fp8.dequantize(values, scale) @ layer.dequantized_weight().t() + lin.bias
    assert _rel_l2(out, exact) < 1e-2


def test_scaled_mm_path_matches_twin_on_cpu():
    why = _cpu_scaled_mm_blocker()
    if why:
        pytest.skip(f"torch {torch.__version__} cannot run fp8 torch._scaled_mm on a CPU: {why}")
    torch.manual_seed(1)
    lin = nn.Linear(384, 160).to(torch.bfloat16)
    layer = fp8.Fp8Linear.from_linear(lin)
    x = torch.randn(2, 45, 384, dtype=torch.bfloat16) * 3
    real, twin = layer.forward_scaled_mm(x), layer.forward_twin(x)
    assert real.dtype == torch.bfloat16 and real.shape == (2, 45, 160)
    err = _rel_l2(real, twin)
    print(f"torch._scaled_mm (CPU) vs twin relative L2: {err:.2e}")
    assert err < 1e-2  # measured 3e-3: same quantized operands; the twin dequantizes to bf16 before its matmul
    no_bias = fp8.Fp8Linear.from_linear(nn.Linear(384, 160, bias=False).to(torch.bfloat16))
    assert _rel_l2(no_bias.forward_scaled_mm(x), no_bias.forward_twin(x)) < 1e-2


def test_dtype_moves_keep_fp8_storage_and_state_dict_round_trips():
    layer = fp8.Fp8Linear.from_linear(nn.Linear(64, 32))
    layer.to(torch.bfloat16).to("cpu").half().float()
    assert layer.weight_fp8.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.float32
    fresh = fp8.Fp8Linear(64, 32)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(5, 64)
    torch.testing.assert_close(fresh.forward_twin(x), layer.forward_twin(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8.Fp8Linear(24, 32)


def test_decide_on_cpu_and_explicit_paths():
    d = fp8.decide("cpu")
    assert d.path == "twin" and "CUDA" in d.reason
    assert fp8.decide(torch.device("cpu")) is d
    layer = fp8.Fp8Linear.from_linear(nn.Linear(32, 32), path="cuda")
    with pytest.raises(ValueError, match="unknown path"):
        layer(torch.randn(2, 32))


def _tiny_wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
                                 text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, image_dim=24,
                                 added_kv_proj_dim=64).eval()


def _forward(model):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 3, 8, 12, generator=g)
    text = torch.randn(1, 512, 32, generator=g)
    image = torch.randn(1, 257, 24, generator=g)
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text,
                     encoder_hidden_states_image=image, return_dict=False)[0]


@pytest.mark.parametrize("path", ["twin", "scaled_mm"])
def test_quantize_linears_on_tiny_wan(path):
    if path == "scaled_mm" and _cpu_scaled_mm_blocker():
        pytest.skip(f"fp8 torch._scaled_mm does not run on this CPU: {_cpu_scaled_mm_blocker()}")
    model = _tiny_wan()
    ref = _forward(model)
    swapped = copy.deepcopy(model)
    report = fp8.quantize_linears(swapped, path=path)

    # every linear of the transformer blocks, none of the embedders or the output projection
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(report.swapped) == {n for n in linears if n.startswith("blocks.")}
    assert set(report.skipped) == linears - set(report.swapped)
    assert "excluded" in report.skipped["proj_out"] and "excluded" in report.skipped[
        "condition_embedder.time_embedder.linear_1"]
    assert report.bytes_after < report.bytes_before / 3.5  # fp32 -> e4m3 plus a scale per channel
    for name, m in swapped.named_modules():
        if name in report.swapped:
            assert isinstance(m, fp8.Fp8Linear)
        else:  # norms, embedders, the patch embedding are the same classes as before
            assert type(m) is type(model.get_submodule(name))

    out = _forward(swapped)
    err = _rel_l2(out, ref)
    print(f"tiny Wan with fp8 linears ({path}), relative L2 of the output vs fp32: {err:.4f}")
    assert err < 0.05, report.summary()


def test_quantize_linears_reasons_for_skips():
    model = _tiny_wan()
    report = fp8.quantize_linears(model, include=["condition_embedder.*", "blocks.0.attn1.*"], exclude=())
    # the image embedder's 24-wide layers cannot go through the fp8 matmul
    assert "not multiples of 16" in report.skipped["condition_embedder.image_embedder.ff.net.0.proj"]
    assert "not matched by include" in report.skipped["blocks.1.ffn.net.2"]
    assert "blocks.0.attn1.to_q" in report.swapped and "condition_embedder.time_proj" in report.swapped
    assert isinstance(model.blocks[0].attn1.to_out[0], fp8.Fp8Linear)
    root = fp8.quantize_linears(nn.Linear(32, 32))
    assert root.swapped == [] and "" in root.skipped


def test_fused_row_quantization_twin_matches_quantize_rows_and_gelu():
    torch.manual_seed(2)
    x = torch.randn(3, 5, 96, dtype=torch.bfloat16) * 4
    values, scale = fp8.quantize_rows_fused(x, path="torch")
    ref_v, ref_s = fp8.quantize_rows(x.reshape(15, 96))
    assert values.shape == (15, 96) and scale.shape == (15, 1)
    assert torch.equal(values.float(), ref_v.float()) and torch.equal(scale, ref_s)
    gv, gs = fp8.quantize_rows_fused(x, gelu=True, path="torch")
    gelu = torch.nn.functional.gelu(x.float(), approximate="tanh").reshape(15, 96)
    assert _rel_l2(fp8.dequantize(gv, gs), gelu) < 5e-2  # e4m3: 3 mantissa bits
    assert fp8.rows_path("cpu", torch.bfloat16) == "torch"
    with pytest.raises(ValueError, match="unknown path 'x'; paths: triton, torch"):
        fp8.quantize_rows_fused(x, path="x")


_INTERPRETED_ROWS = """
import json, torch
from artifex.kernels import fp8
torch.manual_seed(0)
out = {}
for gelu in (False, True):
    for width in (96, 1000):
        x = (torch.randn(7, width) * 3).to(torch.bfloat16)
        x[2] = 0  # an all-zero row gets the floor scale
        got, scale = fp8._launch_rows(x, gelu, out_dtype=torch.float32)  # values before the e4m3 cast
        xf = x.float()
        if gelu:
            xf = torch.nn.functional.gelu(xf, approximate="tanh")
        ref_scale = xf.abs().amax(-1, keepdim=True).clamp_min(fp8._TINY) / fp8.FP8_MAX
        ref = (xf / ref_scale).clamp(-fp8.FP8_MAX, fp8.FP8_MAX)
        out[f"{gelu}-{width}"] = {"values": (got - ref).abs().max().item(),
                                  "scale": ((scale - ref_scale).abs() / ref_scale).max().item()}
print("RESULT " + json.dumps(out))
"""


@needs_triton
def test_fused_row_quantization_kernel_matches_twin_interpreted():
    """The Triton kernel under Triton's interpreter (CPU) against the twin's math, up to the e4m3 cast (the
    interpreter does not round to e4m3 as the GPU does; scripts/check_kernels.py compares the cast on a GPU)."""
    results = run_interpreted(_INTERPRETED_ROWS)
    assert len(results) == 4
    for key, r in results.items():
        assert r["values"] < 1e-3 and r["scale"] < 1e-5, (key, r)  # fp32 GELU: exp- vs tanh-based forms


def test_fp8_keep_leaves_the_named_block_layers_in_bf16_and_refuses_patterns_that_match_nothing():
    from diffusers import WanTransformer3DModel

    from artifex.config import OptimizationConfig
    from artifex.engine.fp8 import quantize_experts
    from artifex.errors import InvalidRequestError
    from artifex.models.registry import get_model

    why = _cpu_scaled_mm_blocker()
    if why:
        pytest.skip(f"torch {torch.__version__} cannot run fp8 torch._scaled_mm on a CPU: {why}")
    spec = get_model("tiny-ti2v")
    torch.manual_seed(0)
    model = WanTransformer3DModel(**spec.transformer.diffusers_config()).to(torch.bfloat16).eval()
    report = quantize_experts(spec, [model], torch.device("cpu"), torch.bfloat16, keep="blocks.0.*, *.ffn.net.2")
    kept = set(report["kept"])  # exactly the block layers still plain nn.Linear after the swap
    assert kept == {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")}
    assert "blocks.0.attn1.to_q" in kept and "blocks.1.ffn.net.2" in kept
    assert isinstance(model.blocks[1].attn1.to_q, fp8.Fp8Linear) and isinstance(model.blocks[1].ffn.net[0].proj,
                                                                                  fp8.Fp8Linear)
    assert f"{len(kept)} kept" in report["mode_layers"]  # the layers outside the blocks are not counted as kept
    assert report["probe"][0]["rel_l2_vs_bf16"] < 0.1
    again = quantize_experts(spec, [model], torch.device("cpu"), torch.bfloat16)  # components shared by engines
    assert again["probe"][0]["rel_l2_vs_bf16"] is None and "already in fp8" in again["probe"][0]["note"]
    other = WanTransformer3DModel(**spec.transformer.diffusers_config()).to(torch.bfloat16).eval()
    with pytest.raises(InvalidRequestError, match=r"fp8_keep: 'blocks\.7\.\*' matches no linear layer.*blocks\.0 to "
                                                  r"blocks\.1"):
        quantize_experts(spec, [other], torch.device("cpu"), torch.bfloat16, keep="blocks.7.*")
    with pytest.raises(InvalidRequestError, match="fp8_keep: keeps layers out of fp8 compute, which is off"):
        OptimizationConfig(fp8_keep="blocks.0.*")
    assert OptimizationConfig(fp8="gemm", fp8_keep="blocks.0.*").fp8_keep == "blocks.0.*"


def test_unquantized_runs_the_plain_path_and_nests():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    layer = fp8.Fp8Linear.from_linear(lin, path="twin")
    x = torch.randn(2, 5, 64)
    quantized = layer(x)
    with fp8.unquantized():
        assert fp8.quantization_suspended() and layer._path(x.device) == "plain"
        assert not layer.runs_scaled_mm(x.device)
        with fp8.unquantized(False):  # an inner "off" does not lift an outer suspension
            assert fp8.quantization_suspended()
        plain = layer(x)
    assert not fp8.quantization_suspended() and layer._path(x.device) == "twin"
    with fp8.unquantized(False):
        assert torch.equal(layer(x), quantized)
    # unquantized input, e4m3-rounded weight, in x's dtype
    assert torch.allclose(plain, torch.nn.functional.linear(x, layer.dequantized_weight(), lin.bias), atol=1e-6)
    assert _rel_l2(plain, lin(x)) < 0.05 and not torch.equal(plain, quantized)
    with pytest.raises(ValueError, match="paths: scaled_mm, twin, plain"):
        fp8.Fp8Linear.from_linear(lin, path="bogus")(x)


def test_attention_runtime_takes_its_plain_chain_while_fp8_is_suspended():
    from artifex.attention.processor import AttentionRuntime

    runtime = AttentionRuntime(chain="fa3-fp8,fa3,sdpa")
    assert runtime.active_chain == "fa3-fp8,fa3,sdpa"
    with fp8.unquantized():
        assert runtime.active_chain == "fa3,sdpa" and not runtime.quantizes_qk
    assert runtime.active_chain == "fa3-fp8,fa3,sdpa"


def test_fp8_bf16_steps_keep_the_first_and_last_steps_out_of_fp8(monkeypatch, tmp_path):
    """The engine's step loop with fp8 layers on CPU (torch runs row-wise ``_scaled_mm`` or the twin there; the
    engine refuses fp8 on a CPU, so that check is lifted here): which steps ran quantized, which plain."""
    from artifex.config import OptimizationConfig
    from artifex.engine import pipeline
    from artifex.engine.pipeline import Engine
    from artifex.engine.request import GenerationRequest
    from artifex.errors import InvalidRequestError

    monkeypatch.setattr(pipeline, "check_fp8", lambda mode, device: None)
    seen: list[str] = []
    real = fp8.Fp8Linear.forward
    monkeypatch.setattr(fp8.Fp8Linear, "forward",
                        lambda self, x: seen.append("plain" if self._path(x.device) == "plain" else "e4m3")
                        or real(self, x))
    eng = Engine.load("tiny-ti2v", config=OptimizationConfig(device="cpu", fp8="gemm", fp8_bf16_steps=1))
    assert eng.plan.fp8_bf16_steps == 1
    per_step: list[set[str]] = []

    def on_event(event):
        if event.stage == "denoise" and event.step > 0:
            per_step.append(set(seen))
        if event.stage in ("denoise", "encode_text"):
            seen.clear()

    eng.generate(GenerationRequest(model="tiny-ti2v", prompt="a kite", steps=4, frames=9, seed=3,
                                   output=str(tmp_path / "v.mp4")), on_event=on_event)
    assert per_step == [{"plain"}, {"e4m3"}, {"e4m3"}, {"plain"}]  # the text K/V: once, in the first step
    assert not fp8.quantization_suspended()
    with pytest.raises(InvalidRequestError, match="fp8_bf16_steps: keeps steps out of fp8 compute, which is off"):
        OptimizationConfig(fp8_bf16_steps=2)
    with pytest.raises(InvalidRequestError, match="fp8_bf16_steps: must be >= 0, got -1"):
        OptimizationConfig(fp8="gemm", fp8_bf16_steps=-1)
