"""TAEHV's decoder (madebyollin/taehv): a tiny causal video decoder for Wan latents, loading the published files.

The published ``taew2_1`` (Wan2.1 VAE latents: z16, 4x8x8) and ``taew2_2`` / ``taew2_2_super`` (Wan2.2: z48,
4x16x16) files, and LightX2V's ``lighttaew2_1`` / ``lighttaew2_2`` of the same architecture, hold an encoder and a
decoder as two ``nn.Sequential``; the state-dict keys are ``decoder.<index>.<...>``. Only the decoder is built here;
the file's ``encoder.*`` keys are read past.

The decoder is 2-D convolutions applied to every frame, with time entering in two kinds of block only:

- a memory block sees its input frame and the previous frame's input at the same depth (zeros before the first
  frame): ``act(convs(cat(x_t, x_{t-1})) + skip(x_t))`` in the base variant, ``convs(cat(x_t, x_{t-1})) + x_t``
  (a 7x7 depthwise conv and a 1x1 bottleneck) in the "super" one;
- a time-grow block maps each frame to ``s`` frames with a 1x1 conv to ``s`` times the channels (``s`` = 1, 2, 2
  for the three stages: each latent frame becomes 4 frames).

Base: 3 tanh(x/3) -> 3x3 conv z->256 -> ReLU -> [3 memory blocks, 2x nearest upsampling, time-grow, 3x3 conv to
the next width] for widths 256, 128, 64 -> ReLU -> 3x3 conv 64 -> 3 p^2. Super: 1x1 conv z->512 -> [3 memory
blocks, 3x3 conv to 4x the next width, ReLU, pixel shuffle 2, time-grow] for 512, 256, 128 -> 3x3 conv 64 -> 3 p^2.
Then pixels are clamped to [0, 1] and, for the Wan2.2 latents (p = 2), pixel-shuffled.

So the frames of latent frame t depend only on latent frames <= t, and a decode in chunks of latent frames that
carries each memory block's last input frame yields the frames of a decode of all at once (``stream``). Each
latent frame gives 4 frames; TAEHV drops the first 3 of the first latent frame, so T latent frames give 4T - 3 =
1 + 4(T - 1) frames: the Wan VAE's count, frame for frame in time.

TAEHV reads latents in the scale the DiT works in (no latents_mean/std); LightX2V's lighttae files read the
un-normalized latents (``artifex.engine.decoders`` picks which). Pixels come out in [0, 1]; ``decode`` and
``stream`` return [-1, 1], as the Wan VAE does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from artifex.errors import CheckpointError

VARIANTS = ("base", "super")
WIDTHS = {"base": (256, 128, 64, 64), "super": (512, 256, 128, 64)}  # the published files' widths
TIME_STRIDES = (1, 2, 2)  # frames per frame at each stage: 4 in all, the Wan VAE's temporal stride
FRAMES_TO_TRIM = 3  # of the first latent frame's 4, so that the frame count is the Wan VAE's


def _conv3(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class SoftClamp(nn.Module):
    """3 tanh(x / 3): latents beyond about +-3 are squashed (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3.0 * torch.tanh(x / 3.0)


class MemoryBlock(nn.Module):
    """The base variant's block: ReLU(convs(cat(x, past)) + skip(x)); keys ``conv.{0,2,4}``, ``skip`` if widths
    differ (never in the published decoders)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(_conv3(2 * n_in, n_out), nn.ReLU(), _conv3(n_out, n_out), nn.ReLU(),
                                  _conv3(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([x, past], dim=1)) + self.skip(x))


class SuperMemoryBlock(nn.Module):
    """The super variant's block: x + (7x7 depthwise, 1x1 to 4n, ReLU, 1x1 to n)(cat(x, past)); keys
    ``conv.{0,1,3}``."""

    def __init__(self, n: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(2 * n, 2 * n, 7, padding=3, groups=2 * n, bias=False),
                                  nn.Conv2d(2 * n, 4 * n, 1), nn.ReLU(), nn.Conv2d(4 * n, n, 1, bias=False))

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([x, past], dim=1)) + x


class TimeGrow(nn.Module):
    """Each frame to ``stride`` consecutive frames: a 1x1 conv to stride x channels, split along the channels (the
    first ``n`` channels are the first frame)."""

    def __init__(self, n: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames, channels, h, w = x.shape
        return self.conv(x).reshape(frames * self.stride, channels, h, w)


class TaehvDecoder(nn.Module):
    """TAEHV's decoder for ``latent_channels``-channel latents (module docstring); ``patch_size`` 1 for the Wan2.1
    VAE's latents, 2 for Wan2.2's. ``widths``: the four stage widths (the published ones by default)."""

    def __init__(self, latent_channels: int, patch_size: int, variant: str = "base",
                 widths: tuple[int, int, int, int] | None = None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown TAEHV variant {variant!r} (allowed: {', '.join(VARIANTS)})")
        self.latent_channels, self.patch_size, self.variant = latent_channels, patch_size, variant
        self.widths = tuple(widths or WIDTHS[variant])
        n = self.widths
        out = 3 * patch_size**2
        layers: list[nn.Module] = []
        if variant == "base":
            layers += [SoftClamp(), _conv3(latent_channels, n[0]), nn.ReLU()]
            for stage, stride in enumerate(TIME_STRIDES):
                layers += [MemoryBlock(n[stage], n[stage]) for _ in range(3)]
                layers += [nn.Upsample(scale_factor=2), TimeGrow(n[stage], stride),
                           _conv3(n[stage], n[stage + 1], bias=False)]
            layers += [nn.ReLU(), _conv3(n[3], out)]
        else:
            layers += [nn.Conv2d(latent_channels, n[0], 1, bias=False)]
            for stage, stride in enumerate(TIME_STRIDES):
                layers += [SuperMemoryBlock(n[stage]) for _ in range(3)]
                layers += [_conv3(n[stage], n[stage + 1] * 4), nn.ReLU(), nn.PixelShuffle(2),
                           TimeGrow(n[stage + 1], stride)]
            layers += [_conv3(n[3], out)]
        self.decoder = nn.Sequential(*layers)

    @property
    def time_upscale(self) -> int:
        return int(torch.tensor(TIME_STRIDES).prod())

    def run(self, latents: torch.Tensor, memory: dict[int, torch.Tensor]) -> torch.Tensor:
        """Latents (N, T, z, h, w), in the decoder's dtype -> raw frames (N, 4T, 3 p^2, 8h, 8w). ``memory``: each
        memory block's last input frame from the previous chunk (empty for the first chunk); updated in place."""
        n = latents.shape[0]
        x = latents.flatten(0, 1)
        for i, block in enumerate(self.decoder):
            if isinstance(block, MemoryBlock | SuperMemoryBlock):
                frames = x.unflatten(0, (n, -1))
                before = memory.get(i)
                if before is None:
                    before = torch.zeros_like(frames[:, :1])
                past = torch.cat([before, frames[:, :-1]], dim=1).flatten(0, 1)
                memory[i] = frames[:, -1:].clone()  # a copy: the chunk's activations need not outlive it
                x = block(x, past)
            else:
                x = block(x)
        return x.unflatten(0, (n, -1))

    def to_pixels(self, frames: torch.Tensor) -> torch.Tensor:
        """Raw frames (N, F, 3 p^2, h, w) -> pixels (N, 3, F, p h, p w) in [-1, 1]."""
        x = frames.clamp(0.0, 1.0)
        if self.patch_size > 1:
            x = F.pixel_shuffle(x.flatten(0, 1), self.patch_size).unflatten(0, frames.shape[:2])
        return (x * 2.0 - 1.0).transpose(1, 2)

    def stream(self, latents: torch.Tensor, chunk: int = 2) -> Iterator[torch.Tensor]:
        """Latents (N, z, T, h, w) in the scale this decoder reads -> pixels (N, 3, t, H, W) in [-1, 1], ``chunk``
        latent frames at a time (the first chunk gives 4 chunk - 3 frames, the others 4 chunk): together the
        frames of one decode of all."""
        if latents.dim() != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents (N, {self.latent_channels}, T, h, w), got {tuple(latents.shape)}")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1 latent frame, got {chunk}")
        weight = next(self.parameters())
        x = latents.transpose(1, 2)  # (N, T, z, h, w)
        memory: dict[int, torch.Tensor] = {}
        for start in range(0, x.shape[1], chunk):
            frames = self.run(x[:, start:start + chunk].to(weight.device, weight.dtype), memory)
            if start == 0:
                frames = frames[:, FRAMES_TO_TRIM:]
            yield self.to_pixels(frames)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (N, z, T, h, w) -> pixels (N, 3, 1 + 4 (T - 1), H, W) in [-1, 1], all frames at once."""
        return next(self.stream(latents, chunk=max(1, latents.shape[2])))


# -- reading the published files -------------------------------------------------------------------
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pth`` / ``.pt`` (torch.save of a state dict, read with weights_only) or ``.safetensors``
    file; a missing or unreadable file is a ``CheckpointError`` naming it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(p, "light decoder weights not found (a local TAEHV .pth or .safetensors file: taew2_1 "
                                 "for the Wan2.1 VAE's latents, taew2_2 for Wan2.2's; github.com/madebyollin/taehv)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(p), device="cpu")
        else:
            data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and safetensors each raise their own kinds
        raise CheckpointError(p, f"is not a readable TAEHV weight file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in data.items()):
        raise CheckpointError(p, "does not hold a state dict (names -> tensors)")
    return data


def _names(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _shape_of(state: dict[str, torch.Tensor], path: Path, key: str, dim: int) -> int:
    if key not in state:
        raise CheckpointError(path, f"has no {key} (a TAEHV decoder has it); keys: {_names(sorted(state))}")
    return state[key].shape[dim]


def load_taehv(path: str | Path, latent_channels: int, patch_size: int) -> TaehvDecoder:
    """The TAEHV decoder of the file at ``path`` (its variant and widths read from the keys), checked against the
    latents it must decode (``latent_channels``, ``patch_size``: 16 and 1 for the Wan2.1 VAE, 48 and 2 for
    Wan2.2). A file for other latents, or with keys or shapes the decoder does not have, is a ``CheckpointError``
    naming the keys."""
    p = Path(path).expanduser()
    state = read_state_dict(p)
    foreign = sorted(k for k in state if not k.startswith(("decoder.", "encoder.")))
    if foreign:
        raise CheckpointError(p, f"holds keys that are not TAEHV's encoder.* / decoder.*: {_names(foreign)}")
    dec = {k: v for k, v in state.items() if k.startswith("decoder.")}
    if not dec:
        raise CheckpointError(p, "has no decoder.* keys (an encoder-only file?)")
    variant = "super" if "decoder.0.weight" in dec else "base"
    first, last = ("decoder.0.weight", "decoder.22.weight") if variant == "super" else \
        ("decoder.1.weight", "decoder.22.weight")
    z = _shape_of(dec, p, first, 1)
    if z != latent_channels:
        kinds = {16: "Wan2.1 VAE (taew2_1)", 48: "Wan2.2 VAE (taew2_2)"}
        raise CheckpointError(p, f"decodes {z}-channel latents ({first} has shape {list(dec[first].shape)}), a "
                                 f"{kinds.get(z, 'other')} decoder; this model's VAE has {latent_channels} channels: "
                                 f"use {kinds.get(latent_channels, 'a matching file')}")
    out = _shape_of(dec, p, last, 0)
    if out != 3 * patch_size**2:
        raise CheckpointError(p, f"outputs {out} channels per position ({last} has shape {list(dec[last].shape)}); "
                                 f"this model's VAE needs {3 * patch_size**2} (3 x patch {patch_size}^2)")
    if variant == "super":
        widths = (_shape_of(dec, p, "decoder.0.weight", 0), *(_shape_of(dec, p, f"decoder.{i}.weight", 0) // 4
                                                              for i in (4, 11, 18)))
    else:
        widths = tuple(_shape_of(dec, p, f"decoder.{i}.weight", 0) for i in (1, 8, 14, 20))
    model = TaehvDecoder(latent_channels, patch_size, variant, widths)
    own = model.state_dict()
    # A time-grow conv published for a larger stride (a decoder trained to upscale more) keeps its last frames'
    # channels, as TAEHV's own loader does.
    for i, block in enumerate(model.decoder):
        key = f"decoder.{i}.conv.weight"
        if isinstance(block, TimeGrow) and key in dec:
            rows, want = dec[key].shape[0], own[key].shape[0]
            if rows > want and rows % own[key].shape[1] == 0:
                dec[key] = dec[key][-want:]
    missing = [k for k in own if k not in dec]
    unexpected = sorted(k for k in dec if k not in own)
    mismatched = [f"{k} {list(dec[k].shape)} (expected {list(v.shape)})" for k, v in own.items()
                  if k in dec and dec[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {_names(unexpected)}")
    if mismatched:
        problems.append(f"shapes differ: {_names(mismatched)}")
    if problems:
        raise CheckpointError(p, f"is not a TAEHV {variant} decoder of widths {list(widths)}: " + "; ".join(problems))
    model.load_state_dict(dec)
    return model.eval().requires_grad_(False)
