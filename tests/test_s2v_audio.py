"""S2V audio features: PyAV decoding, the wav2vec2 feature path against DiffSynth's, clip counts, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from artifex.errors import InvalidRequestError
from artifex.models.s2v.audio import (
    bucket_per_video_frame,
    clip_count,
    clip_features,
    clips_for_samples,
    load_audio,
    tiny_wav2vec,
    wav2vec_hidden_states,
)
from tests.diffsynth_ref import reference
from tests.media_support import write_wav as _wav


def _speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.1 * g.standard_normal(t.size)
            ).astype(np.float32)


def test_load_audio_downmixes_and_resamples(tmp_path):
    _wav(tmp_path / "a.wav", 1.0)
    samples = load_audio(tmp_path / "a.wav")
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(samples.size - 16000) <= 64
    spectrum = np.abs(np.fft.rfft(samples))
    assert abs(np.argmax(spectrum) * 16000 / samples.size - 440) < 3  # the tone survived the resampling


def test_bad_audio_is_a_clear_error(tmp_path):
    with pytest.raises(InvalidRequestError, match="does not exist"):
        load_audio(tmp_path / "missing.wav")
    (tmp_path / "notes.txt").write_text("not audio at all\n" * 50)
    with pytest.raises(InvalidRequestError, match="not a media file|no audio stream|could not be decoded"):
        load_audio(tmp_path / "notes.txt")
    _wav(tmp_path / "blip.wav", 0.002)  # 88 samples at 44.1 kHz: ~32 at 16 kHz, under one wav2vec2 frame
    with pytest.raises(InvalidRequestError, match=r"holds \d+ samples at 16 kHz; at least 400"):
        load_audio(tmp_path / "blip.wav")
    _wav(tmp_path / "long.wav", 1.0)
    with pytest.raises(InvalidRequestError, match="longer than 0.5 s"):
        load_audio(tmp_path / "long.wav", max_seconds=0.5)


@pytest.mark.parametrize("seconds", [2.0, 5.5])
def test_features_match_diffsynth(seconds):
    mod = reference("models.wav2vec")
    model, extractor = tiny_wav2vec()
    samples = _speech_like(seconds)
    feats = wav2vec_hidden_states(samples, model, extractor)
    got, clips = bucket_per_video_frame(feats)

    ref = object.__new__(mod.WanS2VAudioEncoder)  # its __init__ builds the 300M-parameter model; the tiny one
    torch.nn.Module.__init__(ref)                 # goes in its place
    ref.model, ref.video_rate = model, 30
    with torch.no_grad():
        want = ref.get_audio_feats_per_inference(samples, 16000, extractor, fps=16, batch_frames=80, m=0)
    assert clips == len(want) == clips_for_samples(samples.size)
    assert got.shape == (1, model.config.num_hidden_layers + 1, model.config.hidden_size, 80 * clips)
    for r, w in enumerate(want):
        torch.testing.assert_close(clip_features(got, r), w, rtol=1e-5, atol=1e-6)
    assert got[..., :20].abs().mean() > 0.1  # live features, and silent (zero) frames past the audio's end
    assert torch.all(got[..., -1] == 0)


def test_clip_counts():
    # 80 new frames per clip at 16 fps = 150 frames at 30 fps; a full last clip still adds one (official).
    assert [clip_count(t) for t in (0, 149, 150, 299, 300)] == [1, 1, 2, 2, 3]
    # 5 s of audio: 249 wav2vec frames -> 149 at 30 fps -> one clip; 6 s -> two.
    assert clips_for_samples(5 * 16000) == 1 and clips_for_samples(6 * 16000) == 2
    with pytest.raises(InvalidRequestError, match="allowed: 0..1"):
        clip_features(torch.zeros(1, 3, 4, 160), 2)


def test_a_file_decoded_once_is_not_decoded_again_for_its_length(tmp_path, monkeypatch):
    """A server checks an upload (decoding it whole), renames it into its store and resolves the request: the
    length comes from the first decode; a changed file is decoded again."""
    import av

    from artifex.models.s2v.audio import audio_samples

    _wav(tmp_path / "check.wav", 1.0)
    n = load_audio(tmp_path / "check.wav").size
    (tmp_path / "check.wav").rename(tmp_path / "stored.wav")
    opened = []
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    assert audio_samples(tmp_path / "stored.wav") == n and opened == []
    with pytest.raises(InvalidRequestError, match="longer than 0.5 s"):
        audio_samples(tmp_path / "stored.wav", max_seconds=0.5)
    _wav(tmp_path / "stored.wav", 2.0)  # rewritten: another size and time
    opened.clear()
    assert audio_samples(tmp_path / "stored.wav") > n and len(opened) == 1
