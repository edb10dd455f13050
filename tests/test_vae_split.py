"""The VAE decode split in row bands over gloo processes (``artifex.distributed.vae_split``) against one process.

Tolerance: the frames a split decode yields on its first rank equal ``decode_stream`` of the
same VAE and latents in one process within 1e-5 absolute in fp32 (pixels in [-1, 1];
measured on CPU: at most 2.7e-6, relative L2 at most 1.6e-6: the convolutions of a band sum
in another order than those of the whole frame) and within 1e-12 in float64 (measured: 0 to
2.5e-15, so the bands compute the same function, not an approximation), for both VAE kinds
and 2 or 3 ranks with bands of unequal height.
"""

from __future__ import annotations

import pytest
import torch
from distributed_support import run_vae_cases, tiny_vae_and_latents

from artifex.distributed.vae_split import band_sizes
from artifex.engine.vae import decode_stream

ATOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def one_process(case: dict) -> torch.Tensor:
    vae, z = tiny_vae_and_latents(case["model"], case["rows"], case["cols"])
    if case.get("double"):
        vae, z = vae.double(), z.double()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank decodes: a CPU convolution's sums depend on the thread count
    try:
        with torch.no_grad():
            return torch.cat(list(decode_stream(vae, z)), dim=2)
    finally:
        torch.set_num_threads(threads)


def test_band_sizes_are_contiguous_and_as_even_as_possible():
    assert band_sizes(7, 2) == [4, 3] and band_sizes(8, 3) == [3, 3, 2] and band_sizes(44, 2) == [22, 22]
    assert sum(band_sizes(45, 8)) == 45


def test_one_latent_row_reaches_every_output_row_so_no_halo_short_of_the_frame_is_exact():
    """Why the split exchanges rows at every convolution instead of decoding bands with a fixed halo."""
    for model in ("tiny-t2v-moe", "tiny-ti2v"):
        vae, z = tiny_vae_and_latents(model, 40, 2, frames=1)
        nudged = z.clone()
        nudged[:, :, :, 20] += 1.0
        with torch.no_grad():
            a, b = (torch.cat(list(decode_stream(vae, x)), dim=2) for x in (z, nudged))
        assert bool(((a - b).abs().amax(dim=(0, 1, 2, 4)) > 0).all()), model  # every output row moved


def check(chunks_per_rank: list[list], ref: torch.Tensor) -> float:
    assert all(c == [] for c in chunks_per_rank[1:]), "only the first rank yields frames"
    chunks = chunks_per_rank[0]
    assert len(chunks) == ref.shape[2] // 4 + 1  # streamed: one chunk per latent frame (1 pixel frame, then 4)
    out = torch.cat(chunks, dim=2)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = float((out - ref).abs().max())
    assert err <= ATOL[ref.dtype], err
    return err


@pytest.mark.slow
def test_split_decode_on_two_and_three_ranks_equals_one_process_for_both_vae_kinds(tmp_path):
    two = [dict(model="tiny-t2v-moe", rows=7, cols=5),  # bands of 4 and 3 latent rows
           dict(model="tiny-ti2v", rows=7, cols=5),  # the Wan2.2 VAE: residual up blocks, patchified output
           dict(model="tiny-t2v-moe", rows=1, cols=4),  # fewer rows than ranks: rank 0 decodes alone
           dict(model="tiny-ti2v", rows=4, cols=3, tiling_on_rank=1)]  # one rank tiles: rank 0 decodes alone
    three = [dict(model="tiny-t2v-moe", rows=8, cols=3),  # 3, 3, 2
             dict(model="tiny-ti2v", rows=7, cols=4),  # 3, 2, 2
             dict(model="tiny-t2v-moe", rows=8, cols=3, double=True),
             dict(model="tiny-ti2v", rows=7, cols=4, double=True)]
    errors = []
    for world, cases in ((2, two), (3, three)):
        results = run_vae_cases(world, cases, tmp_path / f"w{world}")
        errors += [check(ranks, one_process(case)) for case, ranks in zip(cases, results)]
    print("max abs error vs one process:", errors)
    assert errors[2] == errors[3] == 0.0  # the fallbacks are the one-process decode itself
