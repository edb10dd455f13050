"""The Wan attention processor: diffusers' Wan attention math, attention through Artifex's backends.

Installed on every expert with diffusers' public ``set_attn_processor``. It computes
what diffusers' ``WanAttnProcessor`` computes (projections, RMS norms over all heads,
rotary embedding, the I2V image-context branch, output projection) and sends q/k/v in
(B, L, H, D) to ``torch.ops.artifex.attention`` with the chain the ``AttentionRuntime``
holds. One runtime is shared by all layers and experts, so a selection made before the
first forward applies everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from artifex.attention import ops  # also registers torch.ops.artifex.attention / attention_qk8
from artifex.attention.backends import BACKENDS
from artifex.attention.select import AttentionUnavailableError, Choice, select, verify_cached
from artifex.kernels.fp8 import quantization_suspended

_TEXT_CONTEXT = 512  # Wan's text context length; longer contexts carry image tokens first (Wan2.1 I2V)


@dataclass
class AttentionRuntime:
    """What every attention call uses: the backend chain, the guide's knobs, the choices made."""

    requested: str = "auto"
    scale: float | None = None
    causal: bool = False
    dropout: float = 0.0
    slices: int = 0
    prefer: list[str] = field(default_factory=list)
    cache_path: object = None
    chain: str = "sdpa,sdpa-math"
    choices: dict[str, Choice] = field(default_factory=dict)

    def check_explicit(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> None:
        """Refuse an explicitly named backend that cannot run here, before any work starts."""
        if self.requested == "auto":
            return
        v = verify_cached(self.requested, device, dtype, head_dim, self.scale, self.causal, max(self.slices, 1),
                          self.cache_path)
        if not v.ok:
            raise AttentionUnavailableError(f"attention backend {self.requested!r} cannot run here: {v.reason}")

    def prepare(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device) -> Choice:
        """Select the backend for a self-attention shape (once per shape and dtype) and use it."""
        key = f"{'x'.join(map(str, shape))}|{dtype}|{device}"
        if key not in self.choices:
            self.choices[key] = select(self.requested, device, dtype, shape, self.scale, self.causal, self.dropout,
                                       self.slices, prefer=self.prefer or None, cache_path=self.cache_path)
        choice = self.choices[key]
        self.chain = ",".join(choice.chain)
        return choice

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.ops.artifex.attention(q, k, v, self.active_chain, self.scale, self.causal, self.dropout,
                                           self.slices)

    @property
    def active_chain(self) -> str:
        """``chain``, or its plain form (``cross_chain``) while fp8 compute is suspended (``kernels.fp8.unquantized``:
        the steps ``fp8_bf16_steps`` keeps out of fp8)."""
        return cross_chain(self.chain) if quantization_suspended() else self.chain

    @property
    def cross_chain(self) -> str:
        return cross_chain(self.chain)

    @property
    def quantizes_qk(self) -> bool:
        """Whether the chain starts with fa3-fp8, still in service: its caller may hand it e4m3 q and k (``qk8``)."""
        return self.active_chain.split(",")[0] == ops.QK8 and ops.QK8 not in ops.runtime_failures()

    def qk8(self, q: tuple[torch.Tensor, torch.Tensor], k: tuple[torch.Tensor, torch.Tensor],
            v: torch.Tensor) -> torch.Tensor:
        """Attention on q and k given as (e4m3 values, (B, H) descales): ``torch.ops.artifex.attention_qk8``."""
        return torch.ops.artifex.attention_qk8(*q, *k, v, self.active_chain, self.scale, self.causal, self.dropout,
                                               self.slices)

    def cross(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention to the text (or image) context, through ``cross_chain`` (see the function)."""
        return torch.ops.artifex.attention(q, k, v, self.cross_chain, self.scale, self.causal, self.dropout,
                                           self.slices)


def cross_chain(chain: str) -> str:
    """``chain`` with each quantizing backend replaced by its plain kernel (``Backend.plain``). Cross-attention
    has 512 text keys: reading q and writing the output bound its time, so e4m3 inputs buy nothing (FA3 at
    TI2V-5B 720p, H100: 0.378 ms fp8 against 0.362 ms bf16, before the quantization of q) and only add error."""
    out: list[str] = []
    for name in chain.split(","):
        name = (BACKENDS[name].plain or name) if name in BACKENDS else name
        if name not in out:
            out.append(name)
    return ",".join(out)


class WanAttentionProcessor:
    def __init__(self, runtime: AttentionRuntime):
        self.runtime = runtime

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        image_context = None
        if attn.add_k_proj is not None and encoder_hidden_states is not None:
            split = encoder_hidden_states.shape[1] - _TEXT_CONTEXT
            image_context, encoder_hidden_states = encoder_hidden_states[:, :split], encoder_hidden_states[:, split:]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states

        if attn.fused_projections and encoder_hidden_states is None:
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        elif attn.fused_projections:
            q = attn.to_q(hidden_states)
            k, v = attn.to_kv(context).chunk(2, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        q, k = attn.norm_q(q), attn.norm_k(k)  # RMS norm across all heads
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))  # (B, L, H, D)
        if rotary_emb is not None:
            q, k = _rotate(q, *rotary_emb), _rotate(k, *rotary_emb)

        if attention_mask is not None:  # Wan passes none; keep diffusers' meaning if a caller does
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attention_mask).transpose(1, 2)
        else:
            out = (self.runtime if encoder_hidden_states is None else self.runtime.cross)(q, k, v)
        out = out.flatten(2, 3).type_as(q)

        if image_context is not None:
            if attn.fused_projections:
                k_img, v_img = attn.to_added_kv(image_context).chunk(2, dim=-1)
            else:
                k_img, v_img = attn.add_k_proj(image_context), attn.add_v_proj(image_context)
            k_img = attn.norm_added_k(k_img)
            k_img, v_img = (t.unflatten(2, (attn.heads, -1)) for t in (k_img, v_img))
            out = out + self.runtime.cross(q, k_img, v_img).flatten(2, 3).type_as(q)

        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved pairs (x0, x1): (x0 cos - x1 sin, x0 sin + x1 cos)."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).type_as(x)


def install(models: list[torch.nn.Module], runtime: AttentionRuntime) -> None:
    """Put one shared Wan processor on every attention layer of every expert."""
    processor = WanAttentionProcessor(runtime)
    for model in models:
        model.set_attn_processor(processor)
