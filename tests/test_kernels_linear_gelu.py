"""The up-projection + tanh-GELU op (cuBLASLt epilogue on CUDA) against diffusers' feed-forward, on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from artifex.kernels import linear_gelu as lg


def _args(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 32, generator=g).to(dtype)
    w = (torch.randn(48, 32, generator=g) * 0.2).to(dtype)
    b = torch.randn(48, generator=g).to(dtype)
    return x, w, b


def test_op_matches_diffusers_gelu_module():
    from diffusers.models.activations import GELU

    x, w, b = _args()
    act = GELU(32, 48, approximate="tanh")
    with torch.no_grad():
        act.proj.weight.copy_(w)
        act.proj.bias.copy_(b)
        ref = act(x)
    for path in lg.PATHS:  # on CPU the custom op runs the twin (ATen's CPU epilogue uses the erf GELU)
        out = lg.linear_gelu(x, w, b, path)
        assert out.shape == (2, 7, 48)
        torch.testing.assert_close(out, ref)
    exact = F.gelu(F.linear(x, w, b))  # the erf form differs: the op really is the tanh form
    assert not torch.allclose(lg.linear_gelu(x, w, b, "cublaslt"), exact, atol=1e-6, rtol=0)


def test_op_passes_torch_library_checks_and_stays_whole_under_compile():
    x, w, b = _args()
    torch.library.opcheck(torch.ops.artifex.linear_gelu.default, (x, w, b))
    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    fn = torch.compile(lambda x, w, b: lg.linear_gelu(x, w, b, "cublaslt") * 2, backend=backend, fullgraph=True)
    torch.testing.assert_close(fn(x, w, b), 2 * lg.linear_gelu_torch(x, w, b))
    assert any("artifex.linear_gelu" in t for t in seen)


def test_decide_and_bad_input():
    assert lg.decide("cpu", torch.bfloat16).path == "torch" and "CUDA" in lg.decide("cpu", torch.bfloat16).reason
    x, w, b = _args()
    with pytest.raises(ValueError, match="unknown path 'x'; paths: cublaslt, torch"):
        lg.linear_gelu(x, w, b, "x")
    with pytest.raises(ValueError, match="one dtype"):
        lg.linear_gelu(x, w.double(), b, "cublaslt")
