"""The VAE's fused RMS norm + SiLU and the accelerated VAE pieces, against diffusers' own modules.

The Triton kernel runs under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) in a subprocess, when Triton
is installed; scripts/check_kernels.py (section vae) checks it on a GPU at the TI2V-5B 720p decoder's shapes.
"""

from __future__ import annotations

import pytest
import torch
from kernel_support import needs_triton, run_interpreted

from artifex.engine.vae import RmsSilu, accelerate_vae, decode_stream
from artifex.kernels import rms_silu as rs
from artifex.models.registry import get_model


def _norm(channels: int, bias: bool, dtype=torch.float32):
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    torch.manual_seed(0)
    norm = WanRMS_norm(channels, images=False, bias=bias)
    with torch.no_grad():
        norm.gamma.add_(torch.randn_like(norm.gamma) * 0.3)
        if bias:
            norm.bias.add_(torch.randn_like(norm.bias) * 0.2)
    return norm.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_twin_is_diffusers_norm_then_silu(dtype, bias):
    norm = _norm(12, bias, dtype)
    x = (torch.randn(2, 12, 3, 5, 7) * 4).to(dtype)
    with torch.no_grad():
        want = torch.nn.functional.silu(norm(x))
        assert torch.equal(rs.rms_silu(x, norm.gamma, norm.bias, norm.scale, path="torch"), want)
        assert torch.equal(rs.rms_silu(x, norm.gamma, norm.bias, norm.scale, silu=False, path="torch"), norm(x))
        assert torch.equal(RmsSilu(norm, torch.nn.SiLU())(x), want)  # on CPU the module takes the twin


def test_bad_arguments_are_named():
    x = torch.randn(1, 4, 2, 3, 3)
    with pytest.raises(ValueError, match="unknown path 'cuda'; paths: triton, torch"):
        rs.rms_silu(x, torch.ones(4, 1, 1, 1), 0.0, 2.0, path="cuda")
    with pytest.raises(ValueError, match=r"C = gamma's 5 channels; got x of shape \(1, 4, 2, 3, 3\)"):
        rs.rms_silu(x, torch.ones(5, 1, 1, 1), 0.0, 2.0)
    assert rs.decide("cpu", torch.bfloat16).path == "torch"


@needs_triton
def test_triton_kernel_matches_the_twin_under_the_interpreter():
    out = run_interpreted('''
import json, torch
from artifex.kernels import rms_silu as rs
torch.manual_seed(0)
res = {}
for dtype in (torch.float32,):
    for c, shape, layout, bias, silu in [(12, (2, 3, 5, 7), "contiguous", False, True),
                                         (40, (1, 4, 9, 6), "channels_last", True, True),
                                         (130, (1, 2, 3, 3), "contiguous", True, False),  # > one channel block
                                         (8, (2, 1, 1, 1), "strided", False, True)]:
        x = (torch.randn(shape[0], c, *shape[1:]) * 3).to(dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        elif layout == "strided":
            x = torch.randn(shape[0], c, 4, 6, 4).to(dtype)[:, :, :, ::2]  # spatial dims that do not flatten
        g = (1 + 0.3 * torch.randn(c, 1, 1, 1)).to(dtype)
        b = (0.2 * torch.randn(c, 1, 1, 1)).to(dtype) if bias else 0.0
        want = rs.rms_silu(x, g, b, c ** 0.5, silu=silu, path="torch")
        got = rs.rms_silu(x, g, b, c ** 0.5, silu=silu, path="triton")
        ulp = torch.finfo(dtype).eps * (want.abs() + 1)  # absolute near 0, where h + bias cancels
        res[f"{dtype}-{c}-{layout}"] = dict(
            shape_ok=got.shape == want.shape and got.dtype == want.dtype,
            layout_kept=got.stride() == x.stride() if layout == "channels_last" else True,
            within_ulp=bool(((got.float() - want.float()).abs() <= 4 * ulp.float()).all()),
            equal_frac=(got == want).float().mean().item())
print("RESULT " + json.dumps(res))
''')
    assert len(out) == 4  # fp32 only: the interpreter truncates fp32 -> bf16 where the GPU rounds to nearest, so
    # the bf16 rounding steps are checked on the GPU (scripts/check_kernels.py --only vae)
    for case, r in out.items():
        assert r["shape_ok"] and r["layout_kept"], case
        assert r["within_ulp"], case  # a few fp32 roundings apart (sum order, exp) at most
        assert r["equal_frac"] > 0.5, (case, r)  # most values bit-equal; the rest in their last bits


@pytest.mark.parametrize("model", ["tiny-ti2v", "tiny-t2v-moe"])  # the Wan2.2 VAE (patchified) and the Wan2.1 VAE
def test_accelerated_vae_decodes_and_encodes_what_diffusers_does(model):
    from diffusers import AutoencoderKLWan
    from diffusers.models.autoencoders import autoencoder_kl_wan as wan

    from artifex.models.configs import vae_kwargs

    spec = get_model(model)
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**vae_kwargs(spec)).eval()
    with torch.no_grad():  # norms away from their identity start, so a skipped gamma would show
        for m in vae.modules():
            if isinstance(m, wan.WanRMS_norm):
                m.gamma.mul_(1 + 0.3 * torch.randn_like(m.gamma))
    keys = list(vae.state_dict())
    _, t, h, w = spec.latent_shape(64, 48, 9)
    z = torch.randn(1, spec.vae.z_dim, t, h, w)
    video = torch.rand(1, 3, 9, 48, 64) * 2 - 1
    with torch.no_grad():
        want = torch.cat(list(decode_stream(vae, z)), dim=2)
        want_enc = vae.encode(video).latent_dist.mode()
        swapped = accelerate_vae(vae)
        assert accelerate_vae(vae) == 0  # idempotent
        fused = [m for m in vae.modules() if isinstance(m, RmsSilu)]
        resblocks = [m for m in vae.modules() if isinstance(m, wan.WanResidualBlock)]
        assert len(fused) == 2 * len(resblocks) + 2  # every residual block's two, the encoder's and decoder's heads
        assert all(isinstance(m.nonlinearity, torch.nn.Identity) for m in resblocks)
        assert list(vae.state_dict()) == keys  # checkpoints load into an accelerated VAE
        got = torch.cat(list(decode_stream(vae, z)), dim=2)
        got_enc = vae.encode(video).latent_dist.mode()
        assert accelerate_vae(vae, on=False) == swapped
        assert not any(isinstance(m, RmsSilu) for m in vae.modules())
        again = torch.cat(list(decode_stream(vae, z)), dim=2)
    # fp32 on CPU: the twin is diffusers' expression; only the padded-by-cuDNN/oneDNN convolution sums differ
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert ((got_enc - want_enc).norm() / want_enc.norm()).item() < 1e-5
    assert torch.equal(again, want)  # restored: diffusers' own modules, bit for bit


def test_engine_plans_fast_vae_and_turns_it_off(engine):
    on = engine("tiny-ti2v")
    assert on.plan.fast_vae and any(isinstance(m, RmsSilu) for m in on.c.vae.modules())
    off = engine("tiny-ti2v", fast_vae=False)
    assert not off.plan.fast_vae and not any(isinstance(m, RmsSilu) for m in off.c.vae.modules())


def test_a_split_decode_gives_the_accelerated_forwards_back():
    """``distributed.vae_split.banded`` swaps the row-reading convolutions' forwards for the length of a decode;
    afterwards each has the forward it had before (here: Artifex's), not diffusers' default."""
    from diffusers import AutoencoderKLWan
    from diffusers.models.autoencoders import autoencoder_kl_wan as wan

    from artifex.distributed.vae_split import banded
    from artifex.models.configs import vae_kwargs

    vae = AutoencoderKLWan(**vae_kwargs(get_model("tiny-ti2v"))).eval()
    accelerate_vae(vae)
    convs = [m for m in vae.decoder.modules() if isinstance(m, wan.WanCausalConv3d)]
    before = {id(m): m.__dict__["forward"] for m in convs}
    with banded(vae.decoder, bands=None):  # the bands are only read while decoding
        assert any(m.__dict__["forward"] is not before[id(m)] for m in convs)
    assert all(m.__dict__["forward"] is before[id(m)] for m in convs)
    accelerate_vae(vae, on=False)
    with banded(vae.decoder, bands=None):
        pass
    assert not any("forward" in m.__dict__ for m in convs)  # diffusers' own again


def test_forwards_set_by_others_are_left_alone():
    from diffusers import AutoencoderKLWan
    from diffusers.models.autoencoders import autoencoder_kl_wan as wan

    from artifex.models.configs import vae_kwargs

    vae = AutoencoderKLWan(**vae_kwargs(get_model("tiny-ti2v"))).eval()
    conv = next(m for m in vae.decoder.modules() if isinstance(m, wan.WanCausalConv3d))
    hook = conv.forward  # stands in for an offload hook's wrapper, set on the instance
    conv.forward = hook
    accelerate_vae(vae)
    assert conv.__dict__["forward"] is hook
    accelerate_vae(vae, on=False)
    assert conv.__dict__["forward"] is hook
