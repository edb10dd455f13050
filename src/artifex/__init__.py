"""Artifex: a fast inference engine for the Wan2.2 video generation models."""

__version__ = "0.1.0"
