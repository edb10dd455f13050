"""S2V-14B's audio features: an audio file -> wav2vec2 hidden states -> one vector per 16-fps video frame.

The steps follow the official ``wan/modules/s2v/audio_encoder.py``:

1. decode with PyAV, downmix to mono, resample to 16 kHz (PyAV's resampler; the official code uses librosa,
   whose resampler differs in the last digits);
2. normalise (the wav2vec2 feature extractor) and run ``Wav2Vec2ForCTC``/``Wav2Vec2Model`` with every hidden
   state: (layers = hidden layers + 1, T50, hidden) at the model's 50 frames per second;
3. linearly resample the time axis (align_corners) to 30 fps: int(T50 / 50 * 30) frames;
4. bucket to the video: clip count int(T30 / (80 * 30/16)) + 1, and video frame i takes the 30-fps frame
   round(i * 30/16) (numpy's round half to even), or zeros past the audio's end;
5. clip r (80 new frames) is ``features[..., 80 r : 80 (r + 1)]`` of shape (1, layers, hidden, 80).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from artifex.errors import InvalidRequestError

SAMPLE_RATE = 16000
WAV2VEC_FPS = 50
AUDIO_FPS = 30
VIDEO_FPS = 16
CLIP_FRAMES = 80
DEFAULT_MAX_SECONDS = 600.0


def load_audio(path: str | Path, max_seconds: float = DEFAULT_MAX_SECONDS) -> np.ndarray:
    """The file's first audio stream as mono float32 samples at 16 kHz, shape (samples,).

    An unreadable file, one without an audio stream, silence of zero length or audio longer than
    ``max_seconds`` is an ``InvalidRequestError`` on the field ``audio``.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise InvalidRequestError("audio", f"{path} does not exist or is not a file")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise InvalidRequestError("audio", f"{path} is not a media file PyAV can read: {e}") from None
    chunks = []
    total = 0
    limit = int(max_seconds * SAMPLE_RATE)
    with container:
        if not container.streams.audio:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise InvalidRequestError("audio", f"{path} has no audio stream (streams: {', '.join(kinds)})")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    total += chunks[-1].size
                if total > limit:
                    raise InvalidRequestError("audio", f"{path} is longer than {max_seconds:g} s", "shorter audio")
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except av.error.FFmpegError as e:
            raise InvalidRequestError("audio", f"{path}: the audio stream could not be decoded: {e}") from None
    samples = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if samples.size > limit:
        raise InvalidRequestError("audio", f"{path} lasts {samples.size / SAMPLE_RATE:.1f} s, longer than "
                                  f"{max_seconds:g} s", "shorter audio")
    if samples.size < 400:  # under one wav2vec2 frame (25 ms)
        raise InvalidRequestError("audio", f"{path} holds {samples.size} samples at 16 kHz; at least 400 "
                                  "(25 ms) are needed")
    _remember(path, samples.size)
    return samples


# The sample counts of files decoded whole by ``load_audio``, by file identity (device, inode, size, mtime): a
# server checks an upload, renames it into its store and resolves the request; the second look needs no decode.
_LENGTHS: dict[tuple, int] = {}
_MAX_LENGTHS = 256


def _identity(path: Path) -> tuple:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _remember(path: Path, samples: int) -> None:
    if len(_LENGTHS) >= _MAX_LENGTHS:
        _LENGTHS.pop(next(iter(_LENGTHS)))
    _LENGTHS[_identity(path)] = samples


def audio_samples(path: str | Path, max_seconds: float = DEFAULT_MAX_SECONDS) -> int:
    """How many 16-kHz samples ``load_audio`` makes of ``path``, with its checks; a file it decoded before (the
    same file, unchanged) is not decoded again."""
    path = Path(path)
    n = _LENGTHS.get(_identity(path)) if path.is_file() else None
    if n is None:
        return load_audio(path, max_seconds).size
    if n > int(max_seconds * SAMPLE_RATE):
        raise InvalidRequestError("audio", f"{path} lasts {n / SAMPLE_RATE:.1f} s, longer than {max_seconds:g} s",
                                  "shorter audio")
    return n


def write_tone(path: str | Path, seconds: float, rate: int = SAMPLE_RATE, channels: int = 1,
               freq: float = 180.0) -> Path:
    """A 16-bit PCM wav of a tone (speech-band by default) whose loudness moves at 3 Hz (warm-ups, benchmarks,
    tests)."""
    import av

    n = int(seconds * rate)
    t = np.arange(n) / rate
    tone = 0.3 * np.sin(2 * np.pi * freq * t) * (1 + np.sin(2 * np.pi * 3 * t)) \
        + 0.01 * np.random.default_rng(0).standard_normal(n)
    pcm = (np.repeat(tone[:, None], channels, axis=1) * 32767).astype(np.int16)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=rate, layout="stereo" if channels == 2 else "mono")
        packets = []
        if n:
            frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout=stream.layout.name)
            frame.sample_rate = rate
            packets += stream.encode(frame)
        for packet in [*packets, *stream.encode(None)]:
            out.mux(packet)
    return path


def audio_for_mux(path: str | Path, max_rate: int = 48000) -> tuple[np.ndarray, int]:
    """The file's first audio stream for the mp4: (float32 samples (channels, n), rate), mono or stereo as it is
    (more channels downmixed to stereo), at its own rate up to ``max_rate``."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        channels = 2 if (stream.codec_context.channels or 1) >= 2 else 1
        rate = min(int(stream.codec_context.sample_rate or SAMPLE_RATE), max_rate)
        resampler = av.AudioResampler(format="fltp", layout="stereo" if channels == 2 else "mono", rate=rate)
        chunks = [out.to_ndarray() for frame in container.decode(stream) for out in resampler.resample(frame)]
        chunks += [out.to_ndarray() for out in resampler.resample(None)]
    samples = np.concatenate(chunks, axis=1) if chunks else np.zeros((channels, 0), np.float32)
    return samples.reshape(channels, -1), rate


def open_pose_video(path: str | Path, frames: int = 0, fps: int = VIDEO_FPS) -> list[np.ndarray]:
    """Check that ``path`` is a video PyAV can read, and return its first ``frames`` frames sampled at ``fps``
    (every round(rate / fps)-th frame, as the official sampler takes them), RGB uint8 (H, W, 3) each; fewer if the
    video is shorter. ``frames`` 0: the check only (nothing decoded)."""
    import av

    path = Path(path)
    if not path.is_file():
        raise InvalidRequestError("pose_video", f"{path} does not exist or is not a file")
    out: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InvalidRequestError("pose_video", f"{path} has no video stream")
            stream = container.streams.video[0]
            if not frames:
                return out
            interval = max(1, round(float(stream.average_rate or stream.guessed_rate or fps) / fps))
            for i, frame in enumerate(container.decode(stream)):
                if i % interval == 0:
                    out.append(frame.to_ndarray(format="rgb24"))
                    if len(out) == frames:
                        break
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise InvalidRequestError("pose_video", f"{path} is not a video PyAV can read: {e}") from None
    if not out:
        raise InvalidRequestError("pose_video", f"{path} holds no decodable frames")
    return out


def wav2vec_frames(num_samples: int, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2)) -> int:
    """How many 50-fps frames wav2vec2's convolutional front end makes from ``num_samples`` samples."""
    n = num_samples
    for k, s in zip(conv_kernel, conv_stride):
        n = (n - k) // s + 1
    return max(n, 0)


def clip_count(audio_frames_30fps: int, clip_frames: int = CLIP_FRAMES, fps: int = VIDEO_FPS) -> int:
    """Clips of ``clip_frames`` new video frames the official sampler makes for audio of that many 30-fps
    frames: int(T30 / (clip_frames * 30 / fps)) + 1 (the last clip is padded with silent frames)."""
    return int(audio_frames_30fps / (clip_frames * AUDIO_FPS / fps)) + 1


def clips_for_samples(num_samples: int, **conv) -> int:
    """The clip count for ``num_samples`` samples of 16-kHz audio (wav2vec2 frames -> 30 fps -> clips)."""
    return clip_count(int(wav2vec_frames(num_samples, **conv) / WAV2VEC_FPS * AUDIO_FPS))


def wav2vec_hidden_states(samples: np.ndarray, model, feature_extractor, device=None,
                          dtype=torch.float32) -> torch.Tensor:
    """All hidden states of the wav2vec2 model, resampled to 30 fps: (layers, T30, hidden)."""
    inputs = feature_extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_values
    p = next(model.parameters())
    with torch.no_grad():
        out = model(inputs.to(device or p.device, p.dtype), output_hidden_states=True)
    feats = torch.cat(out.hidden_states).to(dtype)  # (layers, T50, hidden)
    t30 = int(feats.shape[1] / WAV2VEC_FPS * AUDIO_FPS)
    feats = F.interpolate(feats.transpose(1, 2), size=t30, mode="linear", align_corners=True)
    return feats.transpose(1, 2)  # (layers, T30, hidden)


def bucket_per_video_frame(feats: torch.Tensor, clip_frames: int = CLIP_FRAMES,
                           fps: int = VIDEO_FPS) -> tuple[torch.Tensor, int]:
    """(layers, T30, hidden) -> ((1, layers, hidden, clips * clip_frames), clips): one 30-fps frame per
    video frame (the official bucketing with m = 0), zeros past the end of the audio."""
    layers, t30, hidden = feats.shape
    clips = clip_count(t30, clip_frames, fps)
    n = clips * clip_frames
    total = math.ceil(n / fps * AUDIO_FPS)  # the audio padded (with zeros) to the clips' length
    times = np.linspace(0, n / fps, n, endpoint=False)
    idx = np.clip(np.round(times * AUDIO_FPS).astype(int), 0, total - 1)
    out = feats.new_zeros(n, layers, hidden)
    live = idx < t30
    out[torch.from_numpy(live)] = feats[:, torch.from_numpy(idx[live])].transpose(0, 1)
    return out.permute(1, 2, 0).unsqueeze(0), clips


def clip_features(features: torch.Tensor, clip: int, clip_frames: int = CLIP_FRAMES) -> torch.Tensor:
    """Clip ``clip``'s audio features (1, layers, hidden, clip_frames) out of ``bucket_per_video_frame``'s."""
    clips = features.shape[-1] // clip_frames
    if not 0 <= clip < clips:
        raise InvalidRequestError("clip", f"clip {clip} of an audio that makes {clips} clips", f"0..{clips - 1}")
    return features[..., clip * clip_frames:(clip + 1) * clip_frames]


def audio_features(path: str | Path, model, feature_extractor, max_seconds: float = DEFAULT_MAX_SECONDS,
                   clip_frames: int = CLIP_FRAMES) -> tuple[torch.Tensor, int]:
    """An audio file -> (features (1, layers, hidden, clips * clip_frames), clips) for the S2V transformer."""
    feats = wav2vec_hidden_states(load_audio(path, max_seconds), model, feature_extractor)
    return bucket_per_video_frame(feats, clip_frames)


def feature_extractor():
    """A wav2vec2 feature extractor with wav2vec2-large-xlsr's settings (normalised 16-kHz mono input), for the
    models built here (benchmarks, the tiny twin); a checkpoint's own comes with it."""
    from transformers import Wav2Vec2FeatureExtractor

    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True,
                                    return_attention_mask=True)


def wav2vec2_large():
    """A ``Wav2Vec2ForCTC`` of wav2vec2-large-xlsr-53-english's shape (1024 wide, 24 layers: 25 hidden states) with
    random weights, and its feature extractor: for benchmarks at the real size."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    config = Wav2Vec2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                            conv_dim=(512,) * 7, do_stable_layer_norm=True, feat_extract_norm="layer",
                            vocab_size=33)
    return Wav2Vec2ForCTC(config).eval(), feature_extractor()


def tiny_wav2vec(seed: int = 0):
    """A toy ``Wav2Vec2ForCTC`` (hidden 24, 2 layers: 3 hidden states) and its feature extractor, for tests."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    config = Wav2Vec2Config(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                            conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                            do_stable_layer_norm=True, feat_extract_norm="layer", vocab_size=33)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Wav2Vec2ForCTC(config).eval()
    return model, feature_extractor()
