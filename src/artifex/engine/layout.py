"""Where one engine's work runs: the object ``Engine`` consults for everything a parallel layout changes.

The default is one process doing every stage. A torch.distributed layout
(``artifex.distributed.layout_on``) gives the engine another ``EngineLayout`` instead of
patching the engine's attributes: how a step's flow prediction is computed (CFG-parallel),
what one self-attention call looks like on this rank (Ulysses: heads / degree; CFG-parallel:
one pass), whether this rank writes the video, how the VAE turns latents into pixels (a
decode split over the ranks) and whether a rank that does not write joins that decode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from artifex.engine.vae import decode_any

# (model, x, timestep, cond, uncond, guidance | None) -> the guided flow prediction, fp32
Predict = Callable[..., torch.Tensor]
# (vae, z) -> pixels, chunk by chunk
DecodeStream = Callable[[object, torch.Tensor], Iterator[torch.Tensor]]


@dataclass
class EngineLayout:
    """One process's part in a generation (defaults: the whole generation, alone)."""

    predict: Predict | None = None  # None: the engine's own CFG (two passes or one batch)
    writes_output: bool = True  # this process writes the mp4 and the sidecar
    decode_stream: DecodeStream = decode_any
    joins_decode: bool = False  # a non-writing process still takes part in the decode
    attention_heads_divisor: int = 1  # heads one attention call sees = heads / this
    attention_batch: int | None = None  # passes in one attention call; None: the plan's CFG batch
    # An OOM step-down re-places models on this process alone: a layout over several processes turns it off (the
    # others would wait in a collective while this one moves models).
    oom_step_down: bool = True
    sidecar: dict = field(default_factory=dict)  # what the layout adds to the sidecar (e.g. "parallel")

