"""The fa3-fp8 attention backend: probing with reasons, explicit-only selection, and its quantization math
(the twin) against full-precision attention on CPU. The FA3 kernel itself needs a Hopper GPU
(scripts/check_kernels.py compares it there)."""

from __future__ import annotations

import pytest
import torch

from artifex.attention.backends import BACKENDS, _fa3_module, probe
from artifex.attention.select import AttentionUnavailableError, reference_attention, rel_l2, select
from artifex.config import OptimizationConfig
from artifex.kernels import fp8_attention as fa

CPU = torch.device("cpu")


def test_probe_reasons_without_gpu_or_wheel():
    backend = BACKENDS["fa3-fp8"]
    assert not backend.in_auto and backend.bound is not None
    assert "needs CUDA" in probe(backend, CPU, torch.bfloat16, 128)
    if _fa3_module() is not None:
        pytest.skip("an FA3 build is installed here, so 'not installed' cannot be shown")
    # on a CUDA device the wheel is looked for before the GPU is queried
    assert probe(backend, torch.device("cuda"), torch.bfloat16, 128).startswith("not installed (pip install fa3-fwd")


def test_auto_never_picks_fa3_fp8_and_explicit_is_refused_with_reason():
    choice = select("auto", CPU, torch.float32, (1, 64, 2, 32))
    assert "fa3-fp8" not in choice.chain and "fa3-fp8" not in choice.rejected
    with pytest.raises(AttentionUnavailableError, match="fa3-fp8.*needs CUDA"):
        select("fa3-fp8", CPU, torch.bfloat16, (1, 64, 2, 128))


def test_config_accepts_fa3_fp8_and_warns():
    config = OptimizationConfig(attention="fa3-fp8")
    assert any("fa3-fp8" in w and "e4m3" in w for w in config.check_supported())


def test_quantize_shapes_and_descales():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 50, 3, 128, generator=g) * torch.tensor([0.01, 1.0, 30.0])[None, None, :, None]).bfloat16()
    values, descale = fa.quantize_fp8(x, "head")
    assert values.dtype == torch.float8_e4m3fn and values.shape == x.shape
    assert descale.shape == (2, 3) and descale.dtype == torch.float32 and descale.is_contiguous()
    amax = x.float().abs().amax(dim=(1, 3))
    torch.testing.assert_close(descale * 448, amax, rtol=1e-6, atol=0)
    _, per_tensor = fa.quantize_fp8(x, "tensor")
    assert per_tensor.shape == (2, 3) and (per_tensor == per_tensor[0, 0]).all()
    with pytest.raises(ValueError, match="granularity"):
        fa.quantize_fp8(x, "row")


@pytest.mark.parametrize("shape", [(1, 256, 4, 128), (2, 100, 3, 64)])
def test_twin_close_to_full_precision_attention(shape):
    g = torch.Generator().manual_seed(1)
    b, n, h, d = shape
    q, k, v = (torch.randn(b, n, h, d, generator=g) for _ in range(3))
    ref = reference_attention(q, k, v)  # float64
    bf16 = rel_l2(reference_attention(*(t.bfloat16() for t in (q, k, v))).bfloat16().float(), ref)
    errors = {}
    for gran in fa.GRANULARITIES:
        out = fa.fp8_attention_twin(*(t.bfloat16() for t in (q, k, v)), granularity=gran)
        assert out.dtype == torch.bfloat16 and out.shape == ref.shape
        errors[gran] = rel_l2(out.float(), ref)
    print(f"fp8 attention twin {shape}: rel L2 vs float64 per-head {errors['head']:.4f}, "
          f"per-tensor {errors['tensor']:.4f}; bf16 inputs alone {bf16:.4f}")
    assert errors["head"] < 0.08  # measured 0.047 on Gaussian inputs (bf16 alone: 0.003)


def test_per_head_scales_beat_per_tensor_when_heads_differ():
    # e4m3 spans 2^-9..448, so a shared scale only hurts heads far smaller than the largest: give v such heads
    g = torch.Generator().manual_seed(2)
    ranges = torch.tensor([2e-4, 1e-2, 1.0, 10.0])[None, None, :, None]
    q, k = (torch.randn(1, 192, 4, 128, generator=g) for _ in range(2))
    v = torch.randn(1, 192, 4, 128, generator=g) * ranges
    ref = reference_attention(q, k, v)

    def worst_head(gran):
        out = fa.fp8_attention_twin(q, k, v, granularity=gran)
        return max(rel_l2(out[:, :, h], ref[:, :, h]) for h in range(4))

    head, tensor = worst_head("head"), worst_head("tensor")
    print(f"heads of 2e-4..10 magnitude: worst head rel L2 per-head scales {head:.4f}, per-tensor {tensor:.4f}")
    assert head < 0.08 and tensor > 2 * head


def test_compiled_functions_keep_compiling_past_dynamos_default_of_eight_shapes():
    """A server sees many request shapes: every one gets its own graph (dynamo's default would run the ninth on
    eagerly, silently); the fp8 quantization compiled this way still equals the eager one."""
    from torch._dynamo.utils import counters

    from artifex.kernels import RECOMPILE_LIMIT, compile_static
    from artifex.kernels.fp8_attention import quantize_fp8

    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=8):  # the default, as a fresh process has it
        quantize = compile_static(quantize_fp8, backend="eager")
        assert torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT
        before = counters["stats"]["unique_graphs"]
        base = torch.randn(2, 40, 4, 3 * 16)
        shapes = [base[:, :n, :, :16] for n in range(28, 40)]  # 12 lengths, strided like fused q/k/v views
        for x in shapes:
            values, descale = quantize(x)
            want_values, want_descale = quantize_fp8(x)
            assert torch.equal(values.float(), want_values.float()) and torch.equal(descale, want_descale)
        assert counters["stats"]["unique_graphs"] - before == len(shapes)
