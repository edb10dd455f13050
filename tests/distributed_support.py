"""Helpers for the torch.distributed tests: gloo worker processes that run parallel generations on tiny models.

Each worker joins a gloo world, loads the tiny checkpoint through ``Engine.load`` like any
user would, and for each case builds the layout's groups, applies it, generates, saves its
latents (and what it wrote) to ``outdir``, and takes the layout off again. ``vae_worker``
runs the split VAE decode alone on a seeded tiny VAE.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

FP32 = {"precision": "fp32", "tf32": False, "device": "cpu"}
H4 = "tiny-t2v-moe-h4"  # test-only: tiny-t2v-moe with 4 heads, so that 4 Ulysses ranks divide them


def register_test_specs() -> None:
    from artifex.models.registry import MODELS, TransformerArch

    if H4 not in MODELS:
        base = MODELS["tiny-t2v-moe"]
        arch = dataclasses.replace(base.transformer, heads=4)
        assert isinstance(arch, TransformerArch)
        MODELS[H4] = dataclasses.replace(base, name=H4, transformer=arch, description="4-head tiny T2V (tests)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relative_l2(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def worker(rank: int, world: int, port: int, cases: list[dict], outdir: str, home: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ARTIFEX_HOME=home,
                      ARTIFEX_OUTPUT_DIR=str(Path(home) / "out"), HF_HUB_OFFLINE="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # several ranks share a small CPU
    register_test_specs()
    from artifex.config import OptimizationConfig
    from artifex.distributed.executor import parallelize
    from artifex.distributed.groups import build_groups
    from artifex.distributed.layout import ParallelLayout
    from artifex.engine.pipeline import Engine
    from artifex.engine.request import GenerationRequest

    dist.init_process_group("gloo", rank=rank, world_size=world)
    engines: dict = {}
    try:
        for i, case in enumerate(cases):
            key = (case["model"], case.get("checkpoint"))
            if key not in engines:
                engines[key] = Engine.load(case["model"], checkpoint=case.get("checkpoint"),
                                           config=OptimizationConfig(**FP32))
            engine = engines[key]
            runner = parallelize(engine, build_groups(ParallelLayout(case["cfg"], case["ulysses"])),
                                 split_vae_decode=case.get("split_vae_decode", True))
            try:
                req = GenerationRequest(model=case["model"], output=str(Path(outdir) / f"case{i}.mp4"),
                                        **case["request"])
                result = runner.generate(req)
                shard = list(runner.ulysses.shard.sizes) if runner.ulysses else None  # proof the tokens were split
                pixels = None
                if case.get("pixels"):  # the layout's decode once more, every rank taking part: rank 0's chunks
                    pixels = [c.float() for c in engine.decode_chunks(result.latents)]
            finally:
                runner.remove()
            torch.save({"latents": result.latents, "video": str(result.video_path) if result.video_path else None,
                        "seed": result.settings.seed, "shard": shard, "attention_shape": list(result.attention.shape),
                        "timings": result.timings, "pixels": pixels},
                       Path(outdir) / f"case{i}-rank{rank}.pt")
        dist.barrier()  # as artifex launch does: rank 0 may still be writing when the others are done
    finally:
        dist.destroy_process_group()


def run_cases(world: int, cases: list[dict], outdir: Path, home: Path) -> list[list[dict]]:
    """Run ``cases`` on ``world`` gloo processes; returns, per case, every rank's saved result."""
    import torch
    import torch.multiprocessing as mp

    outdir.mkdir(parents=True, exist_ok=True)
    mp.spawn(worker, args=(world, free_port(), cases, str(outdir), str(home)), nprocs=world, join=True)
    return [[torch.load(outdir / f"case{i}-rank{r}.pt") for r in range(world)] for i in range(len(cases))]


def tiny_vae_and_latents(model: str, rows: int, cols: int, frames: int = 3):
    """A seeded tiny VAE of ``model`` (fp32, CPU) and seeded latents (1, z, frames, rows, cols)."""
    import torch
    from diffusers import AutoencoderKLWan

    from artifex.models.configs import vae_kwargs
    from artifex.models.registry import get_model

    spec = get_model(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKLWan(**vae_kwargs(spec)).eval()
    z = torch.randn(1, spec.vae.z_dim, frames, rows, cols, generator=torch.Generator().manual_seed(1))
    return vae, z


def vae_worker(rank: int, world: int, port: int, cases: list[dict], outdir: str) -> None:
    """Each case: ``SplitDecode`` over the whole world; rank 0 saves the frames it yielded, every rank how many."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from artifex.distributed.vae_split import SplitDecode

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for i, case in enumerate(cases):
            vae, z = tiny_vae_and_latents(case["model"], case["rows"], case["cols"])
            if case.get("double"):
                vae, z = vae.double(), z.double()
            if case.get("tiling_on_rank") == rank:
                vae.enable_tiling()
            with torch.no_grad():
                chunks = list(SplitDecode(None, list(range(world)))(vae, z))
            torch.save(chunks, Path(outdir) / f"vae{i}-rank{rank}.pt")
        dist.barrier()  # a rank that finished early (the one-rank fallbacks) must not tear gloo down under the others
    finally:
        dist.destroy_process_group()


def run_vae_cases(world: int, cases: list[dict], outdir: Path) -> list[list[list]]:
    """Run ``vae_worker`` on ``world`` gloo processes; per case, every rank's yielded chunks."""
    import torch
    import torch.multiprocessing as mp

    outdir.mkdir(parents=True, exist_ok=True)
    mp.spawn(vae_worker, args=(world, free_port(), cases, str(outdir)), nprocs=world, join=True)
    return [[torch.load(outdir / f"vae{i}-rank{r}.pt") for r in range(world)] for i in range(len(cases))]
