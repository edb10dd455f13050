"""The official Wan2.2 layout: its converters against diffusers' own and against an independent reference with the
official names (DiffSynth-Studio's Wan classes), a whole tiny official checkpoint through the engine, broken ones."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffsynth_ref import reference

from artifex.errors import CheckpointError
from artifex.models import official
from artifex.models.configs import text_encoder_config, vae_kwargs
from artifex.models.loader import check_checkpoint, load_components
from artifex.models.registry import get_model


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory):
    """official_checkpoint(name) -> a tiny checkpoint of ``name`` in the official layout (the diffusers tiny one's
    weights), built once per module."""
    from artifex.models.tiny import save_tiny_official_checkpoint

    root = tmp_path_factory.mktemp("official")
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = save_tiny_official_checkpoint(get_model(name), root / name)
        return built[name]

    return get


@pytest.fixture
def official_copy(official_checkpoint, tmp_path):
    made = []

    def copy(name: str):
        made.append(name)
        dst = tmp_path / f"{len(made)}" / name
        shutil.copytree(official_checkpoint(name), dst)
        return dst

    return copy


def _jitter(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its initial value (norm gains of 1, zero biases, zero-initialised projections),
    so that a swapped or dropped tensor shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not differ, differ[:5]


# -- layout and files -------------------------------------------------------------------------
def test_the_official_layout_has_the_published_files_and_is_detected(official_checkpoint, tiny_checkpoint, tmp_path):
    moe, ti2v = official_checkpoint("tiny-t2v-moe"), official_checkpoint("tiny-ti2v")
    for d in ("high_noise_model", "low_noise_model"):
        assert (moe / d / "config.json").is_file()
        assert (moe / d / "diffusion_pytorch_model.safetensors.index.json").is_file()
        assert len(list((moe / d).glob("diffusion_pytorch_model-0000?-of-00002.safetensors"))) == 2
    assert (moe / "Wan2.1_VAE.pth").is_file() and not (moe / "model_index.json").exists()
    assert (ti2v / "Wan2.2_VAE.pth").is_file() and (ti2v / "config.json").is_file()
    for p in (moe, ti2v):
        assert (p / "models_t5_umt5-xxl-enc-bf16.pth").is_file() and any((p / "google" / "umt5-xxl").iterdir())
    cfg = json.loads((ti2v / "config.json").read_text())
    assert cfg["model_type"] == "ti2v" and cfg["in_dim"] == 48 and cfg["num_heads"] == 2
    assert official.detect_layout(moe) == official.detect_layout(ti2v) == "official"
    assert official.detect_layout(tiny_checkpoint("tiny-ti2v")) == "diffusers"
    assert official.detect_layout(tmp_path) == "diffusers"  # neither: the diffusers check names model_index.json
    with pytest.raises(CheckpointError, match=r"model_index.json: is missing"):
        check_checkpoint(get_model("tiny-ti2v"), tmp_path)
    info = check_checkpoint(get_model("tiny-t2v-moe"), moe)
    assert info.layout == "official" and info.boundary_ratio == 0.875
    assert set(info.weight_bytes) == {"transformer", "transformer_2", "vae", "text_encoder"}
    assert any("scheduler" in line for line in info.from_registry)
    assert any("boundary_ratio" in line for line in info.from_registry)


def test_the_writer_uses_the_official_names(official_checkpoint):
    """DiffSynth's copies of the official classes take the written state dicts strictly."""
    from safetensors.torch import load_file

    dit_ref, vae_ref, t5_ref = (reference(m) for m in ("models.wan_video_dit", "models.wan_video_vae",
                                                       "models.wan_video_text_encoder"))
    path = official_checkpoint("tiny-ti2v")
    state = {}
    for shard in sorted(path.glob("diffusion_pytorch_model-*.safetensors")):
        state.update(load_file(shard))
    a = get_model("tiny-ti2v").transformer
    dit = dit_ref.WanModel(dim=a.dim, in_dim=a.in_channels, ffn_dim=a.ffn, out_dim=a.out_channels, text_dim=a.text_dim,
                           freq_dim=a.freq_dim, eps=1e-6, patch_size=a.patch, num_heads=a.heads, num_layers=a.layers,
                           has_image_input=False)
    dit.load_state_dict(state, strict=True)
    vae = vae_ref.VideoVAE38_(dim=8, dec_dim=8, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    vae.load_state_dict(torch.load(path / "Wan2.2_VAE.pth", weights_only=True), strict=True)
    t5 = torch.load(path / "models_t5_umt5-xxl-enc-bf16.pth", weights_only=True)
    enc = t5_ref.WanTextEncoder(vocab=t5["token_embedding.weight"].shape[0], dim=32, dim_attn=32, dim_ffn=64,
                                num_heads=4, num_layers=2, num_buckets=8, shared_pos=False)
    enc.load_state_dict(t5, strict=True)


# -- converters --------------------------------------------------------------------------------
def test_transformer_matches_diffusers_single_file_loader_and_the_reference(official_checkpoint, tiny_checkpoint,
                                                                            tmp_path):
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file, save_file

    spec = get_model("tiny-ti2v")
    path = official_checkpoint("tiny-ti2v")
    state = {}
    for shard in sorted(path.glob("diffusion_pytorch_model-*.safetensors")):
        state.update(load_file(shard))
    ours = official.transformer_from_official(spec, dict(state))
    single = tmp_path / "official.safetensors"
    save_file(state, single)
    theirs = WanTransformer3DModel.from_single_file(str(single), config=str(tiny_checkpoint("tiny-ti2v")),
                                                    subfolder="transformer", torch_dtype=torch.float32)
    _same_state(ours, theirs)
    # The same weights in DiffSynth's official WanModel compute the same velocity.
    a = spec.transformer
    ref = reference("models.wan_video_dit").WanModel(
        dim=a.dim, in_dim=a.in_channels, ffn_dim=a.ffn, out_dim=a.out_channels, text_dim=a.text_dim,
        freq_dim=a.freq_dim, eps=1e-6, patch_size=a.patch, num_heads=a.heads, num_layers=a.layers,
        has_image_input=False)
    ref.load_state_dict(state, strict=True)
    ref.eval()
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(1, 48, 3, 8, 12, generator=g), torch.randn(1, 7, a.text_dim, generator=g), torch.tensor([700.0])
    with torch.no_grad():
        want = _reference_forward(ref, x, t, ctx)
        got = ours(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # bf16: the modules diffusers keeps in fp32 stay fp32, as from_pretrained does
    low = official.transformer_from_official(spec, dict(state), dtype=torch.bfloat16)
    assert low.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16 and low.scale_shift_table.dtype == torch.float32


def _reference_forward(ref, x, t, ctx):
    """DiffSynth's WanModel forward, step by step (its own ``forward`` in diffsynth 2.1.12 fails at ``patchify``)."""
    dit = reference("models.wan_video_dit")
    temb = ref.time_embedding(dit.sinusoidal_embedding_1d(ref.freq_dim, t).to(x.dtype))
    t_mod = ref.time_projection(temb).unflatten(1, (6, ref.dim))
    context = ref.text_embedding(ctx)
    x = ref.patch_embedding(x)
    f, h, w = x.shape[2:]
    x = x.flatten(2).transpose(1, 2)
    freqs = torch.cat([ref.freqs[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
                       ref.freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
                       ref.freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(f * h * w, 1, -1)
    for block in ref.blocks:
        x = block(x, context, t_mod, freqs)
    return ref.unpatchify(ref.head(x, temb), (f, h, w))


def test_wan21_vae_matches_diffusers_converter_where_it_applies():
    """diffusers' converter hard-codes two res-blocks per stage (the real VAE); there both must agree exactly."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    ref = _jitter(reference("models.wan_video_vae").VideoVAE_(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4],
                                                              num_res_blocks=2))
    state = ref.state_dict()
    ours = official.vae_from_official(dict(state), dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4],
                                                          num_res_blocks=2, temperal_downsample=[False, True, True]))
    theirs = convert_wan_vae_to_diffusers(dict(state))
    got = ours.state_dict()
    assert got.keys() == theirs.keys()
    assert all(torch.equal(got[k], theirs[k]) for k in got)


def _video_roundtrip(ref_model, ours, frames: int, size: tuple[int, int], z: int, stride: int):
    g = torch.Generator().manual_seed(3)
    video = torch.randn(1, 3, frames, *size, generator=g).clamp(-1, 1)
    zeros, ones = torch.zeros(z), torch.ones(z)
    with torch.no_grad():
        want_mu = ref_model.encode(video, [zeros, ones])
        got_mu = ours.encode(video).latent_dist.mode()
        torch.testing.assert_close(got_mu, want_mu, rtol=1e-4, atol=1e-5)
        latent = torch.randn(1, z, (frames - 1) // 4 + 1, size[0] // stride, size[1] // stride, generator=g)
        want = ref_model.decode(latent, [zeros, ones])
        got = ours.decode(latent).sample
    assert got.shape == want.shape
    # diffusers clamps its decoded video to [-1, 1]; the official wrappers clamp after decode
    torch.testing.assert_close(got, want.clamp(-1, 1), rtol=1e-4, atol=1e-5)


def test_wan21_vae_of_any_block_count_decodes_like_the_reference():
    spec = get_model("tiny-t2v-moe")
    ref = _jitter(reference("models.wan_video_vae").VideoVAE_(dim=8, z_dim=16, dim_mult=[1, 2, 2, 2],
                                                              num_res_blocks=1))
    ours = official.vae_from_official(dict(ref.state_dict()), vae_kwargs(spec))
    assert next(ours.parameters()).dtype == torch.float32
    _video_roundtrip(ref, ours, frames=5, size=(16, 24), z=16, stride=8)


def test_wan22_vae_decodes_like_the_reference():
    spec = get_model("tiny-ti2v")
    ref = _jitter(reference("models.wan_video_vae").VideoVAE38_(dim=8, dec_dim=8, z_dim=48, dim_mult=[1, 2, 2, 2],
                                                                num_res_blocks=1))
    ours = official.vae_from_official(dict(ref.state_dict()), vae_kwargs(spec))
    _video_roundtrip(ref, ours, frames=5, size=(32, 48), z=48, stride=16)


def test_umt5_encodes_like_the_reference():
    spec = get_model("tiny-ti2v")
    config = text_encoder_config(spec, vocab_size=64)
    ref = reference("models.wan_video_text_encoder").WanTextEncoder(
        vocab=64, dim=config.d_model, dim_attn=config.d_kv * config.num_heads, dim_ffn=config.d_ff,
        num_heads=config.num_heads, num_layers=config.num_layers, num_buckets=config.relative_attention_num_buckets,
        shared_pos=False)
    for block in ref.blocks:  # the official class fixes max_dist at 128; the tiny config uses a smaller one
        block.pos_embedding.max_dist = config.relative_attention_max_distance
    _jitter(ref)
    ours = official.umt5_from_official(dict(ref.state_dict()), config)
    assert ours.encoder.embed_tokens.weight is ours.shared.weight  # tied again: one tensor on the device
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, 64, (2, 40), generator=g)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 25:] = 0
    with torch.no_grad():
        want = ref(ids, mask)
        got = ours(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1, :25], want[1, :25], rtol=1e-4, atol=1e-5)
    # the published file is bf16: it loads, and the requested precision decides (transformers' fp32 rule for fp16)
    bf16 = {k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()}
    half = official.umt5_from_official(bf16, config, dtype=torch.float16)
    assert half.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert half.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float16


# -- a whole checkpoint ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-t2v-moe", "tiny-i2v-moe", "tiny-ti2v"])
def test_official_checkpoint_loads_the_same_components(official_checkpoint, tiny_checkpoint, name):
    spec = get_model(name)
    for precision in ("bf16", "fp16"):
        got = load_components(spec, official_checkpoint(name), precision)
        want = load_components(spec, tiny_checkpoint(name), precision)
        assert len(got.experts) == len(want.experts) == spec.experts
        for a, b in [(got.vae, want.vae), (got.text_encoder, want.text_encoder), *zip(got.experts, want.experts)]:
            _same_state(a, b)
        assert got.tokenizer("a cat").input_ids == want.tokenizer("a cat").input_ids
    assert got.info.boundary_ratio == want.info.boundary_ratio == spec.boundary


def test_engine_generates_the_same_latents_from_either_layout(official_checkpoint, engine, tmp_path):
    from artifex.engine.pipeline import Engine
    from artifex.engine.request import GenerationRequest

    results = []
    for eng in (Engine.load("tiny-t2v-moe", checkpoint=str(official_checkpoint("tiny-t2v-moe"))),
                engine("tiny-t2v-moe")):  # the diffusers-layout tiny checkpoint, the same weights
        req = GenerationRequest(model="tiny-t2v-moe", prompt="a red car in the city", output=str(tmp_path / "o.mp4"),
                                steps=4, frames=5, width=128, height=64, seed=7)
        results.append(eng.generate(req))
    a, b = results
    assert a.experts_per_step == b.experts_per_step and set(a.experts_per_step) == {0, 1}  # both experts ran
    assert torch.equal(a.latents, b.latents)


# -- broken checkpoints ---------------------------------------------------------------------------
def test_a_missing_file_is_named_with_the_layout(official_copy, official_checkpoint):
    spec = get_model("tiny-t2v-moe")
    path = official_copy("tiny-t2v-moe")
    (path / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(CheckpointError, match=r"Wan2.1_VAE.pth: is missing \(tiny-t2v-moe decodes with the wan2.1 VAE; "
                                              r"official Wan2.2 layout detected"):
        check_checkpoint(spec, path)
    shutil.copy(official_checkpoint("tiny-ti2v") / "Wan2.2_VAE.pth", path)
    with pytest.raises(CheckpointError, match=r"Wan2.1_VAE.pth: is missing \(tiny-t2v-moe decodes with the wan2.1 VAE; "
                                              r"the directory holds Wan2.2_VAE.pth, the VAE of other variants"):
        check_checkpoint(spec, path)
    path = official_copy("tiny-ti2v")
    (path / "models_t5_umt5-xxl-enc-bf16.pth").unlink()
    with pytest.raises(CheckpointError, match=r"models_t5_umt5-xxl-enc-bf16.pth: is missing .*official Wan2.2 layout"):
        load_components(get_model("tiny-ti2v"), path)
    shutil.rmtree(path / "google")
    (path / "models_t5_umt5-xxl-enc-bf16.pth").write_bytes(b"")  # (empty: the tokenizer check is not reached)
    with pytest.raises(CheckpointError, match=r"models_t5_umt5-xxl-enc-bf16.pth: is truncated or corrupt"):
        check_checkpoint(get_model("tiny-ti2v"), path)


def test_truncated_shard_and_pth_are_named(official_copy):
    spec = get_model("tiny-t2v-moe")
    path = official_copy("tiny-t2v-moe")
    shard = path / "low_noise_model" / "diffusion_pytorch_model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"low_noise_model/diffusion_pytorch_model-00002-of-00002.safetensors: "
                                              r"is truncated or corrupt"):
        check_checkpoint(spec, path)
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model-00002-of-00002.safetensors: is missing "
                                              r"\(diffusion_pytorch_model.safetensors.index.json lists it; official "
                                              r"Wan2.2 layout detected"):
        load_components(spec, path)
    shard.write_bytes(data)
    config = path / "high_noise_model" / "config.json"
    text = config.read_text()
    config.unlink()
    with pytest.raises(CheckpointError, match=r"high_noise_model/config.json: is missing \(the config of "
                                              r"tiny-t2v-moe's transformer; official Wan2.2 layout detected"):
        check_checkpoint(spec, path)
    config.write_text(text)
    vae = path / "Wan2.1_VAE.pth"
    data = vae.read_bytes()
    vae.write_bytes(data[:-4096])
    with pytest.raises(CheckpointError, match=r"Wan2.1_VAE.pth: is truncated or corrupt"):
        check_checkpoint(spec, path)
    vae.write_bytes(b"<html>not found</html>")
    with pytest.raises(CheckpointError, match=r"Wan2.1_VAE.pth: is not a torch.save file"):
        check_checkpoint(spec, path)
    # torch.save's legacy format (a bare pickle: no memory map) is read whole and loads the same; the weights
    # loaded before own their memory (no pages of the memory-mapped file), so rewriting the file under them is safe
    vae.write_bytes(data)
    want = load_components(spec, path, "bf16").vae
    torch.save(torch.load(vae, weights_only=True), vae, _use_new_zipfile_serialization=False)
    assert vae.read_bytes()[:1] == b"\x80"
    _same_state(load_components(spec, path, "bf16").vae, want)


def test_another_variant_or_a_wrong_config_is_named(official_checkpoint, official_copy):
    ti2v = official_checkpoint("tiny-ti2v")
    with pytest.raises(CheckpointError, match=r"high_noise_model: is missing \(tiny-t2v-moe needs high_noise_model, "
                                              r"low_noise_model; it holds one transformer at its root \(it looks like "
                                              r"tiny-ti2v\)"):
        check_checkpoint(get_model("tiny-t2v-moe"), ti2v)
    with pytest.raises(CheckpointError, match=r"holds high_noise_model/ and low_noise_model/ \(two experts\); "
                                              r"tiny-ti2v has one transformer \(it looks like tiny-t2v-moe\)"):
        check_checkpoint(get_model("tiny-ti2v"), official_checkpoint("tiny-t2v-moe"))
    with pytest.raises(CheckpointError, match=r"high_noise_model/config.json: model_type is 't2v', but tiny-i2v-moe's "
                                              r"is 'i2v': this is not a tiny-i2v-moe checkpoint \(it looks like "
                                              r"tiny-t2v-moe\)"):
        check_checkpoint(get_model("tiny-i2v-moe"), official_checkpoint("tiny-t2v-moe"))
    path = official_copy("tiny-ti2v")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "t2v"  # WanModel acts on "i2v" only: a TI2V model saved as "t2v" is still one
    (path / "config.json").write_text(json.dumps(cfg))
    assert check_checkpoint(get_model("tiny-ti2v"), path).layout == "official"
    cfg["model_type"] = "i2v"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json: model_type is 'i2v', but tiny-ti2v's is 'ti2v' or 't2v'"):
        check_checkpoint(get_model("tiny-ti2v"), path)
    cfg["model_type"] = "ti2v"
    cfg["num_layers"] = 30
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json: num_layers is 30, but tiny-ti2v has 2: this is not a "
                                              r"tiny-ti2v checkpoint \(no known variant has 1 transformer"):
        check_checkpoint(get_model("tiny-ti2v"), path)


def _rewrite_shard(folder, edit):
    """Apply ``edit`` to the first shard's tensors and rewrite the shard and the index."""
    from safetensors.torch import load_file, save_file

    shard = sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))[0]
    state = load_file(shard)
    edit(state)
    save_file(state, shard)
    index_path = folder / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"].update({k: shard.name for k in state})
    index_path.write_text(json.dumps(index))


def test_missing_unexpected_and_misshapen_keys_are_named(official_copy):
    spec = get_model("tiny-ti2v")
    path = official_copy("tiny-ti2v")
    removed = []
    _rewrite_shard(path, lambda s: removed.append(s.pop(sorted(k for k in s if ".self_attn.q.weight" in k)[0])))
    with pytest.raises(CheckpointError, match=r"does not match the WanTransformer3DModel of this model: 1 missing "
                                              r"after conversion: blocks\.\d\.attn1\.to_q\.weight"):
        check_checkpoint(spec, path)
    path = official_copy("tiny-ti2v")
    _rewrite_shard(path, lambda s: s.update({"blocks.0.img_gate": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"1 unexpected \(official names\): blocks.0.img_gate"):
        check_checkpoint(spec, path)
    path = official_copy("tiny-ti2v")
    _rewrite_shard(path, lambda s: s.update({k: torch.zeros(5) for k in list(s)[:1]}))
    with pytest.raises(CheckpointError, match=r"has tensors of the wrong shape: .*\[5\] \(expected"):
        check_checkpoint(spec, path)
    # the VAE and the text encoder too
    path = official_copy("tiny-ti2v")
    vae = torch.load(path / "Wan2.2_VAE.pth", weights_only=True)
    vae["decoder.extra.weight"] = vae.pop("decoder.head.2.weight")
    torch.save(vae, path / "Wan2.2_VAE.pth")
    with pytest.raises(CheckpointError, match=r"Wan2.2_VAE.pth: does not match the AutoencoderKLWan of this model: 1 "
                                              r"missing after conversion: decoder.conv_out.weight; 1 unexpected "
                                              r"\(official names\): decoder.extra.weight"):
        check_checkpoint(spec, path)


def test_single_files_with_the_official_layout_are_refused_clearly(official_checkpoint):
    with pytest.raises(CheckpointError, match=r"single-file replacements .* need a diffusers-layout"):
        load_components(get_model("tiny-ti2v"), official_checkpoint("tiny-ti2v"),
                        single_files={"transformer": "x.safetensors"})


def test_the_s2v_layout_is_detected_and_its_keys_checked(tmp_path):
    """S2V-14B: its files are checked like TI2V-5B's plus wav2vec2; its transformer goes through the converter
    ``models/s2v`` registers (whose key check: ``test_s2v_model.py``)."""
    from artifex.models.s2v.convert import official_config
    from artifex.models.s2v.transformer import tiny_s2v_config

    spec = get_model("s2v-14b")
    (tmp_path / "config.json").write_text(json.dumps(official_config(
        {**tiny_s2v_config(), "num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824,
         "num_layers": 40, "text_dim": 4096, "freq_dim": 256, "audio_dim": 1024, "audio_layers": 25,
         "audio_inject_layers": (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)})))
    assert official.detect_layout(tmp_path) == "official"
    with pytest.raises(CheckpointError, match=r"holds no transformer weights: expected diffusion_pytorch_model"):
        check_checkpoint(spec, tmp_path)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"Wan2.1_VAE.pth: is missing \(s2v-14b decodes with the wan2.1 VAE"):
        check_checkpoint(spec, tmp_path)  # past the transformer: its converter is registered
    assert official.transformer_format("s2v") is not None


def test_real_size_official_s2v_state_dict_passes_the_key_and_shape_check():
    """DiffSynth's WanS2VModel at S2V-14B's real size (official key names, on the meta device) against the model
    Artifex loads it into: every key converts, nothing is left over, every shape agrees."""
    spec = get_model("s2v-14b")
    a = spec.transformer
    with torch.device("meta"):
        dit = reference("models.wan_video_dit_s2v").WanS2VModel(
            dim=a.dim, in_dim=a.in_channels, ffn_dim=a.ffn, out_dim=a.out_channels, text_dim=a.text_dim,
            freq_dim=a.freq_dim, eps=1e-6, patch_size=a.patch, num_heads=a.heads, num_layers=a.layers,
            cond_dim=16, audio_dim=1024, num_audio_token=4).state_dict()
    fmt = official.transformer_format("s2v")
    pairs = official.check_state("transformer", dit, lambda: fmt.build(spec, {"dim": a.dim, "num_heads": a.heads,
                                                                           "ffn_dim": a.ffn, "num_layers": a.layers}),
                                 fmt.convert)
    assert pairs is not None and len(pairs) == len([k for k in dit if "injector_pre_norm" not in k])


@pytest.mark.parametrize("name", ["ti2v-5b", "t2v-a14b", "i2v-a14b"])
def test_real_size_official_state_dicts_pass_the_key_and_shape_check(name):
    """The official classes at the real sizes (DiffSynth's copies, on the meta device: no memory) against the
    modules Artifex loads them into: every key converts, nothing is left over, every shape agrees."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5EncoderModel

    spec = get_model(name)
    a = spec.transformer
    with torch.device("meta"):
        dit = reference("models.wan_video_dit").WanModel(
            dim=a.dim, in_dim=a.in_channels, ffn_dim=a.ffn, out_dim=a.out_channels, text_dim=a.text_dim,
            freq_dim=a.freq_dim, eps=1e-6, patch_size=a.patch, num_heads=a.heads, num_layers=a.layers,
            has_image_input=False).state_dict()
        vae_ref = reference("models.wan_video_vae")
        vae = (vae_ref.VideoVAE38_() if spec.vae.kind == "wan2.2" else vae_ref.VideoVAE_()).state_dict()
        t5 = reference("models.wan_video_text_encoder").WanTextEncoder().state_dict() if name == "ti2v-5b" else None
    fmt = official.transformer_format(spec.task)
    # each raises, naming the keys, on any mismatch; the pairs are every stored tensor (the tied embedding twice)
    pairs = official.check_state("transformer", dit, lambda: fmt.build(spec, {}), fmt.convert)
    assert pairs is not None and len(pairs) == len(dit)
    pairs = official.check_state("vae", vae, lambda: AutoencoderKLWan(**official.vae_config(spec)))
    assert pairs is not None and len(pairs) == len(vae)
    if t5 is not None:  # one umt5-xxl for all variants
        pairs = official.check_state("text_encoder", t5, lambda: UMT5EncoderModel(text_encoder_config(spec)))
        assert pairs is not None and len(pairs) == len(t5) + 1


def test_a_registered_format_plugs_in_and_may_make_new_tensors(official_checkpoint, tiny_checkpoint, monkeypatch):
    """The hook the S2V model uses: a format registered for a task converts its transformers; a converter that
    makes new tensors (here: copies) goes through the load path that converts first and casts after."""
    calls = []

    def convert(state):
        calls.append(len(state))
        return {k: v.clone() for k, v in official.convert_wan_transformer(state).items()}

    monkeypatch.setitem(official._TRANSFORMER_FORMATS, "t2v", official.TransformerFormat(
        official.transformer_format("t2v").build, convert))
    spec = get_model("tiny-t2v-moe")
    got = load_components(spec, official_checkpoint("tiny-t2v-moe"), "bf16")
    want = load_components(spec, tiny_checkpoint("tiny-t2v-moe"), "bf16")
    assert len(calls) == 4  # each expert: the check on meta tensors, then the load
    for a, b in zip(got.experts, want.experts):
        _same_state(a, b)
