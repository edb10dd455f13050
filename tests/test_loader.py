"""Tiny checkpoints on disk in the diffusers layout, loaded through the real loader; broken ones fail clearly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from artifex.errors import CheckpointError
from artifex.models.loader import check_checkpoint, load_components, resolve_checkpoint
from artifex.models.registry import get_model


def test_tiny_checkpoints_have_the_diffusers_layout_and_load(tiny_checkpoint):
    for name, roles in [("tiny-ti2v", ["transformer"]), ("tiny-t2v-moe", ["transformer", "transformer_2"]),
                        ("tiny-i2v-moe", ["transformer", "transformer_2"])]:
        path = tiny_checkpoint(name)
        index = json.loads((path / "model_index.json").read_text())
        assert index["_class_name"] == get_model(name).pipeline_class
        for folder in roles + ["vae", "text_encoder", "tokenizer", "scheduler"]:
            assert (path / folder).is_dir(), folder
        assert (path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
        c = load_components(get_model(name), path, "bf16")
        assert len(c.experts) == len(roles)
        expert = c.experts[0]
        # bf16 by default, with the modules diffusers keeps in fp32 left in fp32.
        assert expert.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
        assert expert.scale_shift_table.dtype == torch.float32
        assert next(c.vae.parameters()).dtype == torch.float32
        assert c.info.boundary_ratio == get_model(name).boundary


def test_tiny_weights_are_deterministic(tmp_path):
    from safetensors.torch import load_file

    from artifex.models.tiny import save_tiny_checkpoint

    spec = get_model("tiny-ti2v")
    a = load_file(save_tiny_checkpoint(spec, tmp_path / "a") / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(save_tiny_checkpoint(spec, tmp_path / "b") / "transformer" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_folder_is_named(checkpoint_copy):
    path = checkpoint_copy("tiny-t2v-moe")
    shutil.rmtree(path / "transformer_2")
    with pytest.raises(CheckpointError, match=r"transformer_2: is missing \(tiny-t2v-moe needs transformer, transformer_2\)"):
        check_checkpoint(get_model("tiny-t2v-moe"), path)


def test_missing_model_index_and_directory(checkpoint_copy, tmp_path):
    path = checkpoint_copy("tiny-ti2v")
    (path / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match=r"model_index.json: is missing"):
        check_checkpoint(get_model("tiny-ti2v"), path)
    with pytest.raises(CheckpointError, match=r"nowhere: does not exist"):
        resolve_checkpoint(get_model("ti2v-5b"), str(tmp_path / "nowhere"), tmp_path)


def test_missing_shard_is_named(checkpoint_copy):
    from diffusers import WanTransformer3DModel

    path = checkpoint_copy("tiny-ti2v")
    t = WanTransformer3DModel.from_pretrained(path, subfolder="transformer")
    shutil.rmtree(path / "transformer")
    t.save_pretrained(path / "transformer", max_shard_size="300KB")
    shards = sorted((path / "transformer").glob("*-of-*.safetensors"))
    assert len(shards) >= 2
    load_components(get_model("tiny-ti2v"), path)  # the sharded layout loads
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=rf"{shards[1].name}: is missing"):
        load_components(get_model("tiny-ti2v"), path)


def test_corrupt_and_truncated_safetensors_are_named(checkpoint_copy):
    path = checkpoint_copy("tiny-t2v-moe")
    weights = path / "vae" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"vae/diffusion_pytorch_model.safetensors: is truncated or corrupt"):
        check_checkpoint(get_model("tiny-t2v-moe"), path)
    weights.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(CheckpointError, match=r"vae/diffusion_pytorch_model.safetensors: is corrupt"):
        check_checkpoint(get_model("tiny-t2v-moe"), path)


def test_checkpoint_of_another_variant_is_refused(tiny_checkpoint):
    with pytest.raises(CheckpointError, match=r"model_index.json: _class_name is 'WanPipeline'; tiny-i2v-moe"):
        check_checkpoint(get_model("tiny-i2v-moe"), tiny_checkpoint("tiny-t2v-moe"))
    with pytest.raises(CheckpointError, match=r"transformer/config.json: in_channels is 48, but tiny-t2v-moe has 16: "
                                              r"this is not a tiny-t2v-moe checkpoint \(it looks like tiny-ti2v\)"):
        check_checkpoint(get_model("tiny-t2v-moe"), tiny_checkpoint("tiny-ti2v"))


def test_config_mismatch_names_the_config_file(checkpoint_copy):
    path = checkpoint_copy("tiny-t2v-moe")
    cfg_path = path / "transformer_2" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_layers"] = 40
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"transformer_2/config.json: num_layers is 40, but tiny-t2v-moe has 2"):
        check_checkpoint(get_model("tiny-t2v-moe"), path)
    cfg_path.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"transformer_2/config.json: is not valid JSON"):
        check_checkpoint(get_model("tiny-t2v-moe"), path)


def test_hub_id_without_network_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match=r"Wan-AI/Wan2.2-TI2V-5B-Diffusers: could not download"):
        resolve_checkpoint(get_model("ti2v-5b"), None, tmp_path)


def _to_original_wan_keys(state: dict) -> dict:
    """Write a diffusers Wan transformer state dict under the original Wan repository's key names."""
    import re

    renames = [("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
               ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
               ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
               ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
               ("condition_embedder.time_proj", "time_projection.1"), ("attn2", "cross_attn"), ("attn1", "self_attn"),
               (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
               ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"), ("proj_out", "head.head")]
    out = {}
    for key, value in state.items():
        new = key
        for a, b in renames:
            new = new.replace(a, b)
        new = "head.modulation" if new == "scale_shift_table" else re.sub(r"\.scale_shift_table$", ".modulation", new)
        new = new.replace(".norm2.", ".norm_swap.").replace(".norm3.", ".norm2.").replace(".norm_swap.", ".norm3.")
        out[new] = value
    return out


def test_single_file_transformer_in_original_wan_format_loads(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    spec, path = get_model("tiny-t2v-moe"), tiny_checkpoint("tiny-t2v-moe")
    state = load_file(path / "transformer_2" / "diffusion_pytorch_model.safetensors")
    single = tmp_path / "low_noise_model.safetensors"
    save_file(_to_original_wan_keys(state), single)
    # The low-noise expert's weights, given as a single file, replace transformer/ (the high-noise one).
    c = load_components(spec, path, "bf16", single_files={"transformer": str(single)})
    ref = load_components(spec, path, "bf16")
    got, want = c.experts[0].state_dict(), ref.experts[1].state_dict()
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in got)
    assert c.experts[0].scale_shift_table.dtype == torch.float32
    # a broken single file is named
    single.write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match=r"low_noise_model.safetensors: is corrupt"):
        load_components(spec, path, "bf16", single_files={"transformer": str(single)})
    with pytest.raises(CheckpointError, match=r"tiny-ti2v has no transformer_2"):
        load_components(get_model("tiny-ti2v"), tiny_checkpoint("tiny-ti2v"), single_files={"transformer_2": str(single)})


def test_the_variant_hint_counts_the_experts_and_never_names_the_model_itself(checkpoint_copy):
    """The guess compares every checked field and the number of transformers, and names only other variants."""
    path = checkpoint_copy("tiny-t2v-moe")
    cfg_path = path / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["ffn_dim"] = 256
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"ffn_dim is 256, but tiny-t2v-moe has 128: this is not a tiny-t2v-moe "
                                              r"checkpoint \(no known variant has 2 transformers of this shape\)"):
        check_checkpoint(get_model("tiny-t2v-moe"), path)

    # One transformer of tiny-t2v-moe's shape is no tiny-t2v-moe checkpoint (that has two): no variant matches.
    path = checkpoint_copy("tiny-i2v-moe")
    index_path = path / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"], index["transformer_2"] = "WanPipeline", [None, None]
    index_path.write_text(json.dumps(index))
    cfg_path = path / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["in_channels"] = 16  # now tiny-t2v-moe's transformer shape (in 16, out 16), declared once
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"in_channels is 16, but tiny-ti2v has 48: this is not a tiny-ti2v "
                                              r"checkpoint \(no known variant has 1 transformer of this shape\)"):
        check_checkpoint(get_model("tiny-ti2v"), path)
