"""Artifex's DiT forward against diffusers' WanTransformer3DModel forward (the plain path), on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import WanTransformer3DModel

from artifex.attention import install
from artifex.attention.processor import AttentionRuntime
from artifex.engine.dit import accelerate_model, clear_caches, modulation, restore_model, share_first_block


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _tiny(**extra) -> WanTransformer3DModel:
    torch.manual_seed(0)
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
               text_dim=32, freq_dim=16, ffn_dim=64, num_layers=3, rope_max_seq_len=64)
    cfg.update(extra)
    model = WanTransformer3DModel(**cfg).eval()
    with torch.no_grad():  # diffusers zero-initialises some tables; random values exercise every term
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _pair(**extra):
    plain = _tiny(**extra)
    fast = copy.deepcopy(plain)
    install([fast], AttentionRuntime(chain="sdpa-math"))
    accelerate_model(fast)
    return plain, fast


def _inputs(model, batch=2, frames=3, h=8, w=10, image_tokens=0):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, model.config.in_channels, frames, h, w, generator=g)
    text = torch.randn(batch, 512, model.config.text_dim, generator=g)
    image = torch.randn(batch, image_tokens, model.config.image_dim, generator=g) if image_tokens else None
    return x, text, image


@pytest.mark.parametrize("per_token", [False, True])
def test_fast_forward_matches_diffusers(per_token):
    """One timestep per sample (T2V, A14B) and TI2V's per-token timesteps (0 on the image-given frame)."""
    plain, fast = _pair()
    x, text, _ = _inputs(plain)
    tokens = 3 * 4 * 5
    if per_token:
        t = torch.full((2, tokens), 700.0)
        t[:, :20] = 0.0  # the first latent frame holds the given image
    else:
        t = torch.tensor([700.0, 300.0])
    with torch.no_grad():
        ref = plain(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        out = fast(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert out.shape == ref.shape
    assert _rel(out, ref) < 1e-5


def test_image_context_branch_matches_diffusers():
    """Wan2.1-style I2V: image tokens ahead of the 512 text tokens, with their own keys and values."""
    plain, fast = _pair(image_dim=24, added_kv_proj_dim=24)
    x, text, image = _inputs(plain, image_tokens=257)
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        ref = plain(hidden_states=x, timestep=t, encoder_hidden_states=text, encoder_hidden_states_image=image,
                    return_dict=False)[0]
        out = fast(hidden_states=x, timestep=t, encoder_hidden_states=text, encoder_hidden_states_image=image,
                   return_dict=False)[0]
    assert _rel(out, ref) < 1e-5


def test_modulation_embeds_each_distinct_timestep_once():
    model = _tiny()
    t = torch.full((2, 60), 700.0)
    t[:, :20] = 0.0
    mod = modulation(model, t, torch.zeros(1))
    assert mod.rows.shape == (2, 6, model.config.num_attention_heads * model.config.attention_head_dim)
    assert mod.index.shape == (2, 60) and set(mod.index.unique().tolist()) == {0, 1}
    assert mod.index[0, :20].eq(0).all() and mod.index[0, 20:].eq(1).all()  # rows sorted: 0 first, then 700


def test_text_kv_is_computed_once_per_context_tensor_two_kept_and_follows_a_new_one():
    plain, fast = _pair()
    x, text, _ = _inputs(plain)
    t = torch.tensor([700.0, 700.0])
    calls = []
    fast.blocks[0].attn2.to_k.register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    with torch.no_grad():
        first = fast(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        fast(hidden_states=x, timestep=t * 0.5, encoder_hidden_states=text, return_dict=False)
        assert len(calls) == 1  # the second step reused the block's text K/V
        other = text.flip(0)  # a new request: a new context tensor
        out = fast(hidden_states=x, timestep=t, encoder_hidden_states=other, return_dict=False)[0]
        ref = plain(hidden_states=x, timestep=t, encoder_hidden_states=other, return_dict=False)[0]
        assert len(calls) == 2 and _rel(out, ref) < 1e-5
        fast(hidden_states=x, timestep=t * 0.5, encoder_hidden_states=text, return_dict=False)
        assert len(calls) == 2  # two contexts are kept: CFG's passes alternate cond and uncond at every step
        fast(hidden_states=x, timestep=t, encoder_hidden_states=text.clone(), return_dict=False)
        fast(hidden_states=x, timestep=t, encoder_hidden_states=other, return_dict=False)
        assert len(calls) == 3  # a third context took the oldest one's place; the newer one is still kept
        fast(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)
        assert len(calls) == 4
        clear_caches(fast)
        again = fast(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert torch.equal(again, first)


def test_cfg_passes_share_the_first_blocks_self_attention_bit_for_bit():
    """Inside ``share_first_block`` the second pass on the same latents and timestep takes the first block's
    self-attention branch from the first pass; any other input (a changed tensor, another timestep tensor)
    computes its own. Outputs are the same tensors as without sharing."""
    plain, fast = _pair()
    x, text, _ = _inputs(plain)
    uncond = torch.randn_like(text)
    t = torch.tensor([700.0, 700.0])
    calls = []
    attention, rest = fast.blocks[0]._artifex_core
    fast.blocks[0]._artifex_core = (lambda *a: calls.append(1) or attention(*a), rest)
    state = fast._artifex_dit

    def cfg_step(x, t):
        return [fast(hidden_states=x, timestep=t, encoder_hidden_states=c, return_dict=False)[0]
                for c in (text, uncond)]

    with torch.no_grad():
        alone = cfg_step(x, t)
        assert len(calls) == 2
        with share_first_block(fast):
            shared = cfg_step(x, t)
            assert len(calls) == 3 and state.share.res is None  # taken by the second pass, not held past it
            moved = x + 0.25
            first = fast(hidden_states=moved, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
            moved.mul_(2.0)  # changed in place between the passes: the second computes its own
            second = fast(hidden_states=moved, timestep=t, encoder_hidden_states=uncond, return_dict=False)[0]
            fast(hidden_states=x, timestep=t.clone(), encoder_hidden_states=text, return_dict=False)
            assert len(calls) == 6
        assert not state.sharing and state.share is None
        fast(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)
        assert len(calls) == 7
        ref = plain(hidden_states=(x + 0.25) * 2.0, timestep=t, encoder_hidden_states=uncond, return_dict=False)[0]
        with share_first_block(plain):  # diffusers' forward: runs as it is
            plain_out = plain(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert all(torch.equal(a, b) for a, b in zip(shared, alone))
    assert _rel(first, plain(hidden_states=x + 0.25, timestep=t, encoder_hidden_states=text,
                             return_dict=False)[0]) < 1e-5
    assert _rel(second, ref) < 1e-5 and _rel(alone[0], plain_out) < 1e-5


def test_engine_cfg_sharing_leaves_the_video_unchanged(engine, tmp_path, monkeypatch):
    """CFG in two passes (the default) with and without the first block's shared self-attention: the same
    latents, bit for bit."""
    import contextlib

    from artifex.engine import pipeline
    from artifex.engine.request import GenerationRequest

    eng = engine("tiny-ti2v")
    assert eng.plan.cfg_batch == 1 and any("first block's self-attention" in r for r in eng.plan.reasons)

    def run():
        req = GenerationRequest(model="tiny-ti2v", prompt="a lighthouse in fog", seed=5, steps=3, frames=5,
                                output=str(tmp_path / "v.mp4"))
        return eng.generate(req).latents

    shared = run()
    monkeypatch.setattr(pipeline, "share_first_block", lambda model: contextlib.nullcontext())
    assert torch.equal(run(), shared)


def test_restore_gives_diffusers_forward_back():
    plain, fast = _pair()
    restore_model(fast)
    assert "forward" not in fast.__dict__ and all("forward" not in b.__dict__ for b in fast.blocks)
    x, text, _ = _inputs(plain)
    t = torch.tensor([100.0, 100.0])
    with torch.no_grad():
        a = fast(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        b = plain(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert _rel(a, b) < 1e-5


@pytest.mark.parametrize("model,fields,with_image", [
    ("tiny-ti2v", {}, True),                            # per-token timesteps through the engine
    ("tiny-ti2v", {"max_batch_size": 2}, False),        # batched CFG: one context tensor for cond + uncond
    ("tiny-t2v-moe", {"max_batch_size": 2}, False),     # both experts, each with its own text K/V
])
def test_engine_latents_match_diffusers_forward(engine, tmp_path, image_file, model, fields, with_image):
    from artifex.engine.request import GenerationRequest

    def run(**extra):
        eng = engine(model, precision="fp32", tf32=False, **fields, **extra)
        req = GenerationRequest(model=model, prompt="a lighthouse in fog", seed=3, steps=4, frames=9,
                                image=str(image_file) if with_image else None, output=str(tmp_path / "v.mp4"))
        return eng.generate(req).latents

    assert _rel(run(), run(fast_dit=False)) < 1e-5


def test_fp8_mode_is_refused_where_fp8_matmuls_cannot_run():
    from artifex.config import OptimizationConfig
    from artifex.engine.pipeline import Engine
    from artifex.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="fp8 compute cannot run here"):
        Engine.load("tiny-ti2v", config=OptimizationConfig(fp8="gemm", device="cpu"))
    with pytest.raises(InvalidRequestError, match="fp8=all uses fa3-fp8"):
        OptimizationConfig(fp8="all", attention="sdpa")


def test_fp8_quantization_of_experts_reports_its_error_against_bf16(tiny_checkpoint):
    """The probe's two forwards (bf16 weights, then e4m3) run for real; torch 2.13 runs row-wise
    ``torch._scaled_mm`` on CPU, so the quantized path itself is exercised here."""
    from artifex.engine.fp8 import quantize_experts
    from artifex.kernels.fp8 import Fp8Linear
    from artifex.models.loader import load_components
    from artifex.models.registry import get_model

    spec = get_model("tiny-t2v-moe")
    comps = load_components(spec, tiny_checkpoint("tiny-t2v-moe"), "bf16")
    try:
        report = quantize_experts(spec, comps.experts, torch.device("cpu"), torch.bfloat16)
    except RuntimeError as e:  # a torch build without CPU fp8 matmuls
        pytest.skip(f"torch._scaled_mm does not run on this CPU: {e}")
    assert [p["expert"] for p in report["probe"]] == [0, 1]
    assert all(0 < p["rel_l2_vs_bf16"] < 0.1 for p in report["probe"])
    for expert in comps.experts:
        assert isinstance(expert.blocks[0].ffn.net[2], Fp8Linear)
        assert isinstance(expert.blocks[0].attn1.to_q, Fp8Linear)
        assert not isinstance(expert.proj_out, Fp8Linear)  # the output head keeps bf16


# -- the fused QKV projection --------------------------------------------------------------
def _weight_bytes(model) -> tuple[int, int]:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() for t in tensors), sum(t.untyped_storage().nbytes() for t in
                                                {t.untyped_storage().data_ptr(): t for t in tensors}.values())


def test_fused_qkv_replaces_the_three_projections_without_more_weight_memory():
    plain, fast = _pair()
    assert _weight_bytes(fast) == _weight_bytes(plain)  # same count, and no storage held twice
    for p_block, f_block in zip(plain.blocks, fast.blocks):
        a, f = p_block.attn1, f_block.attn1
        assert f.fused_projections and not any(hasattr(f, n) for n in ("to_q", "to_k", "to_v"))
        assert torch.equal(f.to_qkv.weight, torch.cat([a.to_q.weight, a.to_k.weight, a.to_v.weight]))
        assert torch.equal(f.to_qkv.bias, torch.cat([a.to_q.bias, a.to_k.bias, a.to_v.bias]))
        assert not f_block.attn2.fused_projections and hasattr(f_block.attn2, "to_k")  # text K/V are cached instead
    accelerate_model(fast)  # idempotent
    assert _weight_bytes(fast) == _weight_bytes(plain)


def test_diffusers_fuse_projections_keeps_both_copies():
    """Why Artifex fuses on its own: diffusers' WanAttention.fuse_projections adds to_qkv beside to_q/to_k/to_v."""
    model = _tiny()
    before = _weight_bytes(model)[0]
    model.fuse_qkv_projections()
    attn = model.blocks[0].attn1
    assert hasattr(attn, "to_qkv") and hasattr(attn, "to_q")
    assert _weight_bytes(model)[0] > before


def test_restore_splits_qkv_back_into_diffusers_layers():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    plain, fast = _pair()
    restore_model(fast)
    for p_block, f_block in zip(plain.blocks, fast.blocks):
        a, f = p_block.attn1, f_block.attn1
        assert not f.fused_projections and not hasattr(f, "to_qkv")
        for n in ("to_q", "to_k", "to_v"):
            assert type(getattr(f, n)) is torch.nn.Linear
            assert torch.equal(getattr(f, n).weight, getattr(a, n).weight)
            assert torch.equal(getattr(f, n).bias, getattr(a, n).bias)
    assert _weight_bytes(fast) == _weight_bytes(plain)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    fast.set_attn_processor(WanAttnProcessor())  # diffusers' own processor on diffusers' own layers
    x, text, _ = _inputs(plain)
    t = torch.tensor([400.0, 400.0])
    with torch.no_grad():
        a = fast(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        b = plain(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert _rel(a, b) < 1e-5
    accelerate_model(fast)  # and Artifex's forward again, fused again
    assert fast.blocks[0].attn1.fused_projections


def test_restore_under_diffusers_hooks_keeps_qkv_fused_and_diffusers_forward_works():
    """Group offload holds the fused layer; diffusers' processor runs fused projections."""
    plain, fast = _pair()
    fast.enable_group_offload(onload_device=torch.device("cpu"), offload_type="leaf_level")
    restore_model(fast)
    assert all(b.attn1.fused_projections and hasattr(b.attn1, "to_qkv") for b in fast.blocks)
    x, text, _ = _inputs(plain)
    t = torch.tensor([400.0, 400.0])
    with torch.no_grad():
        a = fast(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        b = plain(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert _rel(a, b) < 1e-5


def test_fp8_fused_qkv_is_one_layer_with_the_separate_layers_scales():
    """Quantizing then fusing (the engine: fp8 at load, fusing at placement) and fusing then quantizing give the
    same single Fp8Linear: per-output-channel scales are row-wise, so the three layers' scales stack unchanged."""
    from artifex.kernels import fp8

    plain = _tiny(attention_head_dim=16)  # fp8 matmuls need dims that are multiples of 16
    quantized = copy.deepcopy(plain)
    fp8.quantize_linears(quantized.blocks, path="twin")
    fused_after = copy.deepcopy(quantized)
    install([fused_after], AttentionRuntime(chain="sdpa-math"))
    accelerate_model(fused_after)
    fused_before = copy.deepcopy(plain)
    install([fused_before], AttentionRuntime(chain="sdpa-math"))
    accelerate_model(fused_before)
    fp8.quantize_linears(fused_before.blocks, path="twin")
    assert _weight_bytes(fused_after) == _weight_bytes(quantized) == _weight_bytes(fused_before)
    for q_block, a_block, b_block in zip(quantized.blocks, fused_after.blocks, fused_before.blocks):
        q, a, b = q_block.attn1, a_block.attn1.to_qkv, b_block.attn1.to_qkv
        assert isinstance(a, fp8.Fp8Linear) and isinstance(b, fp8.Fp8Linear) and a.out_features == 3 * q.inner_dim
        for name in ("weight_fp8", "weight_scale", "bias"):
            stacked = torch.cat([getattr(getattr(q, n), name) for n in ("to_q", "to_k", "to_v")])
            assert torch.equal(getattr(a, name).float(), stacked.float())
            assert torch.equal(getattr(b, name).float(), stacked.float())
    x, text, _ = _inputs(plain)
    t = torch.tensor([700.0, 300.0])
    with torch.no_grad():
        ref = plain(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        unfused = quantized(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        out_a = fused_after(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        out_b = fused_before(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert _rel(out_a, unfused) < 1e-5 and _rel(out_b, unfused) < 1e-5  # the same fp8 model, one GEMM for q/k/v
    assert _rel(out_a, ref) < 0.05  # test_kernels_fp8's tolerance for a tiny Wan with fp8 linears
    restore_model(fused_after)
    assert all(isinstance(getattr(b.attn1, n), fp8.Fp8Linear) for b in fused_after.blocks for n in ("to_q", "to_v"))
    with torch.no_grad():
        back = fused_after(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert _rel(back, unfused) < 1e-5


def test_engine_runs_fused_qkv_after_loading_the_checkpoint(engine):
    eng = engine("tiny-t2v-moe", precision="fp32", tf32=False, max_batch_size=2)
    for expert in eng.c.experts:
        assert all(b.attn1.fused_projections and not hasattr(b.attn1, "to_q") for b in expert.blocks)


def test_ffn_epilogue_and_unfused_projections_match_diffusers(monkeypatch):
    """The feed-forward through ``linear_gelu``'s op (the twin on CPU, as CUDA would route it) and the ablation
    switches of ``accelerate_model`` give diffusers' output."""
    import artifex.engine.dit as dit

    plain, fast = _pair()
    assert all(b._artifex_ffn for b in fast.blocks)  # Wan's FeedForward is recognised
    x, text, _ = _inputs(plain)
    t = torch.tensor([600.0, 600.0])
    assert dit._ffn_path(fast.blocks[0], x) == "module"  # CPU: the module's own forward
    routed = []
    monkeypatch.setattr(dit, "_ffn_path", lambda block, x: routed.append(1) or "cublaslt")
    with torch.no_grad():
        ref = plain(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        out = fast(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        assert len(routed) == 3 and _rel(out, ref) < 1e-5
        monkeypatch.undo()  # the ablation below runs the real routing
        accelerate_model(fast, fuse_projections=False, ffn_epilogue=False)
        assert not any(b.attn1.fused_projections or b._artifex_ffn for b in fast.blocks)
        assert all(hasattr(b.attn1, "to_q") for b in fast.blocks)
        out = fast(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert _rel(out, ref) < 1e-5


def test_fp8_blocks_route_gelu_and_attention_outputs_through_the_one_pass_quantization(monkeypatch):
    """fp8 layers: the feed-forward's GELU moves into the down-projection's row quantization and the attention
    outputs are quantized in one pass (``quantize_rows_fused``; its twin on CPU, as CUDA routes it); the output
    stays the module path's, up to where GELU is rounded (fp32 here, bf16 in the module path)."""
    import artifex.engine.dit as dit
    from artifex.kernels import fp8

    why = fp8._probe_scaled_mm(torch.device("cpu"))
    if why:
        pytest.skip(f"torch {torch.__version__} cannot run fp8 torch._scaled_mm on a CPU: {why}")
    _, fast = _pair(attention_head_dim=16)  # fp8 matmuls need widths that are multiples of 16
    fast.to(torch.bfloat16)
    assert not fp8.quantize_linears(fast.blocks, path="scaled_mm").skipped
    x, text, _ = _inputs(fast)
    x, text, t = x.bfloat16(), text.bfloat16(), torch.tensor([600.0, 600.0])
    assert dit._ffn_path(fast.blocks[0], x) == "module" and dit._out_path(fast.blocks[0], x) == "module"  # CPU
    with torch.no_grad():
        ref = fast(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        calls = []
        real = dit.quantize_rows_fused
        monkeypatch.setattr(dit, "quantize_rows_fused", lambda *a, **k: calls.append(k.get("gelu", False)) or real(*a, **k))
        monkeypatch.setattr(dit, "_ffn_path", lambda block, x: "fp8_gelu")
        monkeypatch.setattr(dit, "_out_path", lambda block, x: "fp8_rows")
        out = fast(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert calls.count(True) == 3 and calls.count(False) == 6  # per block: the GELU rows, both attention outputs
    assert _rel(out, ref) < 2e-2


def test_fp8_norms_quantize_once_for_every_layer_that_reads_them(monkeypatch):
    """``norm_path`` "triton_fp8": each adaptive norm hands its readers (q/k/v, the cross-attention's q, the
    up-projection) e4m3 rows it quantized itself (the twin stands in for the kernel on CPU); the output stays
    the module path's."""
    import artifex.engine.dit as dit
    from artifex.kernels import Decision, fp8

    why = fp8._probe_scaled_mm(torch.device("cpu"))
    if why:
        pytest.skip(f"torch {torch.__version__} cannot run fp8 torch._scaled_mm on a CPU: {why}")
    _, fast = _pair(attention_head_dim=16)
    fast.to(torch.bfloat16)
    assert not fp8.quantize_linears(fast.blocks, path="scaled_mm").skipped
    x, text, _ = _inputs(fast)
    x, text, t = x.bfloat16(), text.bfloat16(), torch.tensor([600.0, 600.0])
    block, tokens = fast.blocks[0], torch.zeros(1, 4, 32, dtype=torch.bfloat16)
    assert dit._norm_path(block, tokens, "fp8_gelu") == "torch"  # CPU: no Triton kernel
    monkeypatch.setattr(dit, "ada_decide", lambda device, dtype: Decision("triton", "forced"))
    assert dit._norm_path(block, tokens, "fp8_gelu") == "triton_fp8"
    assert dit._norm_path(block, tokens, "module") == "triton"  # the feed-forward reads bf16
    handle = block.norm2.register_forward_pre_hook(lambda m, a: None)
    assert dit._norm_path(block, tokens, "fp8_gelu") == "torch"  # hooks on a norm: its module runs
    handle.remove()
    norm2, block.norm2 = block.norm2, torch.nn.Identity()  # cross_attn_norm=False: no norm for the kernel to run
    assert dit._norm_path(block, tokens, "fp8_gelu") == "torch"
    block.norm2 = norm2
    monkeypatch.undo()
    with torch.no_grad():
        ref = fast(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        quantized = []
        real = dit.ada_norm
        monkeypatch.setattr(dit, "ada_norm", lambda *a, **k: quantized.append(k.get("quantize")) or real(*a, **{
            **k, "path": "torch"}))
        monkeypatch.setattr(dit, "_ffn_path", lambda block, x: "fp8_gelu")
        monkeypatch.setattr(dit, "_norm_path", lambda block, x, ffn_path: "triton_fp8")
        out = fast(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert quantized == [True] * 3 * len(fast.blocks)  # (the output norm runs its module here: CPU)
    assert _rel(out, ref) < 2e-2


def test_fp8_attention_takes_q_and_k_in_e4m3_from_the_qk_kernel_and_falls_back_when_it_fails(monkeypatch):
    """With fa3-fp8 leading the chain, the QK-norm/RoPE step writes q and k in e4m3 at static per-head scales and
    the attention op takes them as they are (FA3's part is a CPU stand-in here: v quantized per head, SDPA on
    the dequantized values). When the kernel fails, q and k are dequantized and the rest of the chain runs;
    later forwards take the bf16 path."""
    from artifex.attention import backends
    from artifex.attention.ops import reset_runtime_failures, runtime_failures
    from artifex.kernels.fp8_attention import dequantize_heads, fp8_attention_twin

    plain, fast = _pair()
    x, text, _ = _inputs(plain)
    t = torch.tensor([700.0, 700.0])
    kw = dict(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)
    seen = []

    def stand_in(q8, dq, k8, dk, v, scale, causal):
        seen.append((q8.dtype, k8.dtype, tuple(dq.shape)))
        q, k = dequantize_heads(q8, dq, v.dtype), dequantize_heads(k8, dk, v.dtype)
        return fp8_attention_twin(q, k, v, scale, causal)  # re-quantizing q, k at their own amax: still e4m3

    runtime = fast.blocks[0].attn1.processor.runtime
    runtime.chain = "fa3-fp8,sdpa-math"
    reset_runtime_failures()
    try:
        with torch.no_grad():
            ref = plain(**kw)[0]
            monkeypatch.setattr(backends, "_fa3_fp8_qk8", stand_in)
            out = fast(**kw)[0]
            assert seen == [(torch.float8_e4m3fn, torch.float8_e4m3fn, (2, 2))] * len(fast.blocks)
            assert 1e-4 < _rel(out, ref) < 5e-2  # e4m3 q, k and v
            monkeypatch.undo()  # the real FA3 cannot run on a CPU: fall back, then stay on the bf16 path
            fallback = fast(**kw)[0]
            assert "fa3-fp8" in runtime_failures() and not runtime.quantizes_qk
            assert _rel(fallback, ref) < 5e-2  # q, k through e4m3 and back, SDPA in fp32
            assert _rel(fast(**kw)[0], ref) < 1e-4  # no quantization left
    finally:
        reset_runtime_failures()
