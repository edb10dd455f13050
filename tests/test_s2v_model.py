"""S2V-14B's transformer against DiffSynth-Studio's independent port, on a tiny config in fp32."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from artifex.errors import CheckpointError, InvalidRequestError
from artifex.models.s2v import (
    WanS2VTransformer3DModel,
    config_from_official,
    convert_s2v_state_dict,
    tiny_s2v_config,
)
from tests.diffsynth_ref import reference

F_LAT, H_LAT, W_LAT = 3, 8, 8


def _reference_model(cfg: dict, seed: int = 0):
    """DiffSynth's WanS2VModel of the tiny config, every parameter random (the zero-initialised ones too)."""
    mod = reference("models.wan_video_dit_s2v")
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    ref = mod.WanS2VModel(dim=dim, in_dim=cfg["in_channels"], ffn_dim=cfg["ffn_dim"], out_dim=cfg["out_channels"],
                          text_dim=cfg["text_dim"], freq_dim=cfg["freq_dim"], eps=1e-6, patch_size=(1, 2, 2),
                          num_heads=cfg["num_attention_heads"], num_layers=cfg["num_layers"],
                          cond_dim=cfg["pose_channels"], audio_dim=cfg["audio_dim"],
                          num_audio_token=cfg["num_audio_tokens"], audio_inject_layers=list(cfg["audio_inject_layers"]))
    # DiffSynth fixes the wav2vec2 layer count at 25; the tiny audio model has fewer hidden states.
    ref.casual_audio_encoder.weights = torch.nn.Parameter(torch.zeros(1, cfg["audio_layers"], 1, 1))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(noise * (0.5 / math.sqrt(p[0].numel() if p.ndim > 1 else p.shape[0])))
    return ref.eval()


def _inputs(cfg: dict, seed: int = 1, pose: bool = False, motion: bool = True):
    g = torch.Generator().manual_seed(seed)
    c = cfg["in_channels"]
    out = dict(
        hidden_states=torch.randn(1, c, F_LAT, H_LAT, W_LAT, generator=g),
        timestep=torch.tensor([637.0]),
        encoder_hidden_states=torch.randn(1, 7, cfg["text_dim"], generator=g),
        audio_features=torch.randn(1, cfg["audio_layers"], cfg["audio_dim"], 4 * F_LAT, generator=g),
        ref_latents=torch.randn(1, c, 1, H_LAT, W_LAT, generator=g),
        motion_latents=torch.randn(1, c, 19, H_LAT, W_LAT, generator=g) if motion else None,
        pose_latents=torch.randn(1, cfg["pose_channels"], F_LAT, H_LAT, W_LAT, generator=g) if pose else None,
    )
    return out


def _run_reference(ref, x: dict) -> torch.Tensor:
    """DiffSynth's forward; it always drops the motion tokens (the official first clip), so for a later clip
    (motion given) its ``inject_motion`` is called with ``drop_motion_frames=False``, as the official sampler
    does for every clip after the first."""
    latents = torch.cat([x["ref_latents"], x["hidden_states"]], dim=2)
    motion = x["motion_latents"]
    if motion is None:
        motion = torch.zeros_like(x["hidden_states"][:, :, :1].expand(-1, -1, 19, -1, -1))
    inject = type(ref).inject_motion
    ref.inject_motion = functools.partial(inject, ref, drop_motion_frames=x["motion_latents"] is None)
    try:
        out = ref(latents, x["timestep"], x["encoder_hidden_states"], x["audio_features"], list(motion),
                  x["pose_latents"])
    finally:
        del ref.inject_motion
    return out[:, :, 1:]


@pytest.fixture(scope="module")
def pair():
    cfg = tiny_s2v_config()
    ref = _reference_model(cfg)
    model = WanS2VTransformer3DModel(**cfg)
    model.load_state_dict(convert_s2v_state_dict(ref.state_dict(), dict(model.config)), strict=True)
    return cfg, ref, model.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(("pose", "motion"), [(False, True), (True, True), (False, False)],
                         ids=["later-clip", "later-clip-pose", "first-clip"])
def test_forward_matches_diffsynth(pair, pose, motion):
    cfg, ref, model = pair
    x = _inputs(cfg, pose=pose, motion=motion)
    with torch.no_grad():
        want = _run_reference(ref, x)
        got = model(**x)
    assert got.shape == x["hidden_states"].shape
    assert want.abs().mean() > 0.1  # a live output, not a zero or a copy of the input
    assert _rel(got, want) < 1e-4, _rel(got, want)


def test_unconditional_audio_matches_and_audio_matters(pair):
    """CFG's unconditional pass zeroes the audio: it matches too, and differs from the conditioned output."""
    cfg, ref, model = pair
    x = _inputs(cfg)
    x0 = dict(x, audio_features=torch.zeros_like(x["audio_features"]))
    with torch.no_grad():
        got0, want0 = model(**x0), _run_reference(ref, x0)
        got = model(**x)
    assert _rel(got0, want0) < 1e-4
    assert _rel(got, got0) > 1e-2  # the injectors are live: audio changes the prediction


def test_motion_and_reference_change_the_output(pair):
    cfg, _, model = pair
    x = _inputs(cfg)
    with torch.no_grad():
        base = model(**x)
        moved = model(**dict(x, motion_latents=x["motion_latents"].flip(2)))
        reref = model(**dict(x, ref_latents=-x["ref_latents"]))
    assert _rel(moved, base) > 1e-3 and _rel(reref, base) > 1e-3


def test_short_motion_history_is_zero_padded(pair):
    """Fewer than 19 motion latents are padded at the front with zeros, as the official FramePack does."""
    cfg, _, model = pair
    x = _inputs(cfg)
    short = x["motion_latents"][:, :, -5:]
    padded = torch.cat([torch.zeros_like(x["motion_latents"][:, :, :14]), short], dim=2)
    with torch.no_grad():
        torch.testing.assert_close(model(**dict(x, motion_latents=short)), model(**dict(x, motion_latents=padded)))


def test_save_and_load_round_trip(pair, tmp_path):
    cfg, _, model = pair
    model.save_pretrained(tmp_path / "s2v")
    back = WanS2VTransformer3DModel.from_pretrained(tmp_path / "s2v").eval()
    x = _inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(back(**x), model(**x))


def test_attention_processors_reach_blocks_and_injectors(pair):
    _, _, model = pair
    procs = model.attn_processors
    n = model.config.num_layers
    assert len(procs) == 2 * n + len(model.config.audio_inject_layers)
    assert any(k.startswith("audio_injectors.") for k in procs)


def test_converter_names_missing_and_leftover_keys(pair):
    cfg, ref, model = pair
    sd = ref.state_dict()
    broken = {k: v for k, v in sd.items() if k != "blocks.1.self_attn.q.weight"}
    with pytest.raises(CheckpointError, match=r"missing 1: blocks\.1\.attn1\.to_q\.weight"):
        convert_s2v_state_dict(broken, dict(model.config))
    with pytest.raises(CheckpointError, match="no place in the model: blocks.0.extra"):
        convert_s2v_state_dict({**sd, "blocks.0.extra": torch.zeros(1)}, dict(model.config))
    wrong = dict(sd, **{"blocks.0.modulation": torch.zeros(1, 6, 3)})
    with pytest.raises(CheckpointError, match="shape mismatch: blocks.0.scale_shift_table"):
        convert_s2v_state_dict(wrong, dict(model.config))
    # The official files prefix nothing, but a "model." wrapper is accepted.
    assert set(convert_s2v_state_dict({f"model.{k}": v for k, v in sd.items()})) == set(model.state_dict())


def test_official_config():
    official = {"dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 40, "in_dim": 16, "out_dim": 16,
                "text_dim": 4096, "freq_dim": 256, "eps": 1e-6, "audio_dim": 1024, "num_audio_token": 4,
                "cond_dim": 16, "enable_adain": True, "framepack_drop_mode": "padd",
                "audio_inject_layers": [0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39]}
    cfg = config_from_official(official)
    assert cfg["attention_head_dim"] == 128 and cfg["num_layers"] == 40
    with torch.device("meta"):
        model = WanS2VTransformer3DModel(**cfg)
    assert len(model.audio_injectors) == 12
    with pytest.raises(CheckpointError, match="num_heads"):
        config_from_official({k: v for k, v in official.items() if k != "num_heads"})
    with pytest.raises(CheckpointError, match="framepack_drop_mode"):
        config_from_official(dict(official, framepack_drop_mode="drop"))


def test_artifex_attention_processor_gives_the_same_output(pair):
    """``artifex.attention.install`` (set_attn_processor on the model) reaches the blocks and audio injectors."""
    from artifex.attention.processor import AttentionRuntime, WanAttentionProcessor, install

    cfg, _, model = pair
    x = _inputs(cfg)
    twin = WanS2VTransformer3DModel(**cfg).eval()
    twin.load_state_dict(model.state_dict())
    install([twin], AttentionRuntime())
    assert all(isinstance(p, WanAttentionProcessor) for p in twin.attn_processors.values())
    with torch.no_grad():
        torch.testing.assert_close(twin(**x), model(**x), rtol=1e-5, atol=1e-5)


def test_inject_layers_must_be_increasing():
    with pytest.raises(InvalidRequestError, match="increasing"):
        WanS2VTransformer3DModel(**tiny_s2v_config(audio_inject_layers=(2, 0)))


def test_batch_of_two_equals_two_single_passes(pair):
    """CFG's two passes batched (audio zeroed in the second) give each pass's single-sample output."""
    cfg, _, model = pair
    x = _inputs(cfg)
    x0 = dict(x, audio_features=torch.zeros_like(x["audio_features"]), timestep=torch.tensor([200.0]))
    both = {k: torch.cat([x[k], x0[k]]) for k in x if x[k] is not None}
    with torch.no_grad():
        out = model(**both)
        torch.testing.assert_close(out[:1], model(**x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1:], model(**x0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("pose", "motion", "batch"), [(False, True, 1), (True, True, 2), (False, False, 1)],
                         ids=["later-clip", "later-clip-pose-batch2", "first-clip"])
def test_artifex_forward_matches_the_model_and_shares_the_first_block(pair, pose, motion, batch):
    """``engine.dit``'s blocks on the S2V sequence (``engine.dit_s2v``: two modulation rows per sample, audio
    between blocks, the head on the noisy tokens) give the model's own output; CFG's two passes under
    ``share_first_block`` (text and audio differ) give what two plain passes give."""
    import copy

    from artifex.attention.processor import AttentionRuntime, install
    from artifex.engine.dit import accelerate_model, restore_model, share_first_block

    cfg, _, model = pair
    fast = copy.deepcopy(model)
    install([fast], AttentionRuntime())
    accelerate_model(fast)
    x = _inputs(cfg, pose=pose, motion=motion)
    if batch == 2:
        x = {k: None if v is None else torch.cat([v, v.flip(0) if k == "timestep" else -v]) for k, v in x.items()}
    silent = dict(x, audio_features=torch.zeros_like(x["audio_features"]),
                  encoder_hidden_states=x["encoder_hidden_states"].flip(1))
    with torch.no_grad():
        want, want0 = model(**x), model(**silent)
        torch.testing.assert_close(fast(**x), want, rtol=1e-5, atol=1e-5)
        with share_first_block(fast):
            got = fast(**x)
            got0 = fast(**dict(silent, hidden_states=x["hidden_states"], timestep=x["timestep"]))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got0, want0, rtol=1e-5, atol=1e-5)
        restore_model(fast)
        torch.testing.assert_close(fast(**x), want, rtol=1e-5, atol=1e-5)
