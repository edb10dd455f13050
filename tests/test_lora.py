"""LoRA files in every shipped format, fused at load, against diffusers' load_lora_weights + fuse_lora on the same
tiny checkpoint (fp32, fused weights and final latents); the formats diffusers does not read against the same LoRA
in another format; the spec syntax; and the refusals (unmatched keys, shapes, DoRA/LoHa/LoKr)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import save_file

from artifex.config import OptimizationConfig
from artifex.engine.pipeline import Engine, initial_noise
from artifex.engine.request import GenerationRequest
from artifex.errors import InvalidRequestError
from artifex.models.loader import load_components
from artifex.models.lora import (
    LoraSpec,
    format_lora_specs,
    fuse_loras,
    original_name,
    parse_lora_spec,
    parse_lora_specs,
)
from artifex.models.registry import get_model

# diffusers' LoRA loading (the reference these tests compare with) needs peft (the [test] extra)
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")

RANK = 4


# -- LoRA files written from the tiny transformer's shapes ------------------------------------
def _canonical(model, seed: int, alpha: float = 2.0) -> dict[str, dict[str, torch.Tensor]]:
    """A random LoRA on every linear of the blocks: diffusers name -> down, up, alpha, diff_b; plus full deltas
    (diff, diff_b) on the output head, as LightX2V's files have."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("blocks."):
            out[name] = {"down": torch.randn(RANK, m.in_features, generator=g) * 0.2,
                         "up": torch.randn(m.out_features, RANK, generator=g) * 0.2,
                         "alpha": torch.tensor(alpha), "diff_b": torch.randn(m.out_features, generator=g) * 0.1}
    out["proj_out"] = {"diff": torch.randn(model.proj_out.weight.shape, generator=g) * 0.1,
                       "diff_b": torch.randn(model.proj_out.bias.shape, generator=g) * 0.1}
    return out


def _write(lora: dict, fmt: str, path) -> str:
    """``lora`` (from ``_canonical``) as one file format."""
    sd = {}
    for name, p in lora.items():
        orig = original_name(name)
        if fmt in ("peft", "peft-bare"):  # diffusers/PEFT: alpha folded into lora_A, bias deltas as lora_B.bias
            if "down" not in p:
                continue
            pre = "transformer." if fmt == "peft" else ""
            sd[f"{pre}{name}.lora_A.weight"] = p["down"] * (p["alpha"] / RANK)
            sd[f"{pre}{name}.lora_B.weight"] = p["up"]
            sd[f"{pre}{name}.lora_B.bias"] = p["diff_b"]
        elif fmt in ("lightx2v", "original-bare", "ai-toolkit"):
            pre = "" if fmt == "original-bare" else "diffusion_model."
            if "down" in p:
                if fmt == "ai-toolkit":  # lora_A/lora_B under original names, no alpha
                    sd[f"{pre}{orig}.lora_A.weight"] = p["down"] * (p["alpha"] / RANK)
                    sd[f"{pre}{orig}.lora_B.weight"] = p["up"]
                else:
                    sd[f"{pre}{orig}.lora_down.weight"] = p["down"]
                    sd[f"{pre}{orig}.lora_up.weight"] = p["up"]
                    sd[f"{pre}{orig}.alpha"] = p["alpha"]
            else:
                sd[f"{pre}{orig}.diff"] = p["diff"]
            sd[f"{pre}{orig}.diff_b"] = p["diff_b"]
        elif fmt == "musubi":  # Kohya names, lora_down/lora_up/alpha on every block linear, nothing else
            if "down" not in p:
                continue
            k = "lora_unet_" + orig.replace(".", "_")
            sd[f"{k}.lora_down.weight"] = p["down"]
            sd[f"{k}.lora_up.weight"] = p["up"]
            sd[f"{k}.alpha"] = p["alpha"]
        else:
            raise ValueError(fmt)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


def _fresh(model: str, tiny_checkpoint):
    return load_components(get_model(model), tiny_checkpoint(model), "fp32")


def _ours(model, tiny_checkpoint, specs):
    comps = _fresh(model, tiny_checkpoint)
    report = fuse_loras(comps.experts, specs, model)
    return [e.state_dict() for e in comps.experts], report


def _diffusers(model, tiny_checkpoint, loads):
    """diffusers' fused weights: ``loads`` = [(file, scale, expert index)]."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_checkpoint(model), dtype=torch.float32)
    for n, (file, scale, expert) in enumerate(loads):  # one at a time: fused, then its LoRA layers dropped
        pipe.load_lora_weights(file, adapter_name=f"a{n}", load_into_transformer_2=expert == 1)
        pipe.fuse_lora(components=["transformer_2" if expert == 1 else "transformer"], lora_scale=scale,
                       adapter_names=[f"a{n}"])
        pipe.unload_lora_weights()
    experts = [pipe.transformer] + ([pipe.transformer_2] if getattr(pipe, "transformer_2", None) else [])
    return [e.state_dict() for e in experts], pipe


def _assert_same_weights(ours, ref, base=None):
    assert set(ours) == set(ref)
    for k in ref:
        assert torch.allclose(ours[k], ref[k], rtol=1e-6, atol=1e-7), k
    if base is not None:  # the LoRA changed what it says it changes
        assert sum(not torch.equal(base[k], ref[k]) for k in ref) > 10


@needs_peft
@pytest.mark.parametrize("fmt", ["peft", "lightx2v", "ai-toolkit", "musubi"])
def test_one_expert_equals_diffusers_fuse_lora(fmt, tiny_checkpoint, tmp_path):
    base = _fresh("tiny-ti2v", tiny_checkpoint).experts[0]
    file = _write(_canonical(base, seed=1), fmt, tmp_path / f"{fmt}.safetensors")
    ours, report = _ours("tiny-ti2v", tiny_checkpoint, [LoraSpec(file, 0.7)])
    ref, _ = _diffusers("tiny-ti2v", tiny_checkpoint, [(file, 0.7, 0)])
    _assert_same_weights(ours[0], ref[0], base.state_dict())
    assert report[0]["file"] == file and report[0]["scale"] == 0.7 and report[0]["expert"] == "all"
    assert report[0]["layers"] == (21 if fmt in ("lightx2v", "ai-toolkit") else 20) and report[0]["fuse_s"] >= 0


@needs_peft
def test_two_experts_equal_diffusers_with_load_into_transformer_2(tiny_checkpoint, tmp_path):
    base = _fresh("tiny-t2v-moe", tiny_checkpoint).experts
    high = _write(_canonical(base[0], seed=2), "lightx2v", tmp_path / "high.safetensors")
    low = _write(_canonical(base[1], seed=3, alpha=8.0), "musubi", tmp_path / "low.safetensors")
    everywhere = _write(_canonical(base[0], seed=4), "peft", tmp_path / "all.safetensors")
    specs = parse_lora_specs(f"high={high}:0.8,low={low}:1.5,{everywhere}:0.3")
    ours, report = _ours("tiny-t2v-moe", tiny_checkpoint, specs)
    ref, _ = _diffusers("tiny-t2v-moe", tiny_checkpoint, [(high, 0.8, 0), (low, 1.5, 1), (everywhere, 0.3, 0),
                                                          (everywhere, 0.3, 1)])
    for i in range(2):
        _assert_same_weights(ours[i], ref[i], base[i].state_dict())
    assert [(r["expert"], r["expert_index"]) for r in report] == [("high", 0), ("low", 1), ("all", 0), ("all", 1)]


@needs_peft
def test_engine_fuses_at_load_and_matches_diffusers_latents(tiny_checkpoint, tmp_path):
    """End to end, fp32: the engine with high=/low= LoRAs gives diffusers' latents with the same LoRAs fused; the
    sidecar records what was fused."""
    base = _fresh("tiny-t2v-moe", tiny_checkpoint).experts
    high = _write(_canonical(base[0], seed=5), "lightx2v", tmp_path / "h.safetensors")
    low = _write(_canonical(base[1], seed=6), "lightx2v", tmp_path / "l.safetensors")
    eng = Engine.load("tiny-t2v-moe", config=OptimizationConfig(precision="fp32", tf32=False,
                                                                lora=f"high={high}:0.9,low={low}"))
    r = eng.generate(GenerationRequest(model="tiny-t2v-moe", prompt="a red kite", seed=3, steps=4, frames=5,
                                       output=str(tmp_path / "o.mp4")))
    _, pipe = _diffusers("tiny-t2v-moe", tiny_checkpoint, [(high, 0.9, 0), (low, 1.0, 1)])
    s = r.settings
    ref = pipe(prompt=s.prompt, negative_prompt=s.negative_prompt, height=s.height, width=s.width,
               num_frames=s.frames, num_inference_steps=s.steps, guidance_scale=s.guidance[0],
               guidance_scale_2=s.guidance[1], latents=initial_noise(get_model("tiny-t2v-moe"), s),
               output_type="latent", max_sequence_length=512).frames.float()
    assert ((r.latents - ref).norm() / ref.norm()).item() < 1e-4
    side = json.loads(r.sidecar_path.read_text())
    assert [(x["file"], x["scale"], x["expert"], x["layers"]) for x in side["lora"]] == [(high, 0.9, "high", 21),
                                                                                       (low, 1.0, "low", 21)]
    assert side["config"]["lora"] == f"high={high}:0.9,low={low}"


def test_formats_diffusers_does_not_read_equal_the_same_lora_in_another(tiny_checkpoint, tmp_path):
    base = _fresh("tiny-ti2v", tiny_checkpoint).experts[0]
    lora = _canonical(base, seed=7)
    for fmt, same_as in [("original-bare", "lightx2v"), ("peft-bare", "peft")]:
        a = _write(lora, fmt, tmp_path / f"{fmt}.safetensors")
        b = _write(lora, same_as, tmp_path / f"{same_as}.safetensors")
        ours_a, _ = _ours("tiny-ti2v", tiny_checkpoint, [LoraSpec(a, 1.2)])
        ours_b, _ = _ours("tiny-ti2v", tiny_checkpoint, [LoraSpec(b, 1.2)])
        _assert_same_weights(ours_a[0], ours_b[0], base.state_dict())


def test_scale_0_equals_no_lora(tiny_checkpoint, tmp_path):
    base = _fresh("tiny-ti2v", tiny_checkpoint).experts[0].state_dict()
    file = _write(_canonical(_fresh("tiny-ti2v", tiny_checkpoint).experts[0], seed=8), "lightx2v",
                  tmp_path / "x.safetensors")
    ours, report = _ours("tiny-ti2v", tiny_checkpoint, [LoraSpec(file, 0.0)])
    assert report[0]["layers"] == 21
    assert all(torch.equal(ours[0][k], base[k]) for k in base)


def test_deltas_diffusers_drops_are_applied(tiny_checkpoint, tmp_path):
    """Norm and modulation deltas (.diff / .diff_b), which diffusers' converter drops, land on their layers."""
    comps = _fresh("tiny-ti2v", tiny_checkpoint)
    m = comps.experts[0]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    g = torch.Generator().manual_seed(9)
    sd = {"diffusion_model.blocks.0.norm3.diff": torch.randn(64, generator=g),
          "diffusion_model.blocks.0.norm3.diff_b": torch.randn(64, generator=g),
          "diffusion_model.blocks.1.self_attn.norm_q.diff": torch.randn(64, generator=g),
          "diffusion_model.blocks.1.modulation.diff": torch.randn(1, 6, 64, generator=g),
          "diffusion_model.head.modulation.diff": torch.randn(1, 2, 64, generator=g),
          "diffusion_model.time_projection.1.diff_b": torch.randn(384, generator=g)}
    save_file(sd, str(tmp_path / "n.safetensors"))
    fuse_loras(comps.experts, [LoraSpec(str(tmp_path / "n.safetensors"), 0.5)])
    after = m.state_dict()
    for key, target in [("blocks.0.norm3.diff", "blocks.0.norm2.weight"), ("blocks.0.norm3.diff_b", "blocks.0.norm2.bias"),
                        ("blocks.1.self_attn.norm_q.diff", "blocks.1.attn1.norm_q.weight"),
                        ("blocks.1.modulation.diff", "blocks.1.scale_shift_table"),
                        ("head.modulation.diff", "scale_shift_table"),
                        ("time_projection.1.diff_b", "condition_embedder.time_proj.bias")]:
        assert torch.allclose(after[target], before[target] + 0.5 * sd[f"diffusion_model.{key}"], atol=1e-6), key
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert len(changed) == 6


def test_peft_metadata_alpha_scales_the_lora(tiny_checkpoint, tmp_path):
    model = _fresh("tiny-ti2v", tiny_checkpoint).experts[0]
    lora = _canonical(model, seed=10, alpha=float(RANK))  # alpha = rank: the file holds the plain product
    file = _write(lora, "peft", tmp_path / "p.safetensors")
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta_file = str(tmp_path / "meta.safetensors")
    save_file(tensors, meta_file, metadata={"lora_adapter_metadata": json.dumps(
        {"transformer.r": RANK, "transformer.lora_alpha": 2 * RANK})})
    halved = {k: v * 2 for k, v in tensors.items() if k.endswith(("lora_A.weight", "lora_B.bias"))}
    save_file({**tensors, **halved}, str(tmp_path / "x2.safetensors"))
    a, _ = _ours("tiny-ti2v", tiny_checkpoint, [LoraSpec(meta_file)])
    b, _ = _ours("tiny-ti2v", tiny_checkpoint, [LoraSpec(str(tmp_path / "x2.safetensors"))])
    _assert_same_weights(a[0], b[0])


# -- refusals ---------------------------------------------------------------------------------
def _file(tmp_path, sd, name="bad.safetensors"):
    save_file(sd, str(tmp_path / name))
    return str(tmp_path / name)


def test_unmatched_keys_are_refused_by_name(tiny_checkpoint, tmp_path):
    good = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(RANK, 64),
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(64, RANK)}
    bad = {**good, "diffusion_model.blocks.7.self_attn.q.lora_down.weight": torch.zeros(RANK, 64),
           "diffusion_model.blocks.0.self_attn.qq.lora_up.weight": torch.zeros(64, RANK),
           "text_encoder.encoder.block.0.lora_A.weight": torch.zeros(RANK, 64)}
    comps = _fresh("tiny-ti2v", tiny_checkpoint)
    with pytest.raises(InvalidRequestError, match=r"lora: .*3 of its 5 keys match no layer of the model: "
                       r"diffusion_model.blocks.0.self_attn.qq.lora_up.weight, diffusion_model.blocks.7.self_attn.q"
                       r".lora_down.weight, text_encoder.encoder.block.0.lora_A.weight"):
        fuse_loras(comps.experts, [LoraSpec(_file(tmp_path, bad))])
    nothing = {"lora_te_text_model_encoder_layers_0_q.lora_down.weight": torch.zeros(RANK, 64)}
    with pytest.raises(InvalidRequestError, match=r"1 of its 1 keys match no layer"):
        fuse_loras(comps.experts, [LoraSpec(_file(tmp_path, nothing, "te.safetensors"))])
    # Mixing diffusers and original names in one file: the other style's keys are named.
    mixed = {**good, "blocks.0.attn1.to_k.lora_A.weight": torch.zeros(RANK, 64),
             "blocks.0.attn1.to_k.lora_B.weight": torch.zeros(64, RANK)}
    with pytest.raises(InvalidRequestError, match=r"2 of its 4 keys match no layer.*blocks.0.attn1.to_k.lora_A"):
        fuse_loras(comps.experts, [LoraSpec(_file(tmp_path, mixed, "mixed.safetensors"))])
    assert not hasattr(comps.experts[0], "_artifex_loras")  # nothing was fused


@pytest.mark.parametrize("sd, pattern", [
    ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(RANK, 32),
      "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(32, RANK)},
     r"lora_up.weight \(32, 4\) and .*lora_down.weight \(4, 32\) do not make a delta for blocks.0.attn1.to_q \(64, 64\)"),
    ({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(64, RANK)},
     r"self_attn.q.lora_up.weight has no lora_down beside it"),
    ({"diffusion_model.head.head.diff": torch.zeros(3, 3)}, r"head.head.diff has shape \(3, 3\), the layer \(192, 64\)"),
    ({"diffusion_model.blocks.0.self_attn.norm_q.diff_b": torch.zeros(64)},
     r"norm_q.diff_b is a bias delta, but blocks.0.attn1.norm_q has no bias"),
    ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(RANK, 64),
      "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(64, RANK),
      "diffusion_model.blocks.0.self_attn.q.dora_scale": torch.zeros(64, 1)}, r"is a DoRA adapter \(.*dora_scale\)"),
    ({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(RANK, 64),
      "transformer.blocks.0.attn1.to_q.lora_magnitude_vector": torch.zeros(64)}, r"is a DoRA adapter"),
    ({"lora_unet_blocks_0_self_attn_q.hada_w1_a": torch.zeros(64, RANK)}, r"is a LoHa adapter"),
    ({"lora_unet_blocks_0_self_attn_q.lokr_w1": torch.zeros(8, 8)}, r"is a LoKr adapter"),
])
def test_bad_files_are_refused(sd, pattern, tiny_checkpoint, tmp_path):
    comps = _fresh("tiny-ti2v", tiny_checkpoint)
    with pytest.raises(InvalidRequestError, match=pattern):
        fuse_loras(comps.experts, [LoraSpec(_file(tmp_path, sd))])


def test_a_missing_or_unreadable_file_and_one_expert_targets(tiny_checkpoint, tmp_path):
    comps = _fresh("tiny-ti2v", tiny_checkpoint)
    with pytest.raises(InvalidRequestError, match=r"lora: /nope.safetensors does not exist"):
        fuse_loras(comps.experts, [LoraSpec("/nope.safetensors")])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidRequestError, match=r"junk.safetensors is not a readable safetensors file"):
        fuse_loras(comps.experts, [LoraSpec(str(tmp_path / "junk.safetensors"))])
    with pytest.raises(InvalidRequestError, match=r"tiny-ti2v has one expert; drop the high= prefix"):
        fuse_loras(comps.experts, [LoraSpec("/x.safetensors", 1.0, "high")], "tiny-ti2v")


def test_components_carrying_loras_are_not_fused_twice(tiny_checkpoint, tmp_path):
    comps = _fresh("tiny-ti2v", tiny_checkpoint)
    file = _write(_canonical(comps.experts[0], seed=11), "lightx2v", tmp_path / "a.safetensors")
    first = fuse_loras(comps.experts, [LoraSpec(file, 0.5)])
    once = {k: v.clone() for k, v in comps.experts[0].state_dict().items()}
    assert fuse_loras(comps.experts, [LoraSpec(file, 0.5)]) == first
    assert all(torch.equal(v, once[k]) for k, v in comps.experts[0].state_dict().items())
    with pytest.raises(InvalidRequestError, match=r"already carry the LoRAs"):
        fuse_loras(comps.experts, [LoraSpec(file, 0.6)])
    with pytest.raises(InvalidRequestError, match=r"already carry the LoRAs"):
        fuse_loras(comps.experts, [])


# -- the spec syntax --------------------------------------------------------------------------
@pytest.mark.parametrize("text, spec", [
    ("a.safetensors", LoraSpec("a.safetensors", 1.0, "all")),
    ("high=/w/lightx2v_high.safetensors:0.8", LoraSpec("/w/lightx2v_high.safetensors", 0.8, "high")),
    ("low=b.safetensors:2", LoraSpec("b.safetensors", 2.0, "low")),
    (" c.safetensors:-0.5 ", LoraSpec("c.safetensors", -0.5, "all")),
    ("dir:x/y.safetensors", LoraSpec("dir:x/y.safetensors", 1.0, "all")),
    ("/loras/a=b.safetensors", LoraSpec("/loras/a=b.safetensors", 1.0, "all")),
])
def test_spec_syntax(text, spec):
    assert parse_lora_spec(text) == spec
    assert parse_lora_spec(str(spec)) == spec


@pytest.mark.parametrize("text, pattern", [
    ("mid=a.safetensors", r"lora: unknown expert target 'mid'.*\(allowed: all, high, low\)"),
    ("a.safetensors:inf", r"lora: a.safetensors: the scale must be a finite number"),
    ("high=", r"lora: a LoRA spec needs a file"),
])
def test_bad_specs_are_refused(text, pattern):
    with pytest.raises(InvalidRequestError, match=pattern):
        parse_lora_spec(text)
    with pytest.raises(InvalidRequestError, match=pattern):
        OptimizationConfig(lora=text)


def test_specs_list_and_config_field():
    specs = parse_lora_specs("high=h.safetensors:0.8, low=l.safetensors,all.safetensors:0.3")
    assert specs == (LoraSpec("h.safetensors", 0.8, "high"), LoraSpec("l.safetensors", 1.0, "low"),
                     LoraSpec("all.safetensors", 0.3, "all"))
    assert parse_lora_specs(["high=h.safetensors:0.8", "x.safetensors"])[1] == LoraSpec("x.safetensors")
    assert format_lora_specs(specs) == "high=h.safetensors:0.8,low=l.safetensors,all.safetensors:0.3"
    assert parse_lora_specs("") == () and parse_lora_specs(None) == ()
    cfg = OptimizationConfig(lora="high=h.safetensors:0.8")
    assert cfg.to_dict()["lora"] == "high=h.safetensors:0.8" and cfg.hash() != OptimizationConfig().hash()
    assert 'lora = "high=h.safetensors:0.8"' in cfg.to_toml()
