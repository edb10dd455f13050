"""VAE decoding as a stream: one latent frame at a time, pixels handed on as soon as they exist.

diffusers' ``AutoencoderKLWan._decode`` runs its causal decoder over the latent frames one
by one (a feature cache carries the causal context) and concatenates everything at the
end. ``decode_stream`` runs the same loop and yields each latent frame's pixels instead,
so the mp4 encoder can work while the next frames decode, and the whole video never
exists twice in GPU memory. Tiled decoding keeps diffusers' own path (its tiles blend
across the frame, not along time).

``accelerate_vae`` swaps three of diffusers' VAE pieces, in place and reversibly, for ones that compute the same
expressions with fewer passes over the activations (``OptimizationConfig.fast_vae``; the engine also puts the
VAE in channels_last_3d on CUDA, which the fused norm reads as it is and cuDNN's Hopper kernels need):
- each RMS norm that a SiLU follows (the residual blocks' two, the encoder's and decoder's heads) and that SiLU
  become one ``kernels.rms_silu`` (eight eager kernels, half of them in fp32, become one);
- the causal convolutions pad height and width inside cuDNN instead of copying the input into a padded tensor
  first (only the causal time padding, or the cached frames, is still concatenated);
- the nearest-exact upsampling runs in the activations' dtype instead of a round trip through fp32 (nearest
  sampling copies values, so the result is the same).

In fp32 the decode matches diffusers' to 1e-5 (tests/test_kernels_rms_silu.py). In bf16 on a GPU it rounds
elsewhere (cuDNN picks other algorithms for unpadded inputs; the norm sums in another order): the TI2V-5B 720p
decode lands 0.0139 relative L2 from diffusers' bf16 decode, and both land 52.8 dB PSNR (0.01304) from the fp32
VAE, so neither is the less accurate one. It takes 4.27 s against 6.30 s (H100, kernels-vae-h100.json).
"""

from __future__ import annotations

import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from artifex.kernels.rms_silu import rms_silu


def can_stream(vae) -> bool:
    """True when ``vae.decode`` would take the untiled frame-by-frame path this module replicates."""
    # clear_cache makes the feature caches (_feat_map): a VAE that has not decoded yet has none
    return not getattr(vae, "use_tiling", False) and hasattr(vae, "clear_cache") and hasattr(vae, "post_quant_conv")


def decode_stream(vae, z: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yield pixels (1, 3, t, H, W) in [-1, 1] for each latent frame of ``z`` (1, z_dim, T', h, w): together
    exactly ``vae.decode(z)`` untiled (1 frame for the first latent frame, then the temporal stride each)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    vae.clear_cache()
    try:
        x = vae.post_quant_conv(z)
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            kwargs = {"first_chunk": True} if i == 0 else {}
            out = vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, **kwargs)
            if vae.config.patch_size is not None:  # its views need the channels-first layout (channels_last_3d runs)
                out = unpatchify(out.contiguous(), patch_size=vae.config.patch_size)
            yield out.clamp(-1.0, 1.0)
    finally:
        vae.clear_cache()


def decode_any(vae, z: torch.Tensor) -> Iterator[torch.Tensor]:
    """One process's decode of ``z``: ``decode_stream`` where it applies, else (tiles) ``vae.decode`` in one chunk."""
    if can_stream(vae):
        yield from decode_stream(vae, z)
    else:
        yield vae.decode(z, return_dict=False)[0]


def set_layout(vae: nn.Module, channels_last: bool) -> None:
    """Put the VAE's 3-D convolution weights in channels_last_3d (cuDNN then keeps the activations in that layout)
    or back in the default layout; in place, so components shared by engines are set either way."""
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    for param in vae.parameters():
        if param.dim() == 5:
            param.data = param.data.contiguous(memory_format=layout)


class RmsSilu(nn.Module):
    """A ``WanRMS_norm`` and the SiLU after it as one module, over the norm's own parameters (state dict keys stay
    those of the norm it replaces)."""

    def __init__(self, norm: nn.Module, act: nn.Module):
        super().__init__()
        self.gamma, self.bias, self.scale = norm.gamma, norm.bias, norm.scale
        self.replaced = (norm, act)  # a tuple: not registered as submodules; restored by accelerate_vae(on=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_silu(x, self.gamma, self.bias, self.scale)


def _causal_conv_forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    """``WanCausalConv3d.forward`` with its height/width zero padding done by the convolution itself."""
    w_pad, _, h_pad, _, t_pad, _ = self._padding
    if cache_x is not None and t_pad > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)
        t_pad -= cache_x.shape[2]
    if t_pad:
        x = F.pad(x, (0, 0, 0, 0, t_pad, 0))
    return F.conv3d(x, self.weight, self.bias, self.stride, (0, h_pad, w_pad), self.dilation, self.groups)


def _upsample_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``WanUpsample.forward`` without the fp32 round trip (nearest sampling only copies values)."""
    return nn.Upsample.forward(self, x)


def accelerate_vae(vae: nn.Module, on: bool = True) -> int:
    """Swap the fused pieces (module docstring) into ``vae`` (``on``) or restore diffusers' own; idempotent.
    Returns how many pieces were swapped in or out."""
    from diffusers.models.autoencoders import autoencoder_kl_wan as wan

    changed = 0
    for module in list(vae.modules()):  # listed first: the loop replaces submodules
        if isinstance(module, wan.WanResidualBlock):
            changed += _swap_norms(module, ("norm1", "norm2"), on)
        elif isinstance(module, wan.WanEncoder3d | wan.WanDecoder3d):
            changed += _swap_norms(module, ("norm_out",), on)
        if isinstance(module, wan.WanCausalConv3d):
            changed += _swap_forward(module, _causal_conv_forward, on)
        elif isinstance(module, wan.WanUpsample) and module.mode in ("nearest", "nearest-exact"):
            changed += _swap_forward(module, _upsample_forward, on)
    return changed


def _swap_norms(module: nn.Module, names: tuple[str, ...], on: bool) -> int:
    """Fuse ``module.nonlinearity`` (a SiLU that follows each norm in ``names``, and nothing else) into the norms,
    or undo it."""
    norms = [getattr(module, n) for n in names]
    if on:
        act = module.nonlinearity
        if not isinstance(act, nn.SiLU) or not all(getattr(n, "channel_first", False) for n in norms):
            return 0
        for name, norm in zip(names, norms, strict=True):
            setattr(module, name, RmsSilu(norm, act))
        module.nonlinearity = nn.Identity()
        return len(names)
    restored = 0
    for name, norm in zip(names, norms, strict=True):
        if isinstance(norm, RmsSilu):
            setattr(module, name, norm.replaced[0])
            module.nonlinearity = norm.replaced[1]
            restored += 1
    return restored


def _swap_forward(module: nn.Module, forward, on: bool) -> int:
    """Set ``forward`` as the module's own forward, or take it away; a forward someone else set on the instance
    (an offload hook's, a split decode's) is left alone either way."""
    current = module.__dict__.get("forward")
    ours = getattr(current, "__func__", None) is forward
    if on and current is None:
        module.forward = types.MethodType(forward, module)
        return 1
    if not on and ours:
        del module.forward
        return 1
    return 0
