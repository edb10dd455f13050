"""Expert swapping in the swap tiers (engine/placement.py): CPU homes, no copy back, prefetch, pinned packing.

There is no CUDA here, so a "device copy" is made distinct CPU memory by replacing
``Placement._to_device`` with a clone: what a CUDA device does to the homes (fresh copies
in, rebinding out) is then visible in data pointers. Pinning and the side stream need CUDA
and are not run here; the packing of pinned chunks runs on an ordinary buffer.
"""

from __future__ import annotations

import pytest
import torch

from artifex.config import OptimizationConfig
from artifex.engine import placement as placement_mod
from artifex.engine.memory import GIB, choose_tier, estimate, prefetch_fits, prefetch_peak, tiers_for, weights_of
from artifex.engine.request import GenerationRequest
from artifex.models.configs import meta_components
from artifex.models.registry import get_model

REQ = dict(model="tiny-t2v-moe", prompt="a boat on a river", seed=3, steps=4, frames=5)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _tensors(module):
    """Every parameter and buffer of ``module`` (by name)."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _ptrs(module):
    return {n: t.data_ptr() for n, t in _tensors(module).items()}


def _swap_engine(tier="expert_swap", **fields):
    """A fresh engine (not the session's cached ones: its placement is patched) whose device copies are clones.
    ``copies`` gets, for each tensor copied in, the experts that were on the "device" (not in their homes)."""
    from artifex.engine.pipeline import Engine

    eng = Engine.load("tiny-t2v-moe", config=OptimizationConfig(precision="fp32", tf32=False, memory_tier=tier,
                                                                 **fields))
    homes = [_ptrs(e) for e in eng.c.experts]
    copies = []

    def to_device(t):
        copies.append(tuple(i for i, e in enumerate(eng.c.experts) if _ptrs(e) != homes[i]))
        return t.clone()

    eng.placement._to_device = to_device
    return eng, copies


def _run(eng, tmp_path, name):
    return eng.generate(GenerationRequest(output=str(tmp_path / name), **REQ))


@pytest.mark.parametrize("tier", ["expert_swap", "model_offload"])
def test_a_swap_binds_copies_in_and_the_homes_out(engine, tmp_path, tier):
    base = _run(engine("tiny-t2v-moe", precision="fp32", tf32=False), tmp_path, "a.mp4")
    eng, copies = _swap_engine(tier)
    experts = eng.c.experts
    homes = [_ptrs(e) for e in experts]  # on a CPU the homes are the loaded weights themselves
    values = [{n: t.clone() for n, t in _tensors(e).items()} for e in experts]
    r = _run(eng, tmp_path, "b.mp4")
    assert r.switch_step is not None and 0 < r.switch_step < len(r.experts_per_step)
    assert _rel(r.latents, base.latents) < 1e-6
    n = len(eng.placement._homes[0].tensors)
    assert len(copies) == 2 * n  # each expert copied in once, nothing copied back
    assert _ptrs(experts[0]) == homes[0]  # expert 0 left at the switch: rebound to its home
    if tier == "expert_swap":  # expert 1 is still on the "device": copies, not its home
        assert all(p != homes[1][k] for k, p in _ptrs(experts[1]).items())
    else:  # parked before the decode
        assert _ptrs(experts[1]) == homes[1]
    # a second request swaps again into the same CPU storage: no new host memory, nothing copied back
    r2 = _run(eng, tmp_path, "c.mp4")
    assert torch.equal(r2.latents, r.latents)
    assert _ptrs(experts[0]) == homes[0]
    eng.placement.release()
    for e, home, before in zip(experts, homes, values, strict=True):
        tensors = _tensors(e)
        assert all(t.device.type == "cpu" for t in tensors.values())
        assert all(isinstance(p, torch.nn.Parameter) for p in e.parameters())
        assert _ptrs(e) == home
        assert all(torch.equal(tensors[k], v) for k, v in before.items())  # the homes were never written
    assert eng.placement.active_expert is None and not eng.placement._prefetched


def test_prefetch_copies_the_next_expert_during_the_last_step_before_the_switch(engine, tmp_path, monkeypatch):
    import artifex.engine.memory_guard as pipeline  # where the memory policy asks the planner

    base = _run(engine("tiny-t2v-moe", precision="fp32", tf32=False), tmp_path, "a.mp4")
    eng, copies = _swap_engine()
    n = len(eng.placement._homes[0].tensors)
    started = []
    prefetch = eng.placement.prefetch_expert
    eng.placement.prefetch_expert = lambda i: started.append(prefetch(i)) or started[-1]
    r = _run(eng, tmp_path, "b.mp4")  # a CPU has no budget: no room, no prefetch
    assert started == [False] and copies == [()] * 2 * n  # expert 1 copied after expert 0 went home
    assert r.memory["expert_prefetch"] is False
    monkeypatch.setattr(pipeline, "prefetch_fits", lambda *a: True)  # as the planner says where both fit
    copies.clear(), started.clear()
    r = _run(eng, tmp_path, "c.mp4")
    assert started == [True] and r.memory["expert_prefetch"] is True
    # expert 0 copied in at the start (expert 1, left from the last request, sent home first), expert 1 while
    # expert 0 was still on the device: before its last step
    assert copies == [()] * n + [(0,)] * n and not eng.placement._prefetched
    assert _rel(r.latents, base.latents) < 1e-6
    eng.placement.release()
    assert not eng.placement.prefetch_room


def test_a_prefetch_is_dropped_by_release_and_by_the_next_request():
    from artifex.engine.pipeline import Engine

    eng = Engine.load("tiny-t2v-moe", config=OptimizationConfig(precision="fp32", memory_tier="model_offload"))
    p = eng.placement
    p._to_device = torch.Tensor.clone
    homes = [_ptrs(e) for e in eng.c.experts]
    home = homes[1]
    assert not p.prefetch_expert(1)  # no room
    p.set_prefetch_room(True)
    p.activate_expert(0)
    assert p.prefetch_expert(1) and not p.prefetch_expert(1) and not p.prefetch_expert(0)
    assert _ptrs(eng.c.experts[1]) == home  # copied, but not bound before activate_expert
    p.set_prefetch_room(False)
    assert not p._prefetched
    p.set_prefetch_room(True)
    p.prefetch_expert(1)
    p.park_experts()
    assert not p._prefetched and p.active_expert is None
    p.prefetch_expert(1)
    p.move_to("expert_swap")  # an OOM step-down: release, apply
    assert not p._prefetched and not p.prefetch_room
    assert [_ptrs(e) for e in eng.c.experts] == homes


def test_fp8_weights_storage_swaps_like_the_resident_run(engine, tmp_path):
    base = _run(engine("tiny-t2v-moe", precision="fp32", tf32=False, fp8_weights=True), tmp_path, "a.mp4")
    eng, copies = _swap_engine(fp8_weights=True)
    homes = eng.placement._homes
    linear = eng.c.experts[0].blocks[0].ffn.net[2].weight
    assert linear.dtype == torch.float8_e4m3fn
    assert any(t.dtype == torch.float8_e4m3fn for t in homes[0].tensors)  # the homes hold the fp8 storage
    home_ptrs = [_ptrs(e) for e in eng.c.experts]
    r = _run(eng, tmp_path, "b.mp4")
    assert _rel(r.latents, base.latents) < 1e-6
    r2 = _run(eng, tmp_path, "c.mp4")
    assert torch.equal(r2.latents, r.latents)
    assert _ptrs(eng.c.experts[0]) == home_ptrs[0] and linear.dtype == torch.float8_e4m3fn
    eng.placement.release()
    for e, h in zip(eng.c.experts, home_ptrs, strict=True):
        assert _ptrs(e) == h
    assert eng.c.experts[1].blocks[0].ffn.net[2].weight.dtype == torch.float8_e4m3fn


class _Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(24, 40)
        self.b = torch.nn.Linear(24, 40, bias=False)
        self.b.weight = self.a.weight  # tied: one Parameter in two modules
        self.norm = torch.nn.LayerNorm(40)
        self.register_buffer("table", torch.randn(300, 7).to(torch.bfloat16))
        self.c = torch.nn.Module()
        self.c.register_buffer("table", self.table)  # a buffer held by two modules
        self.c.register_buffer("none", None)
        self.register_buffer("scale", torch.tensor(2.0))
        self.f8 = torch.nn.Parameter(torch.randn(64, 16).to(torch.float8_e4m3fn), requires_grad=False)
        self.empty = torch.nn.Parameter(torch.empty(0, 5))


def test_pinned_packing_tied_weights_and_buffers(monkeypatch):
    """The pinned-chunk packing, on ordinary memory: values, dtypes and shapes kept, ties kept, chunks bounded."""
    chunks = []

    def fake_pinned(nbytes):
        chunks.append(torch.zeros(nbytes, dtype=torch.uint8))
        return chunks[-1]

    monkeypatch.setattr(placement_mod, "_pinned_buffer", fake_pinned)
    monkeypatch.setattr(placement_mod, "PIN_CHUNK", 4096)
    m = _Tied()
    before = {n: t.clone() for n, t in _tensors(m).items()}
    params = {n: p for n, p in m.named_parameters(remove_duplicate=False)}
    home = placement_mod._Home(m, pin=True)
    assert len(home.tensors) == 8  # a.weight (b.weight: the same), a.bias, norm w+b, table (c.table), scale, f8, empty
    # chunks of at most PIN_CHUNK bytes, but for a tensor larger than one: its own (the table: 4200 bytes)
    assert sorted(c.numel() for c in chunks)[-2] <= 4096 and max(c.numel() for c in chunks) == 4608
    assert home.pinned_bytes == sum(c.numel() for c in chunks)
    assert m.b.weight is m.a.weight is params["a.weight"] and m.c.table is m.table
    storages = {c.untyped_storage().data_ptr() for c in chunks}
    for n, t in _tensors(m).items():
        assert t.dtype == before[n].dtype and t.shape == before[n].shape
        assert t.untyped_storage().data_ptr() in storages  # bound to a view of a chunk
        assert torch.equal(t.float(), before[n].float())
    assert m.c.none is None and m.a.weight.requires_grad and not m.f8.requires_grad
    # device copies in, the homes out: the tied weight and the shared buffer move together
    pinned = _ptrs(m)
    home.bind([t.clone() for t in home.tensors])
    assert m.b.weight is m.a.weight and m.c.table is m.table
    assert all(p != pinned[n] for n, p in _ptrs(m).items() if n != "empty")
    home.bind(home.tensors)
    assert _ptrs(m) == pinned and m.c.table is m.table
    out = m.b(torch.ones(2, 24))
    assert out.shape == (2, 40)


def test_pinning_without_cuda_leaves_the_homes_pageable(caplog):
    m = _Tied()
    ptrs = _ptrs(m)
    home = placement_mod._Home(m, pin=True)  # no pinned allocator here: a warning, nothing changes
    assert home.pinned_bytes == 0 and _ptrs(m) == ptrs
    assert "pinning expert weights failed" in caplog.text


def test_prefetch_room_for_the_real_shapes():
    t2v = get_model("t2v-a14b")
    w = weights_of(*meta_components(t2v))
    ests = [estimate(t2v, w, t, 1280, 720, 81) for t in tiers_for(t2v)]
    swap = next(e for e in ests if e.tier == "expert_swap")
    # an 80 GB H100 swaps for the decode: both experts fit while denoising, so the next one is prefetched
    assert choose_tier(ests, 80 * GIB)[0] == "expert_swap" and prefetch_fits(swap, w, 80 * GIB)
    assert 60 * GIB < prefetch_peak(swap, w) < 70 * GIB
    # with 64 GiB the swap is still the tier, but the denoise has no room for a second expert
    assert choose_tier(ests, 64 * GIB)[0] == "expert_swap" and not prefetch_fits(swap, w, 64 * GIB)
    assert not prefetch_fits(swap, w, None)  # a CPU
    assert not prefetch_fits(ests[0], w, 141 * GIB)  # resident: nothing to prefetch


@pytest.mark.slow
def test_the_gpu_check_script_runs_the_swap_tiers_and_finds_them_equal(tmp_path, artifex_home):
    """scripts/check_expert_swap.py (the GPU check of pinned swaps) on the CPU's plain path: every tier's latents
    equal the resident run's, exit status 0, the JSON written."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "check_expert_swap.py"
    out = tmp_path / "swap.json"
    p = subprocess.run([sys.executable, str(script), "--steps", "4", "--size", "128x64", "--frames", "5",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [r["tier"] for r in data["tiers"]] == ["resident", "expert_swap", "model_offload"]
    assert data["equal"] and all(r["max_abs_diff_vs_resident"] == 0.0 for r in data["tiers"])
    assert all(r["switch_step"] is not None for r in data["tiers"])


def test_homes_pack_anew_what_a_mostly_dead_pinned_chunk_still_holds(monkeypatch):
    """Weights read into pinned chunks (fast_read) keep a chunk locked while any of them lives: a home whose
    tensors fill less than REPACK_BELOW of their chunk (the rest replaced after the read, as q/k/v fusion does)
    copies them into new chunks, so the old one can go; a chunk still full stays as it is, nothing copied."""
    chunks: list[torch.Tensor] = []  # the homes' new chunks
    pinned = set()  # the storages this test plays as pinned: the read's chunks below and the homes' new ones

    def fake_pinned(nbytes):
        chunks.append(torch.zeros(nbytes, dtype=torch.uint8))
        pinned.add(chunks[-1].untyped_storage().data_ptr())
        return chunks[-1]

    monkeypatch.setattr(placement_mod, "_pinned_buffer", fake_pinned)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *a: self.untyped_storage().data_ptr() in pinned)

    def read_into_chunk(m: torch.nn.Module) -> torch.Tensor:
        """m's parameters moved into one chunk, as a pinned read leaves them."""
        params = list(m.parameters())
        chunk = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32)
        pinned.add(chunk.untyped_storage().data_ptr())
        offset = 0
        for p in params:
            p.data = chunk[offset:offset + p.numel()].view(p.shape).copy_(p.data)
            offset += p.numel()
        return chunk

    full, fused = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)), torch.nn.Linear(8, 8)
    full_chunk = read_into_chunk(full)
    fused_chunk = read_into_chunk(torch.nn.Sequential(fused, torch.nn.Linear(64, 64)))  # the 64x64 layer: "replaced"
    before = {n: t.clone() for n, t in _tensors(fused).items()}

    kept = placement_mod._Home(full, pin=True)
    assert kept.pinned_bytes == 0 and not chunks  # a full chunk: its tensors stay where they are
    assert all(t.untyped_storage().data_ptr() == full_chunk.untyped_storage().data_ptr() for t in kept.tensors)

    # small tensors as fast_read.pack lays them out (each at a 512-byte boundary): a full chunk too
    small = torch.nn.Module()
    layout = placement_mod.fast_read.pack([4] * 6)
    (used, members), = layout
    packed = torch.zeros(used, dtype=torch.uint8)
    pinned.add(packed.untyped_storage().data_ptr())
    for k, offset in members:
        small.register_buffer(f"s{k}", packed[offset:offset + 4].view(torch.float32).view(()).fill_(k))
    assert placement_mod._Home(small, pin=True).pinned_bytes == 0 and not chunks

    moved = placement_mod._Home(fused, pin=True)
    assert moved.pinned_bytes == sum(c.numel() for c in chunks) > 0
    assert all(t.untyped_storage().data_ptr() == chunks[-1].untyped_storage().data_ptr() for t in moved.tensors)
    assert all(p.untyped_storage().data_ptr() != fused_chunk.untyped_storage().data_ptr() for p in fused.parameters())
    assert all(torch.equal(t, before[n]) for n, t in _tensors(fused).items())
