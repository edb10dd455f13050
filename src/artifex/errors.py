"""Errors that Artifex raises for bad input, bad checkpoints and unsupported settings.

Every error names what was wrong and, where there is a finite set, what is allowed.
The CLI prints them without a traceback; the server (later) maps them to 4xx answers.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


class ArtifexError(Exception):
    """Base class for every error Artifex raises on purpose."""


class InvalidRequestError(ArtifexError, ValueError):
    """A request or config field holds a value that cannot be used.

    ``field`` names the field, ``allowed`` describes the values that would work.
    """

    def __init__(self, field: str, message: str, allowed: str | Iterable[object] | None = None):
        self.field = field
        if allowed is not None and not isinstance(allowed, str):
            allowed = ", ".join(str(a) for a in allowed)
        self.allowed = allowed
        text = f"{field}: {message}"
        if allowed:
            text += f" (allowed: {allowed})"
        super().__init__(text)


class CheckpointError(ArtifexError):
    """A checkpoint on disk is missing, corrupt, or not the model variant that was asked for."""

    def __init__(self, path: str | Path, message: str):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class NotSupportedYetError(ArtifexError):
    """A setting whose mechanism does not exist yet in this version of Artifex."""


class GenerationCancelled(ArtifexError):
    """Raised by a progress callback to stop a generation between steps; nothing is written."""
