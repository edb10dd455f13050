"""Ulysses sequence parallelism for diffusers' ``WanTransformer3DModel``, applied from outside.

The model stays a plain module. Hooks shard its token sequence across the ranks of a
Ulysses group for the transformer blocks, and gather it back before the output head:

- a forward pre-hook on the model reads the token count from the latents (B, C, T, H, W)
  and, for TI2V's per-token timesteps (B, L), keeps this rank's slice;
- a forward hook on ``rope`` keeps this rank's slice of the rotary tables (1, L, 1, D);
- a forward pre-hook on ``blocks[0]`` keeps this rank's slice of the patch-embedded tokens
  (B, L, dim) -> (B, L_r, dim); every block then runs on the slice;
- a forward hook on ``proj_out`` all-gathers the slices (B, L_r, C) -> (B, L, C), so every
  rank unpatchifies the same full prediction.

Slices are contiguous and as even as possible (``tensor_split``: the first L % N ranks get
one token more), so any token count works, e.g. TI2V-5B's 27,280 tokens over 3 ranks.

Self-attention (``attn1``) goes through ``UlyssesAttention``: an all-to-all turns
sequence-sharded q/k/v (B, L_r, H, D) into head-sharded ones (B, L, H/N, D), the wrapped
runtime attends over the whole sequence for its heads, and a second all-to-all returns
(B, L_r, H, D). Cross-attention (``attn2``) keeps the plain runtime: each query token
attends to the 512 text tokens, which every rank holds whole, so attention on the local
query slice with full keys/values is exact and needs no communication (its text k/v
projections are computed on every rank; they are 512 tokens against tens of thousands).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from artifex.attention.processor import WanAttentionProcessor
from artifex.distributed.commtime import CommTimer, timer_or_none
from artifex.engine.dit import allow_graph_breaks


class SequenceShard:
    """How one forward's tokens are split over a Ulysses group; set at the start of every forward."""

    def __init__(self, group: dist.ProcessGroup, ranks: list[int], timer: CommTimer | None = None):
        self.group = group
        self.timed = timer_or_none(timer)  # benchmarks time the collectives
        self.size = len(ranks)
        self.rank = ranks.index(dist.get_rank())
        self.sizes: list[int] = []
        self.tokens = 0

    def set_tokens(self, tokens: int) -> None:
        self.tokens = tokens
        self.sizes = [tokens // self.size + (1 if r < tokens % self.size else 0) for r in range(self.size)]

    def local(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's slice of ``x`` along ``dim`` (which holds all ``tokens``)."""
        if x.shape[dim] != self.tokens:
            raise RuntimeError(f"expected {self.tokens} tokens along dim {dim}, got shape {tuple(x.shape)}")
        return x.tensor_split(self.size, dim=dim)[self.rank].contiguous()

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L_r, C) slices of every rank -> (B, L, C) on every rank (padded to the longest slice)."""
        longest = self.sizes[0]
        padded = x if x.shape[1] == longest else torch.nn.functional.pad(x, (0, 0, 0, longest - x.shape[1]))
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        with self.timed("all_gather"):
            dist.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat([p[:, :n] for p, n in zip(parts, self.sizes)], dim=1)

    def seq_to_heads(self, qkv: torch.Tensor) -> torch.Tensor:
        """(3, B, L_r, H, D) sequence-sharded -> (3, B, L, H/N, D) head-sharded (rank j gets head group j)."""
        n = self.size
        three, b, _, h, d = qkv.shape
        send = qkv.permute(3, 0, 1, 2, 4).contiguous()  # (H, 3, B, L_r, D): head groups are contiguous
        counts = [h // n * three * b * s * d for s in self.sizes]
        recv = send.new_empty(sum(counts))
        with self.timed("all_to_all"):
            dist.all_to_all_single(recv, send.flatten(), counts, [send.numel() // n] * n, group=self.group)
        parts = [p.view(h // n, three, b, s, d) for p, s in zip(recv.split(counts), self.sizes)]
        return torch.cat(parts, dim=3).permute(1, 2, 3, 0, 4).contiguous()  # (3, B, L, H/N, D)

    def heads_to_seq(self, out: torch.Tensor) -> torch.Tensor:
        """(B, L, H/N, D) head-sharded -> (B, L_r, H, D) sequence-sharded: the inverse of ``seq_to_heads``."""
        n = self.size
        b, _, hn, d = out.shape
        local = self.sizes[self.rank]
        send = out.permute(1, 0, 2, 3).contiguous()  # (L, B, H/N, D): rank r's tokens are contiguous rows
        row = b * hn * d
        recv = send.new_empty(n * local * row)
        with self.timed("all_to_all"):
            dist.all_to_all_single(recv, send.flatten(), [local * row] * n, [s * row for s in self.sizes],
                                   group=self.group)
        return recv.view(n, local, b, hn, d).permute(2, 1, 0, 3, 4).reshape(b, local, n * hn, d)


class UlyssesAttention:
    """An attention runtime (q, k, v in (B, L_r, H, D)) that attends over the whole sequence via all-to-all."""

    def __init__(self, inner, shard: SequenceShard):
        self.inner = inner  # the engine's AttentionRuntime (or any callable (q, k, v) -> out)
        self.shard = shard

    # Eager even inside a compiled block (the graph breaks around attention): the all-to-alls with uneven splits
    # and their optional timers run as plain calls, as on the CPU where they are tested.
    @torch.compiler.disable
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self.shard.seq_to_heads(torch.stack([q, k, v])).unbind(0)
        return self.shard.heads_to_seq(self.inner(q, k, v))


class UlyssesHooks:
    """The hooks and processors that make ``models`` run sequence-parallel; ``remove`` restores them."""

    def __init__(self, models: list[torch.nn.Module], runtime, shard: SequenceShard):
        self.shard = shard
        self.models = models
        self.handles: list = []
        self_attention = WanAttentionProcessor(UlyssesAttention(runtime, shard))
        cross_attention = WanAttentionProcessor(runtime)
        for model in models:
            heads = model.config.num_attention_heads
            if heads % shard.size:
                raise ValueError(f"Ulysses degree {shard.size} does not divide the model's {heads} heads")
            patch = tuple(model.config.patch_size)
            self.handles += [
                model.register_forward_pre_hook(self._model_pre_hook(patch), with_kwargs=True),
                model.rope.register_forward_hook(self._rope_hook),
                model.blocks[0].register_forward_pre_hook(self._blocks_pre_hook),
                model.proj_out.register_forward_hook(self._proj_out_hook),
            ]
            for block in model.blocks:
                block.attn1.set_processor(self_attention)
                block.attn2.set_processor(cross_attention)
            allow_graph_breaks(model, True)  # the all-to-alls run eagerly inside compiled blocks

    def _model_pre_hook(self, patch: tuple[int, int, int]):
        def hook(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            _, _, t, h, w = x.shape
            self.shard.set_tokens((t // patch[0]) * (h // patch[1]) * (w // patch[2]))
            ts = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            if ts is not None and ts.ndim == 2:  # TI2V: one timestep per token
                ts = self.shard.local(ts, 1)
                if "timestep" in kwargs:
                    kwargs["timestep"] = ts
                else:
                    args = (args[0], ts, *args[2:])
            return args, kwargs

        return hook

    def _rope_hook(self, module, args, output):
        cos, sin = output  # (1, L, 1, D) each
        return self.shard.local(cos, 1), self.shard.local(sin, 1)

    def _blocks_pre_hook(self, module, args):
        return (self.shard.local(args[0], 1), *args[1:])  # hidden_states (B, L, dim) -> (B, L_r, dim)

    def _proj_out_hook(self, module, args, output):
        return self.shard.gather(output)

    def remove(self) -> None:
        """Take the hooks off (the caller puts its own attention processors back)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for model in self.models:
            allow_graph_breaks(model, False)
