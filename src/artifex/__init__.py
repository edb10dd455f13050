"""Artifex: a fast inference engine for the Wan2.2 video generation models."""

from artifex import timeline  # noqa: F401  (first: the process clock starts counting artifex's own time here)

__version__ = "0.1.0"
