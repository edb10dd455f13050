"""One engine, run by every rank of a parallel layout: ``parallelize`` applies the layout from outside.

    engine = Engine.load(model, checkpoint, config)          # every rank loads the same weights
    groups = build_groups(layout)                            # every rank, same order
    runner = parallelize(engine, groups)
    result = runner.generate(request)                        # rank 0: video + sidecar; others: latents only

What it changes on the engine, all through its seams: ``engine.predict`` (CFG-parallel),
the attention processors and forward hooks of the experts (Ulysses), ``writes_output``
(only global rank 0 writes), ``decode_stream`` and ``joins_decode`` (every rank of the
layout decodes a band of rows of each frame, ``artifex.distributed.vae_split``, and rank 0
writes the gathered frames; ``split_vae_decode=False``, or a VAE that decodes in tiles:
rank 0 decodes alone). ``remove`` undoes all of it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path

import torch.distributed as dist

from artifex.attention import install
from artifex.distributed.cfg import CfgParallelPredict
from artifex.distributed.commtime import CommTimer
from artifex.distributed.groups import ParallelGroups
from artifex.distributed.layout import ParallelLayout
from artifex.distributed.ulysses import SequenceShard, UlyssesHooks
from artifex.distributed.vae_split import SplitDecode
from artifex.engine.pipeline import Engine, EventCallback, GenerationResult
from artifex.engine.request import MAX_SEED, GenerationRequest, resolve_request
from artifex.engine.vae import decode_any

log = logging.getLogger("artifex")


class ParallelRunner:
    def __init__(self, engine: Engine, groups: ParallelGroups, timer: CommTimer | None = None,
                 split_vae_decode: bool = True):
        """``timer``: time every collective of the layout (benchmarks); off by default. ``split_vae_decode``: every
        rank decodes a band of each frame (exact); off: rank 0 decodes alone while the others are done."""
        self.engine, self.groups, self.layout = engine, groups, groups.layout
        self.split_vae_decode = split_vae_decode and self.layout.world_size > 1
        if self.split_vae_decode:
            engine.decode_stream = SplitDecode(groups.layout_group, groups.layout_ranks)  # not timed: in decode_s
            engine.joins_decode = True
        self.ulysses: UlyssesHooks | None = None
        if self.layout.ulysses > 1:
            shard = SequenceShard(groups.ulysses_group, groups.ulysses_ranks, timer)
            self.ulysses = UlyssesHooks(engine.c.experts, engine.attention, shard)
            engine.attention_heads_divisor = self.layout.ulysses  # the kernel is timed on the shape ranks run
        if self.layout.cfg > 1:
            engine.predict = CfgParallelPredict(groups.cfg_group, groups.cfg_ranks, groups.cfg_rank, timer)
            engine.attention_batch = 1
        engine.writes_output = groups.writes_output
        engine.oom_step_down = False  # one rank re-placing models alone would leave the others in a collective

    def generate(self, request: GenerationRequest, on_event: EventCallback | None = None,
                 output_dir: str | Path | None = None) -> GenerationResult:
        """Every rank calls this with the same request; a missing seed is drawn on rank 0 and shared."""
        if request.seed is None:
            seed = [random.SystemRandom().randint(0, MAX_SEED) if self.groups.rank == 0 else None]
            dist.broadcast_object_list(seed, src=0)
            request = dataclasses.replace(request, seed=seed[0])
        spec, s, _ = resolve_request(request)
        for w in self.layout.check_request(spec, s.guidance, s.width, s.height, s.frames):
            log.warning(w)
        result = self.engine.generate(request, on_event=on_event, output_dir=output_dir)
        if result.sidecar_path is not None:  # the writing rank records the layout it ran under
            result.sidecar["parallel"] = {**self.layout.to_dict(), "backend": dist.get_backend(),
                                          "writer_rank": self.groups.rank, "split_vae_decode": self.split_vae_decode}
            tmp = result.sidecar_path.with_name(f".{result.sidecar_path.name}.partial")
            tmp.write_text(json.dumps(result.sidecar, indent=2, default=str))
            tmp.replace(result.sidecar_path)
        return result

    def remove(self) -> None:
        """Give the engine back as it was: one process, local attention, its own predict, writing output."""
        if self.ulysses is not None:
            self.ulysses.remove()
            install(self.engine.c.experts, self.engine.attention)
            self.ulysses = None
        self.engine.predict = self.engine._predict
        self.engine.attention_heads_divisor, self.engine.attention_batch = 1, None
        self.engine.writes_output = True
        self.engine.decode_stream, self.engine.joins_decode = decode_any, False
        self.engine.oom_step_down = True


def parallelize(engine: Engine, groups: ParallelGroups, split_vae_decode: bool = True) -> ParallelRunner:
    """Apply ``groups.layout`` to ``engine`` (checked against its model first)."""
    groups.layout.check(engine.spec, world_size=dist.get_world_size())
    return ParallelRunner(engine, groups, split_vae_decode=split_vae_decode)


__all__ = ["ParallelLayout", "ParallelRunner", "parallelize"]
