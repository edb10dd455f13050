"""The parallel layout of one generation: CFG degree x Ulysses degree, checked before any work starts.

Rank ``r`` of a ``cfg x ulysses`` layout sits at ``(r // ulysses, r % ulysses)``: ranks that
share the first coordinate form one Ulysses group (they split one transformer forward's
tokens; consecutive ranks, so on one node when possible, where all-to-all is cheap), ranks
that share the second form one CFG group (the conditional pass on the first, the
unconditional on the second). This module is pure: no torch.distributed calls.
"""

from __future__ import annotations

from dataclasses import dataclass

from artifex.errors import InvalidRequestError
from artifex.models.registry import ModelSpec

CFG_DEGREES = (1, 2)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelLayout:
    """``cfg`` rank groups (1 or 2) of ``ulysses`` ranks each; ``cfg * ulysses`` processes in all."""

    cfg: int = 1
    ulysses: int = 1

    @property
    def world_size(self) -> int:
        return self.cfg * self.ulysses

    def coords(self, rank: int) -> tuple[int, int]:
        """(cfg rank, ulysses rank) of a global rank."""
        return divmod(rank, self.ulysses)

    def ulysses_groups(self) -> list[list[int]]:
        """Global ranks of each Ulysses group (one per CFG branch)."""
        return [[c * self.ulysses + u for u in range(self.ulysses)] for c in range(self.cfg)]

    def cfg_groups(self) -> list[list[int]]:
        """Global ranks of each CFG group (one per sequence shard): [conditional rank, unconditional rank]."""
        return [[c * self.ulysses + u for c in range(self.cfg)] for u in range(self.ulysses)]

    def describe(self) -> str:
        return f"cfg {self.cfg} x ulysses {self.ulysses}"

    def to_dict(self) -> dict:
        return {"cfg": self.cfg, "ulysses": self.ulysses, "world_size": self.world_size}

    # -- checks ------------------------------------------------------------------------------
    def check(self, spec: ModelSpec, world_size: int | None = None, devices: int | None = None,
              local_world_size: int | None = None) -> ParallelLayout:
        """Refuse a layout that cannot run ``spec`` on ``world_size`` processes (``devices`` GPUs per node,
        None on CPU, where processes share the CPU). Returns self."""
        if self.cfg not in CFG_DEGREES:
            raise InvalidRequestError(
                "cfg", f"CFG-parallel degree must be 1 (no CFG split) or 2 (conditional and unconditional passes "
                f"on two rank groups); got {self.cfg}", CFG_DEGREES)
        heads = spec.transformer.heads
        if not isinstance(self.ulysses, int) or self.ulysses < 1 or heads % self.ulysses:
            raise InvalidRequestError(
                "ulysses", f"Ulysses degree must divide {spec.name}'s {heads} attention heads (each rank attends "
                f"over whole heads); got {self.ulysses}", divisors(heads))
        if world_size is not None and world_size != self.world_size:
            raise InvalidRequestError(
                "world_size", f"{self.describe()} needs {self.world_size} processes, {world_size} were started",
                layouts_for(world_size, heads) or f"no layout of {world_size} processes fits {heads} heads")
        if devices is not None:
            ranks_here = local_world_size if local_world_size is not None else self.world_size
            if ranks_here > devices:
                raise InvalidRequestError(
                    "nproc_per_node", f"{ranks_here} ranks on this node but only {devices} CUDA device(s): "
                    "each rank needs its own GPU", f"at most {devices} rank(s) per node")
        return self

    def check_request(self, spec: ModelSpec, guidance: tuple[float, ...], width: int, height: int,
                      frames: int) -> list[str]:
        """Refuse what this layout cannot do for one resolved request; return warnings for what it does poorly."""
        warnings = []
        if self.cfg == 2:
            used = [g > 1.0 for g in guidance]
            shown = "/".join(f"{g:g}" for g in guidance)
            if not any(used):
                raise InvalidRequestError(
                    "guidance", f"cfg 2 runs the conditional and unconditional passes on two rank groups, but "
                    f"guidance {shown} (<= 1) turns classifier-free guidance off: there is no unconditional pass "
                    "to split", "guidance > 1 with cfg 2, or cfg 1")
            if not all(used):
                warnings.append(f"guidance {shown}: the expert without CFG runs on the first CFG group only, the "
                                "second waits for its result")
        tokens = spec.tokens(width, height, frames)
        if tokens < self.ulysses:
            raise InvalidRequestError(
                "size", f"{width}x{height}x{frames} is {tokens} tokens per forward, fewer than the {self.ulysses} "
                "Ulysses ranks that would share them", f"ulysses <= {tokens}")
        return warnings


def layouts_for(world_size: int, heads: int) -> list[str]:
    """Every valid 'cfg C x ulysses U' with C*U == world_size for a model with ``heads`` heads."""
    return [ParallelLayout(c, world_size // c).describe() for c in CFG_DEGREES
            if world_size % c == 0 and heads % (world_size // c) == 0]
