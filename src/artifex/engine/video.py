"""mp4 output: H.264 (libx264, yuv420p) through PyAV, written atomically, whole or as frames arrive; optionally
with an AAC audio track (S2V) cut or padded with silence to the video's length.

Colour: RGB frames become limited-range BT.709 YUV, and the stream says so (colour primaries, transfer and
matrix BT.709, range "tv"). Untagged, players pick the matrix themselves (BT.709 for HD sizes in most), while
swscale's default conversion is BT.601: reds and skin tones came out shifted.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

import numpy as np
import torch

BT709, TV_RANGE = 1, 1  # FFmpeg's AVCOL_PRI/TRC/SPC_BT709 and AVCOL_RANGE_MPEG (limited range)


class AudioTrack:
    """Audio to mux beside the video: float32 samples (channels, n) at ``rate`` Hz (``models.s2v.audio.
    audio_for_mux``)."""

    def __init__(self, samples: np.ndarray, rate: int):
        if samples.ndim != 2 or samples.shape[0] not in (1, 2):
            raise ValueError(f"audio samples must be (1 or 2 channels, n), got {samples.shape}")
        self.samples, self.rate = samples.astype(np.float32), int(rate)
        self.layout = "stereo" if samples.shape[0] == 2 else "mono"

    def fitted(self, seconds: float) -> np.ndarray:
        """The samples cut, or padded with silence, to ``seconds``."""
        n = round(seconds * self.rate)
        out = np.zeros((self.samples.shape[0], n), np.float32)
        keep = min(n, self.samples.shape[1])
        out[:, :keep] = self.samples[:, :keep]
        return out


class Mp4Stream:
    """An H.264 mp4 written as frames arrive; the file appears at ``path`` only when ``close`` completes.

    ``background=True`` encodes on a thread: ``add`` queues the frames and returns at once,
    so the encoder works while the caller (the VAE) produces the next frames. An error on
    the thread surfaces at the next ``add`` or at ``close``; ``abort`` drops the partial file.
    """

    def __init__(self, path: str | Path, fps: int, crf: int = 18, background: bool = False,
                 audio: AudioTrack | None = None):
        self.path = Path(path)
        self.audio = audio  # muxed at ``close``, fitted to the frames written
        self.frames = 0
        self._audio_stream = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.stem}.partial.mp4")
        self.fps, self.crf = fps, crf
        self._container = self._stream = None
        self._error: BaseException | None = None
        self._queue: queue.Queue | None = queue.Queue(maxsize=4) if background else None
        self._thread = threading.Thread(target=self._drain, daemon=True) if background else None
        if self._thread:
            self._thread.start()

    def add(self, frames: np.ndarray) -> None:
        """Append ``frames`` (T, H, W, 3) uint8 RGB."""
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
        self._raise()
        if self._queue is None:
            self._encode(frames)
        else:
            self._queue.put(frames)

    def close(self) -> Path:
        """Flush the encoder, finish the file and move it into place."""
        try:
            if self._queue is not None:
                self._queue.put(None)
                self._thread.join()
                self._raise()
            if self._container is None:
                raise ValueError("no frames were written")
            self._container.mux(self._stream.encode())
            if self._audio_stream is not None:
                self._encode_audio()
            self._container.close()
            self._container = None
            os.replace(self.tmp, self.path)
            return self.path
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop and remove the partial file (a no-op after a successful ``close``)."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 (a broken partial file is removed below either way)
                pass
            self._container = None
        self.tmp.unlink(missing_ok=True)

    def _open(self, height: int, width: int) -> None:
        import av
        from av.video.reformatter import VideoReformatter

        self._container = av.open(str(self.tmp), mode="w", format="mp4", options={"movflags": "+faststart"})
        self._stream = self._container.add_stream("libx264", rate=self.fps)
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
        self._stream.options = {"crf": str(self.crf), "preset": "medium"}
        cc = self._stream.codec_context
        # x264's frame threads, not PyAV's default slice threads: on the 1280x704 noise frames that random weights
        # decode to, 24-26 against 19-21 frames/s and 0.7 s less left to encode after the decode, for a file
        # 0.1% smaller (16-core H100 host, benchmarks/probes/probe9-h100.json)
        cc.thread_type = "FRAME"
        cc.color_primaries, cc.color_trc, cc.colorspace, cc.color_range = BT709, BT709, BT709, TV_RANGE
        self._to_yuv = VideoReformatter()
        if self.audio is not None:  # every stream is declared before the first packet
            self._audio_stream = self._container.add_stream("aac", rate=self.audio.rate, layout=self.audio.layout)

    def _encode_audio(self) -> None:
        """The audio, fitted to the video's length, as AAC frames of the encoder's size."""
        import av

        samples = self.audio.fitted(self.frames / self.fps)
        stream = self._audio_stream
        size = stream.codec_context.frame_size or 1024
        for start in range(0, samples.shape[1], size):
            chunk = np.ascontiguousarray(samples[:, start:start + size])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=self.audio.layout)
            frame.sample_rate, frame.pts = self.audio.rate, start
            self._container.mux(stream.encode(frame))
        self._container.mux(stream.encode(None))

    def _encode(self, frames: np.ndarray) -> None:
        import av

        if self._container is None:
            self._open(frames.shape[1], frames.shape[2])
        for frame in frames:  # one reformatter for the stream: a frame's own reformat builds a scaler every call
            rgb = av.VideoFrame.from_ndarray(frame, format="rgb24")
            yuv = self._to_yuv.reformat(rgb, format="yuv420p", dst_colorspace="ITU709")
            self._container.mux(self._stream.encode(yuv))
            self.frames += 1

    def _drain(self) -> None:
        import av  # noqa: F401 (imported here: the import overlaps the first chunk's decode)

        while (frames := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._encode(frames)
                except BaseException as e:  # noqa: BLE001 (re-raised on the caller's thread)
                    self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


def write_mp4(frames: np.ndarray, path: str | Path, fps: int, crf: int = 18) -> Path:
    """Encode ``frames`` (T, H, W, 3) uint8 RGB as an H.264 mp4 at ``path`` (atomically)."""
    out = Mp4Stream(path, fps, crf)
    try:
        out.add(frames)
    except BaseException:
        out.abort()
        raise
    return out.close()


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(1, 3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8 (converted on the video's device, then copied)."""
    v = video[0].float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return v.permute(1, 2, 3, 0).contiguous().cpu().numpy()
