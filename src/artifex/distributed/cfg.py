"""CFG-parallel: the conditional pass on one rank group, the unconditional on the other.

A replacement for ``Engine.predict``: (model, x, timestep, cond, uncond, guidance | None)
-> the fp32 flow prediction. CFG rank 0 runs the prompt, CFG rank 1 the negative prompt;
one all-gather gives both predictions to both, and each computes ``neg + g * (pos - neg)``
from the same two tensors, so every rank holds the same bits. Without guidance (an expert
whose scale is <= 1) only CFG rank 0 runs the model and broadcasts the result.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from artifex.distributed.commtime import CommTimer, timer_or_none


class CfgParallelPredict:
    def __init__(self, group: dist.ProcessGroup, ranks: list[int], cfg_rank: int, timer: CommTimer | None = None):
        self.group, self.ranks, self.cfg_rank = group, ranks, cfg_rank
        self.timed = timer_or_none(timer)  # benchmarks time the collectives

    @staticmethod
    def _run(model, x, timestep, text) -> torch.Tensor:
        return model(hidden_states=x, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0].float()

    def __call__(self, model, x, timestep, cond, uncond, guidance: float | None) -> torch.Tensor:
        if guidance is None:
            out = self._run(model, x, timestep, cond) if self.cfg_rank == 0 else None
            if out is None:  # the shape the model returns: the latents' own (out_channels = latent channels)
                out = torch.empty(x.shape[0], model.config.out_channels, *x.shape[2:], device=x.device)
            with self.timed("broadcast"):
                dist.broadcast(out, src=self.ranks[0], group=self.group)
            return out
        mine = self._run(model, x, timestep, cond if self.cfg_rank == 0 else uncond).contiguous()
        parts = [torch.empty_like(mine) for _ in self.ranks]
        with self.timed("all_gather"):
            dist.all_gather(parts, mine, group=self.group)
        pos, neg = parts
        return neg + guidance * (pos - neg)
