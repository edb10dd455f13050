"""The light decoder (decoder=light): TAEHV files by their published key names, its frames against the full VAE's,
its streaming, and its error figures in the sidecar. Tiny TAEHV-shaped decoders with random weights."""

from __future__ import annotations

import json
import math

import av
import pytest
import torch

from artifex.config import OptimizationConfig
from artifex.engine.decoders import CHUNK, full_decode, latents_kind
from artifex.engine.layout import EngineLayout
from artifex.engine.request import GenerationRequest
from artifex.errors import CheckpointError, InvalidRequestError
from artifex.models.taehv import TaehvDecoder, load_taehv

TINY_WIDTHS = (16, 8, 8, 8)


def random_taehv(z: int, patch: int, variant: str = "base", widths=TINY_WIDTHS, seed: int = 0) -> TaehvDecoder:
    """A TAEHV-shaped decoder with seeded random weights, scaled so its pixels are not all clamped."""
    model = TaehvDecoder(z, patch, variant, widths)
    g = torch.Generator().manual_seed(seed)
    gain = 1.0 if variant == "base" else 0.8
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * gain / p[0].numel() ** 0.5 if p.dim() > 1 else 0.0)
        model.decoder[-1].bias.fill_(0.5)  # pixels around mid-grey
    return model.eval().requires_grad_(False)


def save_published(model: TaehvDecoder, path, encoder_keys: bool = True):
    """Save as the published files are: the decoder's keys and (read past) some of an encoder's."""
    state = dict(model.state_dict())
    if encoder_keys:
        state["encoder.0.weight"] = torch.zeros(64, 3 * model.patch_size**2, 3, 3)
        state["encoder.2.conv.weight"] = torch.zeros(64, 128, 1, 1)
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def taehv_files(tmp_path_factory):
    """Tiny decoder files for each VAE kind: {"wan2.2": path, "wan2.1": path, "wan2.1-lighttae": path}."""
    d = tmp_path_factory.mktemp("taehv")
    return {"wan2.2": save_published(random_taehv(48, 2, seed=1), d / "taew2_2.pth"),
            "wan2.1": save_published(random_taehv(16, 1, seed=2), d / "taew2_1.safetensors"),
            "wan2.1-lighttae": save_published(random_taehv(16, 1, seed=2), d / "lighttaew2_1.pth")}


# -- the file format ---------------------------------------------------------------------------------
def test_the_decoder_has_the_published_key_names_and_shapes():
    """Names and shapes of madebyollin/taehv's TAEHV decoder (taew2_1: z16, patch 1; taew2_2: z48, patch 2;
    taew2_2_super), as its nn.Sequential indices make them."""
    with torch.device("meta"):
        base21, base22, super22 = TaehvDecoder(16, 1), TaehvDecoder(48, 2), TaehvDecoder(48, 2, "super")
    s = {k: tuple(v.shape) for k, v in base21.state_dict().items()}
    assert len(s) == 64
    assert s["decoder.1.weight"] == (256, 16, 3, 3) and s["decoder.1.bias"] == (256,)
    assert s["decoder.3.conv.0.weight"] == (256, 512, 3, 3) and s["decoder.5.conv.4.bias"] == (256,)
    assert s["decoder.7.conv.weight"] == (256, 256, 1, 1)  # the first time-grow: stride 1
    assert s["decoder.8.weight"] == (128, 256, 3, 3) and "decoder.8.bias" not in s
    assert s["decoder.13.conv.weight"] == (256, 128, 1, 1) and s["decoder.19.conv.weight"] == (128, 64, 1, 1)
    assert s["decoder.20.weight"] == (64, 64, 3, 3) and s["decoder.22.weight"] == (3, 64, 3, 3)
    assert not any(".skip." in k for k in s)  # equal widths: the skip is an identity
    assert tuple(base22.state_dict()["decoder.22.weight"].shape) == (12, 64, 3, 3)
    s = {k: tuple(v.shape) for k, v in super22.state_dict().items()}
    assert len(s) == 48
    assert s["decoder.0.weight"] == (512, 48, 1, 1) and s["decoder.1.conv.0.weight"] == (1024, 1, 7, 7)
    assert s["decoder.1.conv.1.weight"] == (2048, 1024, 1, 1) and s["decoder.3.conv.3.weight"] == (512, 2048, 1, 1)
    assert s["decoder.4.weight"] == (1024, 512, 3, 3) and s["decoder.7.conv.weight"] == (256, 256, 1, 1)
    assert s["decoder.14.conv.weight"] == (256, 128, 1, 1) and s["decoder.22.weight"] == (12, 64, 3, 3)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("variant", ["base", "super"])
def test_a_saved_decoder_loads_back_with_its_variant_and_widths(tmp_path, suffix, variant):
    model = random_taehv(48, 2, variant)
    loaded = load_taehv(save_published(model, tmp_path / f"taew2_2{suffix}"), 48, 2)
    assert loaded.variant == variant and loaded.widths == TINY_WIDTHS
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    z = torch.randn(1, 48, 3, 2, 3)
    assert torch.equal(loaded.decode(z), model.decode(z))


def test_a_time_grow_published_for_a_larger_stride_keeps_its_last_frames_channels(tmp_path):
    model = random_taehv(16, 1)
    state = dict(model.state_dict())
    wide = torch.randn(2 * TINY_WIDTHS[0], TINY_WIDTHS[0], 1, 1)
    state["decoder.7.conv.weight"] = wide
    path = tmp_path / "taew.pth"
    torch.save(state, path)
    assert torch.equal(load_taehv(path, 16, 1).state_dict()["decoder.7.conv.weight"], wide[TINY_WIDTHS[0]:])


def test_bad_files_are_refused_naming_the_keys(tmp_path):
    good = dict(random_taehv(16, 1).state_dict())

    def refused(state, *words, z=16, patch=1):
        path = tmp_path / "bad.pth"
        torch.save(state, path)
        with pytest.raises(CheckpointError) as e:
            load_taehv(path, z, patch)
        for w in words:
            assert w in str(e.value), str(e.value)

    refused({**good, "decoder.9.conv.2.weight": torch.zeros(8, 8, 1, 1)}, "decoder.9.conv.2.weight [8, 8, 1, 1]",
            "expected [8, 8, 3, 3]")
    refused({k: v for k, v in good.items() if k != "decoder.15.conv.0.bias"}, "missing decoder.15.conv.0.bias")
    refused({**good, "decoder.30.weight": torch.zeros(1)}, "unexpected decoder.30.weight")
    refused({**good, "model.diffusion.x": torch.zeros(1)}, "not TAEHV's", "model.diffusion.x")
    refused(good, "16-channel latents", "decoder.1.weight", "Wan2.2 VAE (taew2_2)", z=48, patch=2)  # wrong VAE
    refused({k: v for k, v in good.items() if k.startswith("encoder.")}, "no decoder.* keys")
    refused({"decoder.3.conv.0.weight": torch.zeros(1)}, "has no decoder.1.weight")
    wan22 = dict(random_taehv(48, 2).state_dict())
    refused(wan22, "48-channel latents", "Wan2.1 VAE (taew2_1)")
    with pytest.raises(CheckpointError, match="not found"):
        load_taehv(tmp_path / "absent.pth", 16, 1)
    (tmp_path / "junk.pth").write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match="not a readable TAEHV weight file"):
        load_taehv(tmp_path / "junk.pth", 16, 1)
    (tmp_path / "junk.safetensors").write_bytes(b"\x03\x00")
    with pytest.raises(CheckpointError, match="not a readable TAEHV weight file"):
        load_taehv(tmp_path / "junk.safetensors", 16, 1)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_taehv(tmp_path / "list.pth", 16, 1)


# -- frames ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["base", "super"])
def test_streamed_chunks_are_one_decode_and_causal(variant):
    """Chunks of latent frames concatenate to the decode of all at once; the frames of latent frame t (frame 0 for
    t = 0, then frames 4t-3 .. 4t, as the Wan VAE's) do not depend on later latent frames."""
    model = random_taehv(16, 1, variant)
    z = torch.randn(1, 16, 5, 3, 4)
    whole = model.decode(z)
    assert whole.shape == (1, 3, 17, 24, 32)
    assert whole.min() >= -1 and whole.max() <= 1 and whole.std() > 0.05
    for chunk in (1, 2, 3):
        parts = list(model.stream(z, chunk))
        assert [p.shape[2] for p in parts] == [4 * chunk - 3] + [4 * min(chunk, 5 - s) for s in range(chunk, 5, chunk)]
        torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=0, atol=1e-5)
    later = z.clone()
    later[:, :, 3] += 1.0
    changed = model.decode(later)
    torch.testing.assert_close(changed[:, :, :9], whole[:, :, :9], rtol=0, atol=1e-5)  # latent frames 0-2
    assert (changed[:, :, 9:13] - whole[:, :, 9:13]).abs().max() > 1e-3  # latent frame 3's own frames


@pytest.mark.parametrize("model_name, kind", [("tiny-ti2v", "wan2.2"), ("tiny-t2v-moe", "wan2.1")])
def test_the_light_decode_has_the_full_decodes_frames_and_size(engine, taehv_files, model_name, kind):
    full = engine(model_name, precision="fp32")
    light = engine(model_name, precision="fp32", decoder="light", light_decoder=str(taehv_files[kind]))
    w, h = full.spec.sizes[-1]
    _, t, lh, lw = full.spec.latent_shape(w, h, 9)
    z = torch.randn(1, full.spec.vae.z_dim, t, lh, lw, generator=torch.Generator().manual_seed(3))
    a, b = full.decode(z), light.decode(z)
    assert a.shape == b.shape == (1, 3, 9, h, w)
    # the engine streams the light decode in CHUNK latent frames, each the model's own frames
    parts = list(light.decode_chunks(z))
    assert [p.shape[2] for p in parts] == [4 * CHUNK - 3] + [4 * min(CHUNK, t - s) for s in range(CHUNK, t, CHUNK)]
    torch.testing.assert_close(b, light.light_decoder.model.decode(z), rtol=0, atol=1e-5)


def test_lighttae_files_read_the_unnormalized_latents(engine, taehv_files):
    """LightX2V's lighttae* decoders read latents * std + mean (the VAE config's); taew* files the DiT's latents."""
    eng = engine("tiny-t2v-moe", precision="fp32", decoder="light",
                 light_decoder=str(taehv_files["wan2.1-lighttae"]))
    assert eng.light_decoder.latents == "raw"
    mean, std = eng._latent_stats(torch.zeros(1))
    assert std.flatten().std() > 0  # the tiny Wan2.1 VAE carries Wan's real statistics
    z = torch.randn(1, 16, 3, 12, 20)
    torch.testing.assert_close(eng.decode(z), eng.light_decoder.model.decode(z * std + mean), rtol=0, atol=1e-5)
    assert latents_kind(OptimizationConfig(decoder="light", light_decoder="/x/taew2_1.pth")) == "normalized"
    assert latents_kind(OptimizationConfig(decoder="light", light_decoder="/x/LightTAEW2_2.safetensors")) == "raw"
    assert latents_kind(OptimizationConfig(decoder="light", light_decoder="/x/lighttaew2_2.pth",
                                           light_decoder_latents="normalized")) == "normalized"


def test_a_process_that_does_not_write_decodes_nothing(engine, taehv_files):
    eng = engine("tiny-ti2v", precision="fp32", decoder="light", light_decoder=str(taehv_files["wan2.2"]))
    before = eng.layout
    try:
        eng.layout = EngineLayout(writes_output=False, joins_decode=True)
        assert list(eng.decode_chunks(torch.randn(1, 48, 3, 10, 16))) == []
    finally:
        eng.layout = before


# -- a generation --------------------------------------------------------------------------------------
def test_a_light_generation_writes_the_mp4_and_its_error_against_the_vae(engine, taehv_files, tmp_path):
    eng = engine("tiny-ti2v", precision="fp32", decoder="light", light_decoder=str(taehv_files["wan2.2"]))
    r = eng.generate(GenerationRequest(model="tiny-ti2v", prompt="a kite", seed=5, steps=2, frames=9,
                                       output=str(tmp_path / "light.mp4")))
    with av.open(str(r.video_path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
    assert len(frames) == 9 and frames[0].shape == (160, 256, 3)
    side = json.loads(r.sidecar_path.read_text())
    dec = side["decoder"]
    assert dec["kind"] == "light" and dec["architecture"] == "taehv-base" and dec["latents"] == "normalized"
    assert dec["file"] == str(taehv_files["wan2.2"]) and side["plan"]["decoder"] == "light"
    check = dec["check"]
    assert check["latent_frames"] == 2 and check["frames"] == 5 and "first 2 latent frames" in check["sampled"]
    # the figures, recomputed here from the final latents: the VAE's first 5 frames against the light decode's
    full = full_decode(eng, r.latents[:, :, :2])
    light = eng.light_decoder.model.decode(r.latents)[:, :, :5]
    mse = ((light - full) * 127.5).pow(2).mean().item()
    assert check["psnr_db"] == pytest.approx(10 * math.log10(255**2 / mse), abs=0.011)
    assert check["max_abs_error"] == pytest.approx((light - full).abs().max().item(), abs=1e-5)
    assert 0 < check["max_abs_error"] <= 2 and check["seconds"] >= 0


def test_artifex_generate_with_the_light_decoder_on_wan21_latents(taehv_files, tmp_path, capsys):
    from artifex.cli import main

    out = tmp_path / "clip.mp4"
    assert main(["generate", "--model", "tiny-t2v-moe", "--prompt", "a dog", "--size", "128x64", "--frames", "9",
                 "--steps", "2", "--seed", "3", "--output", str(out), "--decoder", "light",
                 "--light-decoder", str(taehv_files["wan2.1"]), "--light-decoder-check", "3"]) == 0
    assert "light decoder against the VAE on frames 0-8: PSNR" in capsys.readouterr().err
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 9
    check = json.loads(out.with_suffix(".json").read_text())["decoder"]["check"]
    assert check["latent_frames"] == 3 and check["frames"] == 9  # the whole clip: 3 latent frames
    assert math.isfinite(check["psnr_db"])


def test_the_full_decoder_stays_the_default_and_says_so(engine, tmp_path):
    eng = engine("tiny-t2v-moe")
    assert eng.light_decoder is None
    r = eng.generate(GenerationRequest(model="tiny-t2v-moe", prompt="x", seed=1, steps=2, frames=5,
                                       output=str(tmp_path / "full.mp4")))
    assert r.sidecar["decoder"] == {"kind": "full"} and r.sidecar["plan"]["decoder"] == "full"


def test_an_engine_refuses_a_light_decoder_for_the_other_vae(taehv_files):
    from artifex.engine.pipeline import Engine

    with pytest.raises(CheckpointError, match="48-channel latents.*use Wan2.1 VAE"):
        Engine.load("tiny-t2v-moe", config=OptimizationConfig(decoder="light",
                                                              light_decoder=str(taehv_files["wan2.2"])))


@pytest.mark.parametrize("fields, field", [
    ({"decoder": "light"}, "light_decoder"),
    ({"decoder": "light", "light_decoder": "  "}, "light_decoder"),
    ({"decoder": "light", "light_decoder": "taew2_2.ckpt"}, "light_decoder"),
    ({"light_decoder": "taew2_2.pth"}, "light_decoder"),  # named, but decoder=full would ignore it
    ({"light_decoder_latents": "raw"}, "light_decoder_latents"),
    ({"decoder": "tiny"}, "decoder"),
    ({"decoder": "light", "light_decoder": "a.pth", "light_decoder_latents": "scaled"}, "light_decoder_latents"),
    ({"decoder": "light", "light_decoder": "a.pth", "light_decoder_check": -1}, "light_decoder_check"),
    ({"decoder": "light", "light_decoder": "a.pth", "light_decoder_check": 65}, "light_decoder_check"),
])
def test_invalid_light_decoder_configs_are_refused_naming_the_field(fields, field):
    with pytest.raises(InvalidRequestError) as e:
        OptimizationConfig(**fields)
    assert e.value.field == field, str(e.value)


def test_the_cli_flags_reach_the_config():
    import argparse

    from artifex.cli.common import add_config_flags, build_config

    p = argparse.ArgumentParser()
    add_config_flags(p)
    config = build_config(p.parse_args(["--decoder", "light", "--light-decoder", "/w/taew2_2.pth",
                                        "--light-decoder-check", "0"]))
    assert (config.decoder, config.light_decoder, config.light_decoder_check) == ("light", "/w/taew2_2.pth", 0)


@pytest.mark.parametrize("z, patch, variant", [(16, 1, "base"), (48, 2, "base"), (48, 2, "super")])
def test_matches_madebyollin_taehv_where_it_is_installed(tmp_path, z, patch, variant):
    """The reference implementation (``pip install git+https://github.com/madebyollin/taehv``; not a dependency,
    skipped without it): its random-weight decoder saved as the published files are, loaded here, decodes the same
    frames (its [0, 1] NTCHW against our [-1, 1] NCTHW)."""
    taehv = pytest.importorskip("taehv")
    torch.manual_seed(0)
    kwargs = {"arch_variant": "super"} if variant == "super" else {}
    ref = taehv.TAEHV(checkpoint_path=None, patch_size=patch, latent_channels=z, **kwargs).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.5 / max(1, p[0].numel()) ** 0.5)
    torch.save(ref.state_dict(), tmp_path / "ref.pth")
    ours = load_taehv(tmp_path / "ref.pth", z, patch)
    assert list(ours.state_dict()) == [k for k in ref.state_dict() if k.startswith("decoder.")]
    latents = torch.randn(1, 5, z, 3, 4)
    with torch.no_grad():
        expected = ref.decode_video(latents, parallel=False, show_progress_bar=False)
    got = torch.cat(list(ours.stream(latents.transpose(1, 2), chunk=2)), dim=2)
    torch.testing.assert_close((got.transpose(1, 2) + 1) / 2, expected, rtol=0, atol=1e-5)
