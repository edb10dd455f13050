"""Constructor arguments of each component, real and tiny, and the components on the meta device.

One place says what a text encoder and a VAE of each variant look like; the tiny builder,
the memory planner (which counts weights without loading them) and the random-weight
benchmarks all build from here.
"""

from __future__ import annotations

import torch

from artifex.models.registry import ModelSpec

TINY_VOCAB = 256  # the tiny tokenizer's vocabulary fits well inside this


def text_encoder_config(spec: ModelSpec, vocab_size: int = TINY_VOCAB):
    from transformers import UMT5Config

    if spec.tiny:
        return UMT5Config(vocab_size=vocab_size, d_model=spec.transformer.text_dim, d_kv=8, d_ff=64, num_layers=2,
                          num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                          feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    # umt5-xxl encoder, as Wan2.2 uses it
    return UMT5Config(vocab_size=256_384, d_model=4096, d_kv=64, d_ff=10_240, num_layers=24, num_heads=64,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128,
                      feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def vae_kwargs(spec: ModelSpec) -> dict:
    z = spec.vae.z_dim
    if spec.vae.kind == "wan2.2":
        base = (dict(base_dim=8, decoder_base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1) if spec.tiny else
                dict(base_dim=160, decoder_base_dim=256, dim_mult=[1, 2, 4, 4], num_res_blocks=2))
        return dict(base, z_dim=z, temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                    out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                    latents_mean=[0.0] * z, latents_std=[1.0] * z)
    size = dict(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1) if spec.tiny else \
        dict(base_dim=96, dim_mult=[1, 2, 4, 4], num_res_blocks=2)
    return dict(size, z_dim=z, temperal_downsample=[False, True, True])


def meta_components(spec: ModelSpec, precision: str = "bf16"):
    """(text_encoder, vae, experts) with the real shapes on the meta device, in their run-time dtypes."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    from artifex.models.loader import DTYPES, cast_keeping_fp32

    dtype = DTYPES[precision]
    with torch.device("meta"):
        text_encoder = UMT5EncoderModel(text_encoder_config(spec)).to(dtype)
        vae = AutoencoderKLWan(**vae_kwargs(spec))
        experts = [cast_keeping_fp32(transformer_for(spec, WanTransformer3DModel), dtype) for _ in range(spec.experts)]
    return text_encoder, vae, experts


def transformer_for(spec: ModelSpec, wan_class) -> torch.nn.Module:
    """A transformer of ``spec``'s shape (S2V: its own model, audio modules included)."""
    if spec.task == "s2v":
        from artifex.models.s2v.transformer import WanS2VTransformer3DModel, s2v_config_for

        return WanS2VTransformer3DModel(**s2v_config_for(spec))
    return wan_class(**spec.transformer.diffusers_config())
