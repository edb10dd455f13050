"""Parallel layouts over torch.distributed: CFG-parallel, Ulysses sequence-parallel, their product.

``layout`` checks a layout (pure), ``groups`` joins the world and builds its process groups,
``cfg`` and ``ulysses`` are the two mechanisms, ``runner.parallelize`` applies them to an
``Engine`` from outside, ``launch`` is the torchrun entry point, ``split`` the two-device
memory split of one process. ``cluster`` wraps Ray's own start/status/stop and ``ray_pool`` runs
served engines as Ray actors (both import Ray only when used).
"""

from artifex.distributed.layout import ParallelLayout, divisors, layouts_for

__all__ = ["ParallelLayout", "divisors", "layouts_for"]
