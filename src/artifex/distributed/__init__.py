"""Parallel layouts over torch.distributed: CFG-parallel, Ulysses sequence-parallel, their product.

``layout`` checks a layout (pure), ``groups`` joins the world and builds its process groups,
``cfg``, ``ulysses`` and ``vae_split`` are the mechanisms, ``executor.DistributedExecutor`` is
one rank's executor (it gives the engine the layout's ``EngineLayout``), ``world.WorldExecutor``
starts a layout's ranks and drives them from one process (``artifex serve --layout``). The
torchrun entry point is the CLI's (``artifex.cli.launch``); one process over two devices is
``artifex.multidevice``; Ray is ``artifex.ray``.
"""

from artifex.distributed.layout import ParallelLayout, divisors, layouts_for

__all__ = ["ParallelLayout", "divisors", "layouts_for"]
