"""mp4 output: H.264 (libx264, yuv420p) through PyAV, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def write_mp4(frames: np.ndarray, path: str | Path, fps: int, crf: int = 18) -> Path:
    """Encode ``frames`` (T, H, W, 3) uint8 RGB as an H.264 mp4 at ``path``.

    The file appears only when complete: it is written beside ``path`` and renamed.
    """
    import av

    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial.mp4")
    _, height, width, _ = frames.shape
    try:
        with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": str(crf), "preset": "medium"}
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(1, 3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    v = video[0].float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return v.permute(1, 2, 3, 0).contiguous().cpu().numpy()
