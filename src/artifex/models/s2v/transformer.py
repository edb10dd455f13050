"""The Wan2.2 S2V-14B transformer, built on diffusers' Wan parts.

The sequence one forward sees (B = batch, F/H/W = latent frames/height/width, p = patch (1, 2, 2)):

    [ noisy video  F*(H/2)*(W/2) tokens, type 0, modulated with the real t
    | reference    1*(H/2)*(W/2) tokens, type 1, modulated with t = 0, RoPE frame index 30
    | motion       FramePack of the previous clip's last 19 latent frames, type 2, t = 0 ]

The blocks are diffusers' ``WanTransformerBlock`` (same ``attn1``/``attn2``/``ffn`` modules, so
``set_attn_processor`` reaches them) with a forward that modulates the two segments apart. After the
blocks listed in ``audio_inject_layers`` the noisy tokens of each latent frame cross-attend to that
frame's audio tokens, after a LayerNorm whose shift/scale come from the frame's global audio token.
The model is a plain module: no offload, fp8 or parallel branches (DESIGN.md section 3, item 4).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import (
    WanAttention,
    WanAttnProcessor,
    WanTimeTextImageEmbedding,
    WanTransformerBlock,
)

from artifex.errors import InvalidRequestError

S2V_INJECT_LAYERS = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)


# -- rotary embedding -------------------------------------------------------------------------------------
def _axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Real channels of the frame, height and width rotary axes (the Wan split: 44/42/42 at head_dim 128)."""
    h = w = 2 * (head_dim // 6)
    return head_dim - h - w, h, w


def _positions(start: int, size: int, target: int) -> np.ndarray:
    """``size`` integer positions spread over ``target`` slots from ``start`` (the official rope sampling).

    A compressed FramePack segment covers ``target`` latent positions with ``size`` tokens; a negative
    start (motion frames, which lie before the clip) counts backwards, so its angles are conjugated.
    """
    if start >= 0:
        return np.linspace(start, start + target - 1, size).astype(int)
    return -np.linspace(-start, -target - start + 1, size).astype(int)


def s2v_rotary(segments: list[tuple[np.ndarray, np.ndarray, np.ndarray]], head_dim: int, theta: float = 10000.0,
               device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (1, L, 1, head_dim), interleaved as diffusers' ``WanAttnProcessor`` takes them.

    Each segment is (frame positions, height positions, width positions) of one token grid, flattened
    frame-major like the patchified tokens; the segments are concatenated in sequence order.
    """
    angles = []
    for fpos, hpos, wpos in segments:
        parts = []
        for axis, (pos, d) in enumerate(zip((fpos, hpos, wpos), _axis_dims(head_dim))):
            inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))  # (d/2,)
            a = torch.as_tensor(pos, dtype=torch.float64)[:, None] * inv  # (n, d/2)
            shape = [1, 1, 1, d // 2]
            shape[axis] = len(pos)
            parts.append(a.view(shape))
        grid = (len(fpos), len(hpos), len(wpos))
        a = torch.cat([p.expand(*grid, -1) for p in parts], dim=-1).reshape(-1, head_dim // 2)
        angles.append(a)
    a = torch.cat(angles, dim=0).repeat_interleave(2, dim=-1)[None, :, None, :]  # (1, L, 1, head_dim)
    return a.cos().float().to(device), a.sin().float().to(device)


# -- audio ------------------------------------------------------------------------------------------------
def _causal_conv(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A Conv1d padded on the left only (replicating the first sample), so frame i sees frames <= i."""
    return conv(F.pad(x, (conv.kernel_size[0] - 1, 0), mode="replicate"))


class S2VAudioEncoder(nn.Module):
    """wav2vec2 hidden states (B, layers, audio_dim, frames) -> per-latent-frame audio tokens.

    A learned softmax-free weighting (SiLU, normalised) mixes the layers; two stride-2 causal convolutions
    take 4 video frames to one latent frame. Returns (global (B, T, 1, dim), local (B, T, tokens+1, dim)).
    """

    def __init__(self, audio_dim: int, layers: int, dim: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.layer_weights = nn.Parameter(torch.full((1, layers, 1, 1), 0.01))
        self.conv1_local = nn.Conv1d(audio_dim, dim // 4 * tokens, 3)
        self.conv1_global = nn.Conv1d(audio_dim, dim // 4, 3)
        self.conv2 = nn.Conv1d(dim // 4, dim // 2, 3, stride=2)
        self.conv3 = nn.Conv1d(dim // 2, dim, 3, stride=2)
        self.final_linear = nn.Linear(dim, dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        """(N, dim/4, t) after the first conv -> (N, t/4, dim): norm, SiLU, two stride-2 convs."""
        x = F.silu(F.layer_norm(x.transpose(1, 2), (x.shape[1],), eps=1e-6)).transpose(1, 2)
        x = _causal_conv(self.conv2, x)
        x = F.silu(F.layer_norm(x.transpose(1, 2), (x.shape[1],), eps=1e-6)).transpose(1, 2)
        x = _causal_conv(self.conv3, x)
        return F.silu(F.layer_norm(x.transpose(1, 2), (x.shape[1],), eps=1e-6))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = F.silu(self.layer_weights.to(features.dtype))
        x = (features * w / w.sum(dim=1, keepdim=True)).sum(dim=1)  # (B, audio_dim, frames)
        b = x.shape[0]
        local = _causal_conv(self.conv1_local, x)  # (B, tokens*dim/4, frames)
        local = local.unflatten(1, (self.tokens, -1)).flatten(0, 1)  # (B*tokens, dim/4, frames)
        local = self._tail(local)  # (B*tokens, T, dim)
        local = local.unflatten(0, (b, self.tokens)).transpose(1, 2)  # (B, T, tokens, dim)
        pad = self.padding_tokens.to(local.dtype).expand(b, local.shape[1], 1, -1)
        local = torch.cat([local, pad], dim=2)  # (B, T, tokens+1, dim)
        glob = self.final_linear(self._tail(_causal_conv(self.conv1_global, x)))[:, :, None]  # (B, T, 1, dim)
        return glob, local


class S2VAdaLayerNorm(nn.Module):
    """LayerNorm whose shift and scale come from a vector (the frame's global audio token)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=1e-5, elementwise_affine=False)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(F.silu(vec)).chunk(2, dim=-1)  # (N, dim) each
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class S2VAudioInjector(nn.Module):
    """Frame-wise cross-attention from noisy video tokens to their frame's audio tokens."""

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.adain = S2VAdaLayerNorm(dim)
        self.attn = WanAttention(dim=dim, heads=heads, dim_head=dim // heads, eps=eps,
                                 cross_attention_dim_head=dim // heads, processor=WanAttnProcessor())

    def forward(self, x: torch.Tensor, audio_global: torch.Tensor, audio_local: torch.Tensor) -> torch.Tensor:
        """x (B, T*n, dim) noisy tokens; audio_global (B, T, 1, dim); audio_local (B, T, k, dim) -> residual."""
        b, t = audio_local.shape[:2]
        xf = x.unflatten(1, (t, -1)).flatten(0, 1)  # (B*T, n, dim)
        h = self.adain(xf, audio_global[:, :, 0].flatten(0, 1))
        out = self.attn(h, audio_local.flatten(0, 1))  # (B*T, n, dim)
        return out.unflatten(0, (b, t)).flatten(1, 2)


# -- the block: diffusers' with two modulation segments ---------------------------------------------------
class WanS2VTransformerBlock(WanTransformerBlock):
    """``WanTransformerBlock`` whose first ``n`` tokens take the modulation of t, the rest that of t = 0.

    temb: (B, 2, 6, dim), segment 0 the real timestep, segment 1 timestep 0.
    """

    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb, seq_len_x: int):
        mod = (self.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)  # 6 x (B, 2, 1, dim)
        shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = mod
        n = seq_len_x

        def modulate(x, shift, scale):
            noisy = x[:, :n] * (1 + scale[:, 0]) + shift[:, 0]
            return torch.cat([noisy, x[:, n:] * (1 + scale[:, 1]) + shift[:, 1]], 1)

        def gated(x, out, gate):
            return torch.cat([x[:, :n] + out[:, :n] * gate[:, 0], x[:, n:] + out[:, n:] * gate[:, 1]], 1)

        x = hidden_states
        h = modulate(self.norm1(x.float()), shift_msa, scale_msa).type_as(x)
        x = gated(x.float(), self.attn1(h, None, None, rotary_emb), gate_msa).type_as(x)
        h = self.norm2(x.float()).type_as(x)
        x = x + self.attn2(h, encoder_hidden_states, None, None)
        h = modulate(self.norm3(x.float()), c_shift, c_scale).type_as(x)
        x = gated(x.float(), self.ffn(h).float(), c_gate).type_as(x)
        return x


class FramePackMotion(nn.Module):
    """The previous clip's latents at three compressions (FramePack): 1 frame at full patch resolution,
    2 frames at 2x, 16 frames at 4x, each through its own Conv3d."""

    def __init__(self, in_channels: int, dim: int, buckets: tuple[int, int, int]):
        super().__init__()
        self.buckets = tuple(buckets)
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(in_channels, dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(in_channels, dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    def forward(self, motion: torch.Tensor) -> tuple[torch.Tensor, list]:
        """motion (B, C, Tm, H, W) -> tokens (B, N, dim) and their rope segments.

        The last sum(buckets) = 19 frames are used; a shorter history is zero-padded at the front.
        """
        b, c, tm, h, w = motion.shape
        total = sum(self.buckets)
        padded = motion.new_zeros(b, c, total, h, w)
        keep = min(total, tm)
        if keep:
            padded[:, :, -keep:] = motion[:, :, -keep:]
        b1, b2, b4 = self.buckets
        lat_4x, lat_2x, lat_1x = padded.split([b4, b2, b1], dim=2)  # oldest first
        tokens = [p(x).flatten(2).transpose(1, 2) for p, x in
                  ((self.proj, lat_1x), (self.proj_2x, lat_2x), (self.proj_4x, lat_4x))]
        th, tw = h // 2, w // 2  # the rope grid the compressed tokens spread over
        segs = []
        start = 0
        for bucket, div in ((b1, 1), (b2, 2), (b4, 4)):
            start -= bucket
            segs.append((_positions(start, bucket // div, bucket), _positions(0, h // (2 * div), th),
                         _positions(0, w // (2 * div), tw)))
        return torch.cat(tokens, dim=1), segs


class WanS2VTransformer3DModel(ModelMixin, ConfigMixin, AttentionMixin):
    """Wan2.2 S2V-14B's DiT. Save/load with ``save_pretrained`` / ``from_pretrained``."""

    _supports_gradient_checkpointing = False
    _no_split_modules = ["WanS2VTransformerBlock"]
    _keep_in_fp32_modules = ["time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"]
    _repeated_blocks = ["WanS2VTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str = "rms_norm_across_heads",
        eps: float = 1e-6,
        audio_dim: int = 1024,
        audio_layers: int = 25,
        num_audio_tokens: int = 4,
        audio_inject_layers: tuple[int, ...] = S2V_INJECT_LAYERS,
        pose_channels: int = 16,
        motion_frames: tuple[int, int] = (73, 19),
        zip_frame_buckets: tuple[int, int, int] = (1, 2, 16),
        ref_rope_index: int = 30,
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        if list(audio_inject_layers) != sorted(set(audio_inject_layers)):  # injector k serves the k-th such block
            raise InvalidRequestError("audio_inject_layers", f"{list(audio_inject_layers)} must be increasing "
                                      "block indices without repeats")
        if any(i < 0 or i >= num_layers for i in audio_inject_layers):
            raise InvalidRequestError("audio_inject_layers", f"{list(audio_inject_layers)} names a block outside "
                                      f"the model", f"0..{num_layers - 1}")
        self.patch_embedding = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.pose_embedding = nn.Conv3d(pose_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.condition_embedder = WanTimeTextImageEmbedding(dim, freq_dim, dim * 6, text_dim)
        self.type_embedding = nn.Embedding(3, dim)  # 0 noisy, 1 reference, 2 motion
        self.motion_packer = FramePackMotion(in_channels, dim, zip_frame_buckets)
        self.audio_encoder = S2VAudioEncoder(audio_dim, audio_layers, dim, num_audio_tokens)
        self.blocks = nn.ModuleList([WanS2VTransformerBlock(dim, ffn_dim, num_attention_heads, qk_norm,
                                                            cross_attn_norm, eps) for _ in range(num_layers)])
        self.audio_injectors = nn.ModuleList([S2VAudioInjector(dim, num_attention_heads, eps)
                                              for _ in audio_inject_layers])
        self._inject_at = {layer: i for i, layer in enumerate(audio_inject_layers)}
        self.norm_out = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, out_channels * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def encode_audio(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio (B, layers, audio_dim, 4*F) for this clip's video frames -> (global, local) per latent frame.

        The motion history's audio is not kept: the clip's first audio frame is repeated in front of it for
        the 73 motion frames, and the 19 latent frames that come from that prefix are dropped.
        """
        pre_frames, pre_latents = self.config.motion_frames
        audio = torch.cat([audio[..., :1].expand(*audio.shape[:-1], pre_frames), audio], dim=-1)
        glob, local = self.audio_encoder(audio)
        return glob[:, pre_latents:], local[:, pre_latents:]

    def check_inputs(self, hidden_states: torch.Tensor, audio_features: torch.Tensor) -> None:
        """The latent grid FramePack can pack and four audio frames per latent frame, or an error naming them."""
        _, _, f, h, w = hidden_states.shape
        if h % 8 or w % 8:
            raise InvalidRequestError("latents", f"latent height and width must be multiples of 8 (FramePack's "
                                      f"4x motion patches); got {h}x{w}")
        if audio_features.shape[-1] != 4 * f:
            raise InvalidRequestError("audio_features", f"{audio_features.shape[-1]} audio frames for {f} latent "
                                      f"frames; need 4 per latent frame", [4 * f])

    def embed_tokens(self, hidden_states: torch.Tensor, ref_latents: torch.Tensor,
                     motion_latents: torch.Tensor | None, pose_latents: torch.Tensor | None
                     ) -> tuple[torch.Tensor, int, list]:
        """1. The sequence [noisy (+pose) | reference | motion] (B, L, dim) with the type embeddings; the count n
        of noisy tokens; the rope segments (noisy frames 0..F-1, the reference at frame index 30, motion before
        frame 0)."""
        b, _, f, h, w = hidden_states.shape
        pt, ph, pw = self.config.patch_size
        x = self.patch_embedding(hidden_states)
        if pose_latents is None:
            x = x + self.pose_embedding.bias.view(1, -1, 1, 1, 1)
        else:
            x = x + self.pose_embedding(pose_latents)
        x = x.flatten(2).transpose(1, 2)  # (B, gf*gh*gw, dim)
        n = x.shape[1]
        ref = self.patch_embedding(ref_latents).flatten(2).transpose(1, 2)  # (B, rh*rw, dim)
        rh, rw = ref_latents.shape[3] // ph, ref_latents.shape[4] // pw
        if motion_latents is None:  # the first clip: the official sampler drops the (all-zero) history
            motion, motion_segs = x.new_zeros(b, 0, x.shape[-1]), []
        else:
            motion, motion_segs = self.motion_packer(motion_latents)
        types = torch.cat([x.new_zeros(n, dtype=torch.long), x.new_ones(ref.shape[1], dtype=torch.long),
                           x.new_full((motion.shape[1],), 2, dtype=torch.long)])
        x = torch.cat([x, ref, motion], dim=1) + self.type_embedding(types).to(x.dtype)[None]
        ri = self.config.ref_rope_index
        gf, gh, gw = f // pt, h // ph, w // pw
        segs = [(np.arange(gf), np.arange(gh), np.arange(gw)), (np.array([ri]), np.arange(rh), np.arange(rw))]
        return x, n, segs + motion_segs

    def inject_audio(self, i: int, x: torch.Tensor, n: int, audio_global: torch.Tensor,
                     audio_local: torch.Tensor) -> torch.Tensor:
        """After block ``i``: its injector's residual on the noisy tokens, if it has one."""
        j = self._inject_at.get(i)
        if j is None:
            return x
        return torch.cat([x[:, :n] + self.audio_injectors[j](x[:, :n], audio_global, audio_local), x[:, n:]], 1)

    def unpatchify(self, x: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
        """(B, n, out*pt*ph*pw) head output of the noisy tokens -> (B, out, F, H, W)."""
        pt, ph, pw = self.config.patch_size
        x = x.reshape(x.shape[0], f // pt, h // ph, w // pw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, C, F, H, W) noisy latents of the clip
        timestep: torch.Tensor,  # (B,)
        encoder_hidden_states: torch.Tensor,  # (B, L, text_dim) umt5 embeddings
        audio_features: torch.Tensor,  # (B, audio_layers, audio_dim, 4*F); zeros for CFG's unconditional pass
        ref_latents: torch.Tensor,  # (B, C, 1, H, W) reference image latent
        motion_latents: torch.Tensor | None,  # (B, C, Tm, H, W) previous clip's latents (last 19 used, a
        # shorter history zero-padded in front); None for the first clip, whose motion tokens are dropped
        pose_latents: torch.Tensor | None = None,  # (B, pose_channels, F, H, W) or None
    ) -> torch.Tensor:  # (B, out_channels, F, H, W) flow prediction for the noisy latents
        self.check_inputs(hidden_states, audio_features)
        b, _, f, h, w = hidden_states.shape

        # 1. tokens [noisy (+pose) | reference | motion] and 2. their rotary tables
        x, n, segs = self.embed_tokens(hidden_states, ref_latents, motion_latents, pose_latents)
        rotary = s2v_rotary(segs, self.config.attention_head_dim, device=x.device)

        # 3. time (segment 0: t, segment 1: t = 0) and text
        t2 = torch.cat([timestep, torch.zeros_like(timestep)])
        temb, tproj, text, _ = self.condition_embedder(t2, encoder_hidden_states)
        tproj = tproj.unflatten(1, (6, -1)).unflatten(0, (2, b)).transpose(0, 1)  # (B, 2, 6, dim)

        # 4. audio tokens per latent frame
        audio_global, audio_local = self.encode_audio(audio_features)

        # 5. blocks, audio after the injection layers (noisy tokens only)
        for i, block in enumerate(self.blocks):
            x = self.inject_audio(i, block(x, text, tproj, rotary, n), n, audio_global, audio_local)

        # 6. head on the noisy tokens with the real t, unpatchify
        shift, scale = (self.scale_shift_table + temb[:b].unsqueeze(1)).chunk(2, dim=1)
        x = (self.norm_out(x[:, :n].float()) * (1 + scale) + shift).type_as(x)
        return self.unpatchify(self.proj_out(x), f, h, w)


def tiny_s2v_config(**overrides) -> dict:
    """A toy S2V config (the tiny twins' dims: dim 64, 2 heads, text_dim 32) with 3 blocks, audio in 2."""
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
               text_dim=32, freq_dim=32, ffn_dim=128, num_layers=3, audio_dim=24, audio_layers=3,
               num_audio_tokens=4, audio_inject_layers=(0, 2), pose_channels=16)
    cfg.update(overrides)
    return cfg


def s2v_config_for(spec) -> dict:
    """The model config of a registry spec: S2V-14B's defaults, or the tiny twin's toy config at its shape (audio
    in the first and last blocks, features of the tiny wav2vec2)."""
    if not spec.tiny:
        return {}
    a = spec.transformer
    return tiny_s2v_config(num_attention_heads=a.heads, attention_head_dim=a.head_dim, ffn_dim=a.ffn,
                           num_layers=a.layers, text_dim=a.text_dim, freq_dim=a.freq_dim,
                           audio_inject_layers=(0, a.layers - 1))


def tiny_s2v_transformer(seed: int = 0, **overrides) -> WanS2VTransformer3DModel:
    """The tiny S2V model with deterministic random weights, none left at zero (the audio path is live)."""
    gen = torch.Generator().manual_seed(seed)
    model = WanS2VTransformer3DModel(**tiny_s2v_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and name.endswith("weight"):  # norm gains near 1
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(noise * (0.5 / math.sqrt(max(p[0].numel() if p.ndim > 1 else p.shape[0], 1))))
    return model.eval()
