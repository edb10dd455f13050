"""Reading each component straight to its device (load_components' ``devices``), decided from the plan before any
weight is read. On a CPU-only machine the device path is read to "cpu" and compared with the default loader."""

from __future__ import annotations

import pytest
import torch

from artifex.config import OptimizationConfig
from artifex.engine.placement import TIERS, load_devices
from artifex.engine.plan import make_plan, plan_before_load
from artifex.models.loader import DTYPES, PINNED, load_components
from artifex.models.registry import get_model

ROLES = ("transformer", "transformer_2", "vae", "text_encoder")


def _tensors(module) -> dict[str, torch.Tensor]:
    out = {f"param:{k}": v for k, v in module.named_parameters(remove_duplicate=False)}
    out |= {f"buffer:{k}": v for k, v in module.named_buffers(remove_duplicate=False)}
    return out


def _ties(module) -> set[tuple[str, ...]]:
    groups: dict[int, list[str]] = {}
    for k, v in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(v), []).append(k)
    return {tuple(sorted(g)) for g in groups.values() if len(g) > 1}


@pytest.mark.parametrize("model, precision, place", [("tiny-t2v-moe", "bf16", "cpu"), ("tiny-ti2v", "bf16", "cpu"),
                                                    ("tiny-ti2v", "fp16", "cpu"), ("tiny-t2v-moe", "bf16", PINNED)])
def test_device_path_reads_the_same_weights_as_the_default_loader(tiny_checkpoint, monkeypatch, model, precision,
                                                                  place):
    """The device path reads with fast_read (ARTIFEX_FAST_READ's default): the models it builds equal the
    libraries' from_pretrained ones, tensor for tensor, dtypes (the fp32-kept modules of both libraries, fp16's
    included), ties and configs. PINNED: the same, read into (here: played) pinned chunks, which the models keep."""
    from artifex.models import fast_read

    spec = get_model(model)
    path = tiny_checkpoint(model)
    plain = load_components(spec, path, precision)
    chunks = []
    if place == PINNED:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(fast_read, "pinned_buffer", lambda n: chunks.append(torch.empty(n, dtype=torch.uint8))
                            or chunks[-1])
    direct = load_components(spec, path, precision, devices={r: place for r in ROLES})
    if place == PINNED:  # each expert's weights stored in their load dtype stay in the chunks they were read into
        storages, kept = {c.untyped_storage().data_ptr() for c in chunks}, 0
        for role, expert in zip(ROLES, direct.experts, strict=False):
            stored = fast_read.read_header(path / role / "diffusion_pytorch_model.safetensors")[1]
            for name, t in expert.state_dict().items():
                if fast_read.DTYPES[stored[name]["dtype"]] == t.dtype:
                    assert t.untyped_storage().data_ptr() in storages, name
                    kept += 1
        assert kept > 10
    pairs = [(plain.text_encoder, direct.text_encoder), (plain.vae, direct.vae),
             *zip(plain.experts, direct.experts, strict=True)]
    for a, b in pairs:
        ta, tb = _tensors(a), _tensors(b)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert tb[k].device.type == "cpu", k
            assert ta[k].dtype == tb[k].dtype, k  # the fp32-kept modules stay fp32 on both paths
            assert torch.equal(ta[k], tb[k]), k
        assert _ties(a) == _ties(b)  # tied weights (the text encoder's embeddings) stay one tensor
        assert a.config == b.config and not b.training
    # Some tensors are kept in fp32 while the rest is bf16: the comparison covered both kinds.
    dtypes = {t.dtype for t in _tensors(direct.experts[0]).values()}
    assert {DTYPES[precision], torch.float32} <= dtypes
    if precision == "fp16":  # transformers keeps UMT5's "wo" in fp32 at fp16 only
        assert {torch.float16, torch.float32} <= {t.dtype for t in direct.text_encoder.parameters()}
    assert {t.dtype for t in direct.vae.parameters()} == {torch.float32}
    assert set(direct.timings) == {"checkpoint_check", "read.vae", "read.text_encoder",
                                   *(f"read.{r}" for r in ROLES[:spec.experts])}


def test_each_tier_reads_components_to_where_it_keeps_them():
    """To the GPU what the tier keeps there, to pinned host memory an on-demand text encoder; the other homes
    to the CPU (left out), for the placement to pin."""
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert load_devices("resident", cpu) == {}  # on a CPU everything is read as before
    assert load_devices("resident", gpu) == {r: "cuda:0" for r in ROLES}
    assert load_devices("text_offload", gpu) == {"text_encoder": PINNED, "vae": "cuda:0", "transformer": "cuda:0",
                                                 "transformer_2": "cuda:0"}
    # the experts' homes are in host memory: read there, pinned by the placement once q/k/v are fused
    assert load_devices("expert_swap", gpu) == {"text_encoder": PINNED, "vae": "cuda:0"}
    for tier in ("model_offload", "block_offload", "leaf_offload"):  # the VAE too: cast and re-laid-out first
        assert load_devices(tier, gpu) == {"text_encoder": PINNED}
    # fp8 weight storage casts the experts in host memory, so the device never holds their bf16 copy.
    assert load_devices("resident", gpu, fp8_weights=True) == {"text_encoder": "cuda:0", "vae": "cuda:0"}
    assert load_devices("model_offload", gpu, fp8_weights=True) == {"text_encoder": PINNED}
    assert set(TIERS) == {"resident", "text_offload", "expert_swap", "model_offload", "block_offload",
                          "leaf_offload"}  # a new tier needs a line above


@pytest.mark.parametrize("budget", [None, "64GB"])
def test_the_tier_decided_before_loading_is_the_tier_after(tiny_checkpoint, budget):
    """The planner needs only shapes: the plan made before reading weights matches the one made on them."""
    spec = get_model("t2v-a14b") if budget == "64GB" else get_model("tiny-t2v-moe")
    config = OptimizationConfig(device="cpu", vram_budget=budget)
    before = plan_before_load(spec, config)
    if spec.tiny:
        loaded = load_components(spec, tiny_checkpoint(spec.name), "bf16")
        after = make_plan(spec, config, loaded)
        assert (before.placement, before.vae_tiling) == (after.placement, after.vae_tiling)
    else:  # a real model's plan from its shapes alone: 64 GB takes an offload tier for A14B's two 27 GiB experts
        assert before.placement not in ("resident", "text_offload")


def test_engine_load_records_its_stages(engine):
    eng = engine("tiny-ti2v")
    assert {"resolve", "checkpoint_check", "checkpoint_read", "plan", "placement"} <= set(eng.load_timings)
    assert "plan_before_load" not in eng.load_timings  # on a CPU nothing is planned before reading
    assert eng.load_s >= sum(eng.load_timings.values()) - 1e-3


def test_on_demand_text_encoder_and_vae_return_to_their_homes(engine):
    """model_offload: the text encoder and VAE come to the device from a home taken once and go back to it (no
    copy back); the results equal the resident engine's; a module changed since gets a fresh home."""
    resident = engine("tiny-ti2v", text_cache_size=0)
    offload = engine("tiny-ti2v", text_cache_size=0, memory_tier="model_offload")
    assert offload.plan.placement == "model_offload"
    assert any("text encoder" in r and "copied in for each encode" in r for r in offload.plan.reasons)
    enc = offload.c.text_encoder
    a = offload.encode_text(["a harbour at dawn"])
    home = offload.placement._module_homes[id(enc)]
    assert home.holds(enc)  # after the encode the module points at its home again
    offload.encode_text(["another prompt"])
    assert offload.placement._module_homes[id(enc)] is home and home.holds(enc)  # taken once, bound back
    assert torch.equal(a, resident.encode_text(["a harbour at dawn"]))
    z = torch.randn(1, 48, 2, 4, 6, generator=torch.Generator().manual_seed(0))  # two latent frames, 64x96 pixels
    vae_home = offload.placement._module_homes[id(offload.c.vae)]
    assert torch.equal(offload.decode(z), resident.decode(z))
    assert offload.placement._module_homes[id(offload.c.vae)] is vae_home and vae_home.holds(offload.c.vae)
    # Weights changed behind the placement's back (a cast): the old home is not bound again.
    enc.to(torch.float32)
    assert not home.holds(enc)
    offload.encode_text(["a third prompt"])
    fresh = offload.placement._module_homes[id(enc)]
    assert fresh is not home and fresh.holds(enc) and next(enc.parameters()).dtype == torch.float32
    enc.to(torch.bfloat16)


def test_shards_read_on_threads_give_the_same_weights(checkpoint_copy, monkeypatch):
    """HF_ENABLE_PARALLEL_LOADING (the default import_libraries sets): a transformer saved in several shards reads
    to the same tensors, dtypes included, on diffusers' shard threads as in its serial read."""
    import diffusers.models.modeling_utils as mu
    from diffusers import WanTransformer3DModel

    spec = get_model("tiny-ti2v")
    path = checkpoint_copy("tiny-ti2v")
    model = WanTransformer3DModel.from_pretrained(path, subfolder="transformer")
    model.save_pretrained(path / "transformer", max_shard_size="200KB")
    assert len(list((path / "transformer").glob("*.safetensors"))) > 2
    monkeypatch.setenv("ARTIFEX_FAST_READ", "off")  # diffusers' own reader
    monkeypatch.setattr(mu, "HF_ENABLE_PARALLEL_LOADING", False)
    serial = load_components(spec, path, "bf16", devices={r: "cpu" for r in ROLES})
    monkeypatch.setattr(mu, "HF_ENABLE_PARALLEL_LOADING", True)
    pooled, calls = mu._load_shard_files_with_threadpool, []
    monkeypatch.setattr(mu, "_load_shard_files_with_threadpool", lambda files, **kw: calls.append(files) or
                        pooled(files, **kw))
    threaded = load_components(spec, path, "bf16", devices={r: "cpu" for r in ROLES})
    assert any(len(files) > 2 for files in calls)  # the transformer's shards went to the thread pool
    a, b = _tensors(serial.experts[0]), _tensors(threaded.experts[0])
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert {torch.bfloat16, torch.float32} <= {t.dtype for t in b.values()}
    monkeypatch.setenv("ARTIFEX_FAST_READ", "on")  # and fast_read's, shard after shard
    c = _tensors(load_components(spec, path, "bf16", devices={r: "cpu" for r in ROLES}).experts[0])
    assert c.keys() == a.keys() and all(a[k].dtype == c[k].dtype and torch.equal(a[k], c[k]) for k in a)
