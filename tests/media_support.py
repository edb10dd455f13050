"""Media files the S2V tests feed the engine: PCM audio and small videos, written through PyAV."""

from __future__ import annotations

import av
import numpy as np

from artifex.models.s2v.audio import write_tone


def write_wav(path, seconds: float, rate: int = 44100, channels: int = 2) -> None:
    """A 440 Hz tone as 16-bit PCM (``models.s2v.audio.write_tone``), stereo at 44.1 kHz by default."""
    write_tone(path, seconds, rate, channels, freq=440.0)


def write_video(path, frames: int, width: int, height: int, fps: int = 16) -> None:
    """A moving bar on grey (a stand-in pose video), H.264."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = np.full((height, width, 3), 90, np.uint8)
            x = (i * 3) % max(1, width - 8)
            img[:, x:x + 8] = 230
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
