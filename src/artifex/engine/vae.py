"""VAE decoding as a stream: one latent frame at a time, pixels handed on as soon as they exist.

diffusers' ``AutoencoderKLWan._decode`` runs its causal decoder over the latent frames one
by one (a feature cache carries the causal context) and concatenates everything at the
end. ``decode_stream`` runs the same loop and yields each latent frame's pixels instead,
so the mp4 encoder can work while the next frames decode, and the whole video never
exists twice in GPU memory. Tiled decoding keeps diffusers' own path (its tiles blend
across the frame, not along time).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


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
            if vae.config.patch_size is not None:
                out = unpatchify(out, patch_size=vae.config.patch_size)
            yield out.clamp(-1.0, 1.0)
    finally:
        vae.clear_cache()


def decode_any(vae, z: torch.Tensor) -> Iterator[torch.Tensor]:
    """One process's decode of ``z``: ``decode_stream`` where it applies, else (tiles) ``vae.decode`` in one chunk."""
    if can_stream(vae):
        yield from decode_stream(vae, z)
    else:
        yield vae.decode(z, return_dict=False)[0]
