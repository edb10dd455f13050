"""Model facts, presets and the validated OptimizationConfig."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from artifex.config import OptimizationConfig
from artifex.errors import InvalidRequestError
from artifex.models.registry import MODELS, get_model
from artifex.presets import PRESETS, get_preset, pick_size


def test_token_counts_and_flops_match_design_facts():
    ti2v, t2v = get_model("ti2v-5b"), get_model("t2v-a14b")
    assert ti2v.tokens(1280, 704, 121) == 27_280
    assert t2v.tokens(1280, 720, 81) == 75_600
    assert t2v.tokens(832, 480, 81) == 32_760
    assert ti2v.flops_per_forward(1280, 704, 121) == pytest.approx(0.51e15, rel=0.02)
    assert t2v.flops_per_forward(1280, 720, 81) == pytest.approx(6.5e15, rel=0.02)


def test_registry_holds_the_official_defaults():
    t2v = get_model("t2v-a14b")
    assert (t2v.steps, t2v.shift, t2v.guidance, t2v.boundary, t2v.fps, t2v.frames) == (40, 12.0, (4.0, 3.0), 0.875, 16, 81)
    i2v = get_model("I2V-A14B")
    assert (i2v.transformer.in_channels, i2v.boundary, i2v.guidance, i2v.image) == (36, 0.9, (3.5, 3.5), "required")
    ti2v = get_model("ti2v-5b")
    assert (ti2v.spatial_multiple, ti2v.vae.z_dim, ti2v.fps, ti2v.hub_id) == (
        32, 48, 24, "Wan-AI/Wan2.2-TI2V-5B-Diffusers")
    s2v = get_model("s2v-14b")
    assert (s2v.spatial_multiple, s2v.clip_frames, s2v.motion_frames, s2v.steps, s2v.shift, s2v.guidance) == (
        64, 80, 73, 40, 3.0, (4.5,))
    assert (s2v.clip_latent_frames, s2v.motion_latent_frames, s2v.clip_video_frames(3)) == (20, 19, 237)
    # 1024x704: 20 noisy latent frames of 44x64 tokens, the reference's frame, FramePack's 2816 + 704 + 4 x 176
    assert s2v.tokens(1024, 704, 77) == 20 * 2816 + 2816 + 2816 + 704 + 704 == 63360
    for spec in MODELS.values():
        assert spec.transformer.head_dim * spec.transformer.heads == spec.transformer.dim
        for w, h in spec.sizes:
            assert w % spec.spatial_multiple == 0 and h % spec.spatial_multiple == 0, (spec.name, w, h)
        assert (spec.frames - 1) % 4 == 0
        if not spec.tiny:
            assert spec.transformer.head_dim == 128


def test_unknown_model_and_preset_list_the_allowed_names():
    with pytest.raises(InvalidRequestError, match=r"model: unknown model 'wan3'.*t2v-a14b"):
        get_model("wan3")
    with pytest.raises(InvalidRequestError, match=r"preset: unknown preset 'ultra'.*draft, preview, production, cinema"):
        get_preset("ultra")


def test_presets_map_onto_each_models_trained_sizes():
    t2v = get_model("t2v-a14b")
    assert pick_size(t2v, "smallest") == (832, 480)
    assert pick_size(t2v, "largest") == (1280, 720)
    assert pick_size(t2v, "largest", aspect=0.6) == (720, 1280)
    assert pick_size(get_model("ti2v-5b"), "smallest") == (1280, 704)  # TI2V has one trained size per orientation
    draft = PRESETS["draft"]
    assert draft.steps(t2v) == 12 and draft.num_frames(t2v) == 29 and (draft.num_frames(t2v) - 1) % 4 == 0
    assert PRESETS["cinema"].steps(t2v) == 50
    assert PRESETS["production"].steps(get_model("ti2v-5b")) == 50


def test_config_validates_every_field():
    with pytest.raises(InvalidRequestError, match=r"precision: unknown value 'fp8'.*bf16, fp16, fp32"):
        OptimizationConfig(precision="fp8")
    with pytest.raises(InvalidRequestError, match="max_batch_size: must be >= 1"):
        OptimizationConfig(max_batch_size=0)
    with pytest.raises(InvalidRequestError, match="use_torch_compile: must be true or false"):
        OptimizationConfig(use_torch_compile="yes")
    with pytest.raises(InvalidRequestError, match="device: unknown device 'gpu0'"):
        OptimizationConfig(device="gpu0")
    with pytest.raises(InvalidRequestError, match="flash_attention_dropout"):
        OptimizationConfig(flash_attention_dropout=1.5)
    with pytest.raises(InvalidRequestError, match="use_channels_last: must be true or false, got 'yes'"):
        OptimizationConfig(use_channels_last="yes")


def test_channels_last_is_off_unless_asked_for():
    """Off by default (two H200 runs showed no gain for the bf16 VAE); set, as set."""
    from artifex.engine.plan import make_plan
    from artifex.models.configs import meta_components

    spec = get_model("tiny-ti2v")
    text_encoder, vae, experts = meta_components(spec, "fp32")
    parts = SimpleNamespace(text_encoder=text_encoder, vae=vae, experts=experts)
    assert OptimizationConfig().use_channels_last is False
    assert not make_plan(spec, OptimizationConfig(device="cpu", vae_precision="bf16"), parts).channels_last
    assert make_plan(spec, OptimizationConfig(device="cpu", use_channels_last=True), parts).channels_last
    from artifex.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["generate", "--model", "tiny-ti2v", "--prompt", "x", "--no-use-channels-last"])
    assert args.opt_use_channels_last is False


def test_config_from_toml_merges_and_rejects_unknown_keys(tmp_path):
    f = tmp_path / "a.toml"
    f.write_text("[optimization]\nvae_tiling = true\nmax_batch_size = 2\nuse_fp16 = true\n")
    cfg = OptimizationConfig.from_toml(f)
    assert (cfg.vae_tiling, cfg.max_batch_size, cfg.precision) == (True, 2, "fp16")
    f.write_text("vae_tilling = true\n")
    with pytest.raises(InvalidRequestError, match=r"vae_tilling: unknown configuration field.*vae_tiling"):
        OptimizationConfig.from_toml(f)
    f.write_text("vae_tiling = \n")
    with pytest.raises(InvalidRequestError, match="not valid TOML"):
        OptimizationConfig.from_toml(f)
    with pytest.raises(InvalidRequestError, match="does not exist"):
        OptimizationConfig.from_toml(tmp_path / "missing.toml")


def test_config_round_trips_through_toml_and_hash_tracks_changes(tmp_path):
    cfg = OptimizationConfig(vae_slicing=True, experts="swap")
    f = tmp_path / "b.toml"
    f.write_text(cfg.to_toml())
    assert OptimizationConfig.from_toml(f) == cfg
    assert OptimizationConfig.from_toml(f).hash() == cfg.hash()
    assert cfg.merged({"vae_slicing": False}).hash() != cfg.hash()


def test_fields_that_change_the_output_or_do_nothing_are_warned():
    assert OptimizationConfig().check_supported() == []
    for field, value, text in [("gradient_checkpointing", True, "no effect at inference"),
                               ("flash_attention_causal", True, "bidirectional"),
                               ("flash_attention_scale", 0.1, "1/sqrt(head_dim)"),
                               ("flash_attention_dropout", 0.1, "random beyond the seed")]:
        warnings = OptimizationConfig(**{field: value}).check_supported()
        assert len(warnings) == 1 and text in warnings[0], field
    with pytest.raises(InvalidRequestError, match=r"attention: unknown value 'flash'.*auto, fa3"):
        OptimizationConfig(attention="flash")


def test_vae_precision_auto_is_bf16_on_cuda_and_fp32_on_cpu(capsys):
    """The default VAE precision follows the device; the plan says which runs and why; fp32 stays selectable."""
    from artifex.cli import main
    from artifex.config import resolve_vae_precision
    from artifex.engine.plan import make_plan
    from artifex.models.configs import meta_components

    assert OptimizationConfig().vae_precision == "auto"
    assert resolve_vae_precision("auto", "cuda")[0] == "bf16" and resolve_vae_precision("auto", "cpu")[0] == "fp32"
    assert resolve_vae_precision("fp32", "cuda") == ("fp32", None)
    with pytest.raises(InvalidRequestError, match="vae_precision"):
        OptimizationConfig(vae_precision="fp16")
    spec = get_model("tiny-ti2v")
    text_encoder, vae, experts = meta_components(spec, "fp32")
    parts = SimpleNamespace(text_encoder=text_encoder, vae=vae, experts=experts)
    plan = make_plan(spec, OptimizationConfig(device="cpu"), parts)
    assert plan.vae_precision == "fp32" and any("vae_precision auto: fp32" in r for r in plan.reasons)
    plan = make_plan(spec, OptimizationConfig(device="cpu", vae_precision="bf16"), parts)
    assert plan.vae_precision == "bf16" and not any("vae_precision auto" in r for r in plan.reasons)
    assert main(["plan", "--model", "ti2v-5b"]) == 0  # a plan of GPU memory: auto is what CUDA runs
    out = capsys.readouterr().out
    assert "VAE bf16" in out and "vae_precision auto: bf16 on CUDA" in out
    assert main(["plan", "--model", "ti2v-5b", "--vae-precision", "fp32"]) == 0
    assert "VAE fp32" in capsys.readouterr().out
