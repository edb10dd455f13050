"""S2V end to end on the tiny twin: an official-layout checkpoint on disk, audio and a reference image in, clips
chained to the audio's length, an mp4 with one AAC stream as long as the video out; the request's checks."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch

from artifex.engine.request import GenerationRequest, resolve_request
from artifex.errors import CheckpointError, InvalidRequestError
from artifex.models import official
from artifex.models.registry import get_model
from tests.media_support import write_video, write_wav

MODEL = "tiny-s2v"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("s2v-media")
    write_wav(d / "short.wav", 2.0)  # one clip
    write_wav(d / "long.wav", 6.0, rate=22050, channels=1)  # 6 s: two clips of 5 s
    write_video(d / "pose.mp4", 40, 64, 64)
    (d / "junk.wav").write_bytes(b"RIFF not really a wave file")
    return d


def _request(media, image_file, **fields) -> GenerationRequest:
    base = dict(model=MODEL, prompt="a person talking", image=str(image_file), audio=str(media / "short.wav"),
                seed=5)
    return GenerationRequest(**{**base, **fields})


def _streams(path):
    with av.open(str(path)) as c:
        return [(s.type, s.codec_context.name, float(s.duration * s.time_base), s.frames) for s in c.streams]


@pytest.fixture(scope="module")
def two_clips(engine, media, image_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("s2v-out") / "two.mp4"
    eng = engine(MODEL)
    events = []
    result = eng.generate(_request(media, image_file, audio=str(media / "long.wav"), output=str(out)),
                          on_event=events.append)
    return result, events


def test_clips_follow_the_audio_and_the_mp4_carries_it(two_clips):
    result, events = two_clips
    spec = get_model(MODEL)
    s = result.settings
    assert s.clips == 2 and s.frames == 77 + 80 == spec.clip_video_frames(2)
    (video, vcodec, vdur, vframes), (audio, acodec, adur, _) = _streams(result.video_path)
    assert (video, vcodec, vframes) == ("video", "h264", 157)
    assert (audio, acodec) == ("audio", "aac")
    assert vdur == pytest.approx(157 / 16)
    assert adur == pytest.approx(vdur, abs=1024 / 22050)  # one AAC frame at most
    side = json.loads(result.sidecar_path.read_text())
    assert [c["frames"] for c in side["s2v"]["clips"]] == [77, 80]
    assert side["audio"]["seconds"] == pytest.approx(157 / 16) and side["audio"]["sample_rate"] == 22050
    # progress counts the steps of every clip and names the clip
    denoise = [e for e in events if e.stage == "denoise"]
    assert [e.step for e in denoise] == list(range(1, 2 * s.steps + 1))
    assert {e.clip for e in denoise} == {0, 1} and {e.clips for e in denoise} == {2}
    assert result.latents.shape == (1, 16, 20, 8, 16)


def test_pose_video_drives_the_clip(engine, media, image_file, tmp_path):
    eng = engine(MODEL)
    small = dict(width=64, height=64)  # the smallest grid FramePack packs: keeps the VAE's share short on a CPU
    plain = eng.generate(_request(media, image_file, output=str(tmp_path / "a.mp4"), **small))
    posed = eng.generate(_request(media, image_file, pose_video=str(media / "pose.mp4"),
                                  output=str(tmp_path / "b.mp4"), **small))
    assert plain.settings.clips == 1 and plain.settings.frames == 77 and _streams(plain.video_path)[0][3] == 77
    assert (posed.latents - plain.latents).abs().max() > 1e-3
    assert json.loads(posed.sidecar_path.read_text())["s2v"]["pose_video"] == str(media / "pose.mp4")


def test_frames_choose_whole_clips_within_the_audio(media, image_file):
    _, s, _ = resolve_request(_request(media, image_file, audio=str(media / "long.wav"), frames=77))
    assert (s.clips, s.frames) == (1, 77)
    with pytest.raises(InvalidRequestError, match=r"frames: .*clips of 80 frames \(the first 77\); got 81; nearest "
                                                  r"valid: 77, 157"):
        resolve_request(_request(media, image_file, frames=81))
    with pytest.raises(InvalidRequestError, match=r"237 frames need 3 clips; the audio \(2.0 s\) makes 1"):
        resolve_request(_request(media, image_file, frames=237))


def test_audio_is_checked_before_anything_runs(media, image_file, tmp_path):
    with pytest.raises(InvalidRequestError, match=r"audio: tiny-s2v generates from speech"):
        resolve_request(_request(media, image_file, audio=None))
    with pytest.raises(InvalidRequestError, match=r"audio: .*junk.wav is not a media file PyAV can read"):
        resolve_request(_request(media, image_file, audio=str(media / "junk.wav")))
    with pytest.raises(InvalidRequestError, match=r"audio: .*nothing.wav does not exist"):
        resolve_request(_request(media, image_file, audio=str(tmp_path / "nothing.wav")))
    with pytest.raises(InvalidRequestError, match=r"pose_video: .*short.wav has no video stream"):
        resolve_request(_request(media, image_file, pose_video=str(media / "short.wav")))
    with pytest.raises(InvalidRequestError, match=r"audio: tiny-ti2v takes no audio.*models that do: tiny-s2v"):
        resolve_request(GenerationRequest(model="tiny-ti2v", prompt="x", audio=str(media / "short.wav")))
    from artifex.engine.request import RequestLimits

    with pytest.raises(InvalidRequestError, match=r"6.0 s of audio make 2 clips \(157 frames\), over this server's "
                                                  r"limit of 121 frames.*frames 77 to keep the first 1 clip"):
        resolve_request(_request(media, image_file, audio=str(media / "long.wav")), RequestLimits(max_frames=121))


def test_size_follows_the_reference_image_within_the_area(media, image_file):
    _, s, _ = resolve_request(_request(media, image_file))  # a 160x96 image: landscape in 128x64's area
    assert (s.width, s.height) == (128, 64)
    with pytest.raises(InvalidRequestError, match=r"width: 96 is not a multiple of 64"):
        resolve_request(_request(media, image_file, width=96, height=64))


def test_official_layout_round_trip_and_clear_errors(tiny_checkpoint, tmp_path):
    from artifex.models.loader import load_components
    from artifex.models.tiny import build_components

    spec = get_model(MODEL)
    path = tiny_checkpoint(MODEL)
    assert official.detect_layout(path) == "official" and (path / official.WAV2VEC_DIR / "config.json").is_file()
    comps = load_components(spec, path, "fp32")
    built = build_components(spec)
    got, want = comps.experts[0].state_dict(), built["transformer"].state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    assert type(comps.audio_encoder).__name__ == "Wav2Vec2ForCTC" and comps.feature_extractor is not None
    # a diffusers-layout directory is not an S2V checkpoint
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"is not an official-layout tiny-s2v checkpoint"):
        load_components(spec, tmp_path)


def test_the_mp4_audio_is_cut_or_padded_to_the_video(tmp_path):
    from artifex.engine.video import AudioTrack, Mp4Stream

    for seconds in (0.5, 3.0):  # audio shorter and longer than the 2 s of video
        track = AudioTrack(np.sin(np.linspace(0, 900, int(seconds * 16000)))[None].astype(np.float32), 16000)
        out = Mp4Stream(tmp_path / f"a{seconds}.mp4", 16, audio=track)
        out.add(np.zeros((32, 64, 64, 3), np.uint8))
        path = out.close()
        (_, _, vdur, _), (kind, _, adur, _) = _streams(path)
        assert kind == "audio" and adur == pytest.approx(vdur, abs=1024 / 16000)
