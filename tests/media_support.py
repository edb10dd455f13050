"""Media files the S2V tests feed the engine: PCM audio and small videos, written through PyAV."""

from __future__ import annotations

import av
import numpy as np


def write_wav(path, seconds: float, rate: int = 44100, channels: int = 2) -> None:
    """A 440 Hz tone (plus a little noise) written through PyAV as 16-bit PCM."""
    n = int(seconds * rate)
    t = np.arange(n) / rate
    tone = 0.4 * np.sin(2 * np.pi * 440 * t) + 0.01 * np.random.default_rng(0).standard_normal(n)
    pcm = (np.repeat(tone[:, None], channels, axis=1) * 32767).astype(np.int16)
    with av.open(str(path), "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=rate, layout="stereo" if channels == 2 else "mono")
        if n:
            frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout=stream.layout.name)
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


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
