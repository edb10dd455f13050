"""The streamed VAE decode split over the ranks of a parallel layout, in horizontal bands, exactly.

Why not a band with a fixed halo: the Wan decoder's mid block holds a self-attention over
every position of the frame, so one latent row reaches every output row (measured on the
tiny VAEs of both kinds: a change in one latent row of 64 moves all 64 x 8 (Wan2.1) or
64 x 16 (Wan2.2) output rows; without that attention it would still move 13.5 latent rows
each way, about 17 on the real VAEs). No halo short of the whole frame is exact.

What runs instead: every rank decodes its band of latent rows (contiguous, as even as
possible) with its own copy of the VAE and its own feature caches, through the same
frame-by-frame loop as ``decode_stream``, with three modules of the decoder changed for
the length of the decode:

- every causal 3-D convolution that pads rows (3x3x3: one row each side) takes the rows
  it would read from the neighbouring bands from the ranks that hold them (one all-gather
  of every band's edge rows; zeros at the top and bottom of the frame, as the zero padding
  of the whole decode), after the cached frames are joined in time, so the cache of a band
  is the band of the whole decode's cache;
- the 3x3 2-D convolution after each 2x nearest upsampling does the same;
- the mid block's attention gathers the whole frame (at the latent resolution, the
  smallest one), attends over it on every rank and keeps its band.

Everything else in the decoder is per position (RMS norm over channels, SiLU, 1x1
convolutions, nearest upsampling, the Wan2.2 channel-to-space shortcut and unpatchify), so
each band computes exactly the values of its rows of the single-process decode; only the
convolution kernels' own summation order may differ with the tensor's height (CPU fp32:
equal, or ~1e-7). Per latent frame the pixel bands go to the writing rank (the group's
first), padded to the longest band, which yields the whole frame.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from artifex.distributed.commtime import CommTimer, timer_or_none
from artifex.engine.vae import can_stream, decode_any, decode_stream


def band_sizes(rows: int, parts: int) -> list[int]:
    """Rows of each band: contiguous, the first ``rows % parts`` one row taller."""
    return [rows // parts + (1 if r < rows % parts else 0) for r in range(parts)]


class RowBands:
    """One rank's place among the row bands of a group; the collectives that move rows between bands."""

    def __init__(self, group: dist.ProcessGroup | None, ranks: list[int], timer: CommTimer | None = None):
        self.group, self.ranks = group, ranks
        self.size = len(ranks)
        self.index = ranks.index(dist.get_rank())
        self.timed = timer_or_none(timer)
        self.sizes: list[int] = []  # rows of each band at the latent resolution

    @property
    def root(self) -> bool:
        return self.index == 0

    def set_rows(self, rows: int) -> tuple[int, int]:
        """Split ``rows`` latent rows; returns this rank's (start, stop)."""
        self.sizes = band_sizes(rows, self.size)
        start = sum(self.sizes[:self.index])
        return start, start + self.sizes[self.index]

    def _scaled(self, x: torch.Tensor) -> list[int]:
        """Every band's rows at the resolution of ``x`` (this rank's band, along dim -2)."""
        scale, rest = divmod(x.shape[-2], self.sizes[self.index])
        if rest:
            raise RuntimeError(f"{x.shape[-2]} rows are not a multiple of the band's {self.sizes[self.index]}")
        return [s * scale for s in self.sizes]

    def with_halo(self, x: torch.Tensor, p: int) -> torch.Tensor:
        """``x`` (..., rows, W) with ``p`` rows of the band above and below added (zeros at the frame's edges)."""
        if x.shape[-2] < p:
            raise RuntimeError(f"a band of {x.shape[-2]} rows cannot give a halo of {p}")
        edges = torch.cat([x[..., :p, :], x[..., -p:, :]], dim=-2).contiguous()
        parts = [torch.empty_like(edges) for _ in range(self.size)]
        with self.timed("all_gather"):
            dist.all_gather(parts, edges, group=self.group)
        zeros = x.new_zeros(*x.shape[:-2], p, x.shape[-1])
        above = parts[self.index - 1][..., p:, :] if self.index > 0 else zeros
        below = parts[self.index + 1][..., :p, :] if self.index + 1 < self.size else zeros
        return torch.cat([above, x, below], dim=-2)

    def _padded(self, x: torch.Tensor, longest: int) -> torch.Tensor:
        return x.contiguous() if x.shape[-2] == longest else F.pad(x, (0, 0, 0, longest - x.shape[-2])).contiguous()

    def all_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Every band of ``x`` joined along dim -2, on every rank."""
        sizes = self._scaled(x)
        padded = self._padded(x, sizes[0])
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        with self.timed("all_gather"):
            dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[..., :n, :] for p, n in zip(parts, sizes)], dim=-2)

    def rows_to_root(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every band of ``x`` joined along dim -2 on the group's first rank; None on the others."""
        sizes = self._scaled(x)
        padded = self._padded(x, sizes[0])
        parts = [torch.empty_like(padded) for _ in range(self.size)] if self.root else None
        with self.timed("gather"):
            dist.gather(padded, parts, dst=self.ranks[0], group=self.group)
        return torch.cat([p[..., :n, :] for p, n in zip(parts, sizes)], dim=-2) if self.root else None

    def all_agree(self, ok: bool) -> bool:
        """True when ``ok`` on every rank of the group."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        if dist.get_backend(self.group) == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())


def _causal_conv3d(conv, bands: RowBands) -> Callable:
    """``WanCausalConv3d.forward`` with its row padding taken from the neighbouring bands."""
    def forward(x, cache_x=None):
        padding = list(conv._padding)  # (w, w, h, h, 2 * t, 0)
        if cache_x is not None and padding[4] > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            padding[4] -= cache_x.shape[2]
        x = bands.with_halo(x, padding[2])
        padding[2] = padding[3] = 0
        return torch.nn.Conv3d.forward(conv, F.pad(x, padding))
    return forward


def _conv2d(conv: torch.nn.Conv2d, bands: RowBands) -> Callable:
    """``nn.Conv2d.forward`` (zero padding) with its row padding taken from the neighbouring bands."""
    ph, pw = conv.padding

    def forward(x):
        return F.conv2d(bands.with_halo(x, ph), conv.weight, conv.bias, conv.stride, (0, pw), conv.dilation,
                        conv.groups)
    return forward


def _whole_frame(block, bands: RowBands) -> Callable:
    """A per-frame module (the mid block's attention) run on the whole frame; this band of its output kept."""
    original = type(block).forward

    def forward(x):
        sizes = bands._scaled(x)
        start = sum(sizes[:bands.index])
        return original(block, bands.all_rows(x))[..., start:start + sizes[bands.index], :]
    return forward


def banded_modules(decoder: torch.nn.Module, bands: RowBands) -> list[tuple[torch.nn.Module, Callable]]:
    """(module, banded forward) for every module of a Wan decoder that reads across rows."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanCausalConv3d

    changed = []
    for m in decoder.modules():
        if isinstance(m, WanCausalConv3d):
            if m._padding[2] > 0:
                changed.append((m, _causal_conv3d(m, bands)))
        elif isinstance(m, torch.nn.Conv2d):
            if m.padding[0] > 0:
                if m.padding_mode != "zeros" or m.stride[0] != 1:
                    raise NotImplementedError(f"banded decode of {m}")
                changed.append((m, _conv2d(m, bands)))
        elif isinstance(m, WanAttentionBlock):
            changed.append((m, _whole_frame(m, bands)))
        elif isinstance(m, torch.nn.Conv3d | torch.nn.Conv1d | torch.nn.ZeroPad2d) or "Attention" in type(m).__name__:
            raise NotImplementedError(f"banded decode does not know {type(m).__name__}")
    return changed


@contextlib.contextmanager
def banded(decoder: torch.nn.Module, bands: RowBands):
    """The decoder's row-reading modules exchange rows with the other bands while inside; on exit each module gets
    back the forward it had (diffusers' own, or the one ``engine.vae.accelerate_vae`` set)."""
    changed = banded_modules(decoder, bands)
    before = [(m, m.__dict__.get("forward")) for m, _ in changed]
    try:
        for m, forward in changed:
            m.forward = forward
        yield
    finally:
        for m, forward in before:
            if forward is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = forward


class SplitDecode:
    """A replacement for ``Engine.decode_stream``: (vae, z) -> pixels per latent frame, decoded in row bands by
    every rank of ``group``; the whole frames are yielded on the group's first rank, nothing on the others.

    Every rank of the group calls it with the same latents. Where some rank's VAE decodes in tiles, or the
    latents have fewer rows than the group has ranks, the first rank decodes alone as before (the others
    yield nothing)."""

    def __init__(self, group: dist.ProcessGroup | None, ranks: list[int], timer: CommTimer | None = None):
        self.bands = RowBands(group, ranks, timer)

    def __call__(self, vae, z: torch.Tensor) -> Iterator[torch.Tensor]:
        b = self.bands
        if not b.all_agree(can_stream(vae) and z.shape[-2] >= b.size):
            if b.root:
                yield from decode_any(vae, z)
            return
        start, stop = b.set_rows(z.shape[-2])
        with banded(vae.decoder, b):
            for band in decode_stream(vae, z[..., start:stop, :]):
                frame = b.rows_to_root(band)
                if frame is not None:
                    yield frame
