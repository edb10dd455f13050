"""Artifex's DiT forward for S2V-14B: ``engine.dit``'s blocks on the S2V sequence, numerically the model's own.

The S2V sequence is [noisy | reference | motion] and its two modulation segments (the real t for the noisy
tokens, t = 0 for the rest) are what ``engine.dit`` already runs for TI2V given an image: one modulation row
per distinct timestep and a (B, L) index of each token's row. So every block runs ``engine.dit.block_forward``
(fused QKV, QK-norm + RoPE kernel, one-pass adaptive norms, cached text K/V, the GELU epilogue, fp8 and
compiled cores alike). What S2V adds runs here, between blocks: the audio injectors after their blocks (the
pending feed-forward residual is added first), and the head on the noisy tokens only. The RoPE tables depend on
the clip's grid, the reference's and whether motion tokens are present; they are kept per shape like
``engine.dit``'s.
"""

from __future__ import annotations

import torch

from artifex.engine.dit import DiTState, FirstBlockShare, Modulation, _context, _output_norm, _qk_path, modulation
from artifex.kernels.qk_norm_rope import compact_rope


def _rope(model, state: DiTState, x: torch.Tensor, key: tuple, segments: list) -> tuple[torch.Tensor, torch.Tensor]:
    from artifex.models.s2v.transformer import s2v_rotary

    key = ("s2v", *key, x.device)
    if key not in state.rope:
        state.rope[key] = compact_rope(*s2v_rotary(segments, model.config.attention_head_dim, device=x.device))
    return state.rope[key]


def s2v_modulation(model, timestep: torch.Tensor, n: int, length: int, like: torch.Tensor) -> Modulation:
    """Rows [t_0 .. t_{B-1}, 0 x B] and the index: sample b's noisy tokens take row b, the rest row B + b."""
    b = timestep.shape[0]
    mod = modulation(model, torch.cat([timestep, torch.zeros_like(timestep)]), like)
    index = torch.empty(b, length, dtype=torch.long, device=timestep.device)
    rows = torch.arange(b, device=timestep.device)[:, None]
    index[:, :n] = rows
    index[:, n:] = rows + b
    return Modulation(rows=mod.rows, temb=mod.temb, index=index)


def model_forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                  audio_features: torch.Tensor, ref_latents: torch.Tensor, motion_latents: torch.Tensor | None,
                  pose_latents: torch.Tensor | None = None) -> torch.Tensor:
    """Replaces ``WanS2VTransformer3DModel.forward`` on an instance; same inputs, same output."""
    state: DiTState = self._artifex_dit
    self.check_inputs(hidden_states, audio_features)
    b, _, f, h, w = hidden_states.shape
    x, n, segments = self.embed_tokens(hidden_states, ref_latents, motion_latents, pose_latents)
    x = x.contiguous()
    key = (tuple(hidden_states.shape[2:]), tuple(ref_latents.shape[2:]),
           None if motion_latents is None else tuple(motion_latents.shape[2:]))
    rope = _rope(self, state, x, key, segments)
    context = _context(self, state, encoder_hidden_states, None)
    mod = s2v_modulation(self, timestep, n, x.shape[1], encoder_hidden_states)
    audio_global, audio_local = self.encode_audio(audio_features)

    qk_path = _qk_path(self, x)
    share = None
    if state.sharing:  # CFG's passes differ in text and audio, both read after the first self-attention
        if state.share is None or not state.share.matches(hidden_states, timestep):
            state.share = FirstBlockShare.of(hidden_states, timestep)
        share = state.share
    pending = None
    for i, block in enumerate(self.blocks):
        x, *pending = block(x, context, (mod.rows, mod.index), rope, qk_path, share if i == 0 else None, pending)
        if i in self._inject_at:  # the pending feed-forward residual first (as the block would add it), then audio
            ff, gate = pending
            x = (x.float() + ff.float() * gate[:, 0][mod.index]).type_as(x)
            x = self.inject_audio(i, x, n, audio_global, audio_local)
            pending = None

    # the head on the noisy tokens (their modulation rows are the real t's)
    head = Modulation(rows=mod.rows, temb=mod.temb, index=mod.index[:, :n])
    if pending is None:
        pending = (torch.zeros_like(x[:, :n]), torch.zeros(mod.rows.shape[0], 1, x.shape[-1], device=x.device))
    else:
        pending = (pending[0][:, :n], pending[1])
    x = self.proj_out(_output_norm(self, x[:, :n].contiguous(), head, *pending))
    return self.unpatchify(x, f, h, w)
