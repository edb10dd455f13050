"""This process as one rank of a torch.distributed layout: an ``Executor`` every rank drives with the same calls.

    executor = DistributedExecutor(ParallelLayout(cfg=2, ulysses=2))   # under torchrun: every rank
    executor.load(model, checkpoint, config)     # joins the world, loads the same weights, applies the layout
    result = executor.generate(request)          # global rank 0: video + sidecar; the others: latents only

    executor = parallelize(engine, groups)       # an engine already built, in a world already joined

The layout reaches the engine as one object (``engine.layout``, an ``EngineLayout``), built
here by ``layout_on``: CFG-parallel gives it a ``predict`` that splits the two passes over
the CFG group; Ulysses installs its attention processors and forward hooks on the experts
and tells the kernel choice the heads one rank runs; only global rank 0 writes; every rank
of the layout decodes a band of rows of each frame (``artifex.distributed.vae_split``) and
rank 0 writes the gathered frames (``split_vae_decode=False``, or a VAE that decodes in
tiles: rank 0 decodes alone). ``remove`` gives the engine back as it was.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time

import torch.distributed as dist

from artifex.attention import install
from artifex.distributed.cfg import CfgParallelPredict
from artifex.distributed.commtime import CommTimer
from artifex.distributed.groups import ParallelGroups, build_groups, init_distributed, pick_backend
from artifex.distributed.layout import ParallelLayout
from artifex.distributed.ulysses import SequenceShard, UlyssesHooks
from artifex.distributed.vae_split import SplitDecode
from artifex.engine.executor import LOAD_LOCK, Executor, process_report
from artifex.engine.layout import EngineLayout
from artifex.engine.pipeline import Engine
from artifex.engine.request import MAX_SEED, resolve_request
from artifex.models.registry import get_model

log = logging.getLogger("artifex")


def layout_on(engine: Engine, groups: ParallelGroups, timer: CommTimer | None = None,
              split_vae_decode: bool = True) -> tuple[EngineLayout, UlyssesHooks | None]:
    """The ``EngineLayout`` of this rank's part in ``groups.layout`` (and the Ulysses hooks it installed on the
    experts, to remove later). ``split_vae_decode``: every rank decodes a band (a world of one decodes alone).
    ``timer``: time every collective (benchmarks)."""
    layout = groups.layout
    split_vae_decode = split_vae_decode and layout.world_size > 1
    fields: dict = {"writes_output": groups.writes_output, "oom_step_down": False,
                    "sidecar": {"parallel": {**layout.to_dict(), "backend": dist.get_backend(),
                                             "writer_rank": groups.rank, "split_vae_decode": split_vae_decode}}}
    if split_vae_decode:  # not timed: in decode_s
        fields.update(decode_stream=SplitDecode(groups.layout_group, groups.layout_ranks), joins_decode=True)
    ulysses = None
    if layout.ulysses > 1:
        shard = SequenceShard(groups.ulysses_group, groups.ulysses_ranks, timer)
        ulysses = UlyssesHooks(engine.c.experts, engine.attention, shard)
        fields["attention_heads_divisor"] = layout.ulysses  # the kernel is timed on the shape ranks run
    if layout.cfg > 1:
        fields.update(predict=CfgParallelPredict(groups.cfg_group, groups.cfg_ranks, groups.cfg_rank, timer),
                      attention_batch=1)
    return EngineLayout(**fields), ulysses


class DistributedExecutor(Executor):
    """One rank of ``layout``: every rank of the world makes the same calls, in the same order."""

    kind = "torch.distributed"

    def __init__(self, layout: ParallelLayout, backend: str = "auto", split_vae_decode: bool = True,
                 timer: CommTimer | None = None):
        super().__init__()
        self.layout, self.backend, self.split_vae_decode, self.timer = layout, backend, split_vae_decode, timer
        self.engine: Engine | None = None
        self.groups: ParallelGroups | None = None
        self.ulysses: UlyssesHooks | None = None
        self._joined = False  # this executor joined the world (and leaves it at close)

    @property
    def rank(self) -> int:
        return self.groups.rank if self.groups is not None else 0

    def load(self, model, checkpoint=None, config=None, single_files=None) -> float:
        """Join the world torchrun describes (unless this process is in one), build the groups, load, apply."""
        from artifex.config import OptimizationConfig

        t0 = time.perf_counter()
        self.layout.check(get_model(model), world_size=self.layout.world_size)
        if not dist.is_initialized():
            self.backend, device = init_distributed(self.backend)
            self._joined = True
        else:
            self.backend, device = dist.get_backend(), (config.device if config else "cpu")
        self.groups = build_groups(self.layout)
        config = (config or OptimizationConfig()).merged({"device": device})
        with LOAD_LOCK:
            engine = Engine.load(model, checkpoint=checkpoint, config=config, single_files=single_files)
        self.attach(engine, self.groups)
        return time.perf_counter() - t0

    def attach(self, engine: Engine, groups: ParallelGroups) -> None:
        """Apply ``groups.layout`` to ``engine`` (checked against its model first)."""
        groups.layout.check(engine.spec, world_size=dist.get_world_size())
        self.engine, self.groups, self.layout, self.model = engine, groups, groups.layout, engine.spec.name
        self.split_vae_decode = self.split_vae_decode and self.layout.world_size > 1
        engine.layout, self.ulysses = layout_on(engine, groups, self.timer, self.split_vae_decode)
        self.identity.update(kind=self.kind, pid=None, rank=groups.rank, world_size=self.layout.world_size,
                             layout=self.layout.describe())

    def generate(self, request, on_event=None, output_dir=None):
        """Every rank calls this with the same request; a missing seed is drawn on rank 0 and shared."""
        if request.seed is None:
            seed = [random.SystemRandom().randint(0, MAX_SEED) if self.rank == 0 else None]
            dist.broadcast_object_list(seed, src=0)
            request = dataclasses.replace(request, seed=seed[0])
        spec, s, _ = resolve_request(request)
        for w in self.layout.check_request(spec, s.guidance, s.width, s.height, s.frames):
            log.warning(w)
        return self.engine.generate(request, on_event=on_event, output_dir=output_dir)

    def health(self) -> dict:
        dev = self.engine.device if self.engine is not None else None
        return process_report([dev.index or 0] if dev is not None and dev.type == "cuda" else [])

    def remove(self) -> None:
        """Give the engine back as it was: one process, local attention, the default layout."""
        if self.engine is None:
            return
        if self.ulysses is not None:
            self.ulysses.remove()
            install(self.engine.c.experts, self.engine.attention)
            self.ulysses = None
        self.engine.layout = EngineLayout()

    def close(self) -> None:
        self.remove()
        self.engine = None
        if self._joined and dist.is_initialized():
            dist.destroy_process_group()
            self._joined = False


def parallelize(engine: Engine, groups: ParallelGroups, split_vae_decode: bool = True,
                timer: CommTimer | None = None) -> DistributedExecutor:
    """An executor over ``engine`` (already loaded, on every rank of a joined world) with ``groups.layout`` applied."""
    executor = DistributedExecutor(groups.layout, dist.get_backend(), split_vae_decode, timer)
    executor.attach(engine, groups)
    return executor


__all__ = ["DistributedExecutor", "ParallelLayout", "layout_on", "parallelize", "pick_backend"]
