"""Every bad input gets a clear error naming the field and the allowed values."""

from __future__ import annotations

import pytest

from artifex.engine.request import GenerationRequest, resolve_request
from artifex.errors import InvalidRequestError


def resolve(**kw):
    kw.setdefault("model", "t2v-a14b")
    kw.setdefault("prompt", "a cat")
    return resolve_request(GenerationRequest(**kw))


@pytest.mark.parametrize("kw, pattern", [
    (dict(width=1000, height=720), r"width: 1000 is not a multiple of 16 .*nearest valid: 992, 1008"),
    (dict(width=1280, height=700), r"height: 700 is not a multiple of 16 .*nearest valid: 688, 704"),
    (dict(model="ti2v-5b", width=1280, height=720), r"height: 720 is not a multiple of 32 .*704, 736"),
    (dict(width=1280), r"height: give both width and height"),
    (dict(width=0, height=720), r"width: must be positive"),
    (dict(width=32768, height=720), r"width: 32768 exceeds the model's position table"),
    (dict(frames=80), r"frames: must be 4n\+1 .*got 80; nearest valid: 77, 81"),
    (dict(frames=0), r"frames: must be 4n\+1"),
    (dict(steps=0), r"steps: must be between 1 and 1000, got 0"),
    (dict(steps=-3), r"steps: must be between 1 and 1000"),
    (dict(steps=2.5), r"steps: must be an integer"),
    (dict(steps=90), r"steps: 90 steps at shift 12 repeat integer timesteps.*at most 84 at this shift"),
    (dict(guidance=-1.0), r"guidance: must be >= 0"),
    (dict(guidance_low=-0.5), r"guidance_low: must be >= 0"),
    (dict(model="ti2v-5b", guidance_low=2.0), r"guidance_low: ti2v-5b has one expert"),
    (dict(shift=0), r"shift: must be > 0"),
    (dict(seed=-1), r"seed: must be in \[0, 4294967295\]"),
    (dict(model="nope"), r"model: unknown model 'nope' \(allowed: ti2v-5b, t2v-a14b"),
    (dict(preset="fast"), r"preset: unknown preset 'fast' \(allowed: draft, preview, production, cinema, turbo\)"),
    (dict(prompt="   "), r"prompt: must be a non-empty string"),
    (dict(model="i2v-a14b"), r"image: i2v-a14b generates from an image"),
    (dict(output="out.avi"), r"output: must be an .mp4 path"),
])
def test_bad_input_is_refused_with_field_and_allowed_values(kw, pattern):
    with pytest.raises(InvalidRequestError, match=pattern):
        resolve(**kw)


def test_image_errors(tmp_path, image_file):
    with pytest.raises(InvalidRequestError, match=r"image: .*missing.png does not exist"):
        resolve(model="i2v-a14b", image=str(tmp_path / "missing.png"))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(InvalidRequestError, match=r"image: .*broken.png is not a readable image"):
        resolve(model="i2v-a14b", image=str(bad))
    with pytest.raises(InvalidRequestError, match=r"image: t2v-a14b takes no image \(allowed: models that do: .*i2v-a14b"):
        resolve(model="t2v-a14b", image=str(image_file))


def test_s2v_needs_its_image_and_audio(image_file):
    with pytest.raises(InvalidRequestError, match=r"image: s2v-14b generates from an image"):
        resolve(model="s2v-14b")
    with pytest.raises(InvalidRequestError, match=r"audio: s2v-14b generates from speech or other audio"):
        resolve(model="s2v-14b", image=str(image_file))


def test_untrained_size_warns_and_defaults_come_from_model_then_preset(image_file):
    spec, s, _ = resolve(width=640, height=352)
    assert s.warnings and "not a size t2v-a14b was trained on" in s.warnings[0]
    spec, s, _ = resolve()
    assert (s.width, s.height, s.frames, s.steps, s.guidance, s.shift, s.fps) == (1280, 720, 81, 40, (4.0, 3.0), 12.0, 16)
    assert not s.warnings and 0 <= s.seed < 2**32
    _, s, _ = resolve(preset="draft", steps=7)
    assert (s.width, s.height, s.frames, s.steps, s.preset) == (832, 480, 29, 7, "draft")
    _, s, _ = resolve(guidance=5.0, guidance_low=2.0)
    assert s.guidance == (5.0, 2.0)
    # I2V takes the orientation from the image: a landscape 160x96 image picks a landscape size.
    _, s, image = resolve(model="i2v-a14b", image=str(image_file), preset="preview")
    assert (s.width, s.height) == (832, 480) and image.size == (160, 96)


def test_request_from_dict_rejects_unknown_and_missing_fields():
    assert GenerationRequest.from_dict({"model": "ti2v-5b", "prompt": "x", "seed": 3}).seed == 3
    with pytest.raises(InvalidRequestError, match=r"num_steps: unknown request field.*steps"):
        GenerationRequest.from_dict({"model": "ti2v-5b", "prompt": "x", "num_steps": 3})
    with pytest.raises(InvalidRequestError, match="prompt: is required"):
        GenerationRequest.from_dict({"model": "ti2v-5b"})


@pytest.mark.parametrize("field", ["guidance", "guidance_low", "shift"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 10**400])
def test_non_finite_numbers_are_refused_naming_the_field_and_range(field, value):
    """What the CLI's --guidance inf / --shift nan reach: refused before a model is loaded or a file written."""
    with pytest.raises(InvalidRequestError, match=rf"{field}: must be a finite number.*\(allowed: 0\.?0?1? to 100"):
        resolve(**{field: value})


@pytest.mark.parametrize("kw, pattern", [
    (dict(guidance=101.0), r"guidance: must be at most 100, got 101 \(allowed: 0 to 100"),
    (dict(shift=1e6), r"shift: must be between 0.01 and 100, got 1e\+06 \(allowed: 0.01 to 100\)"),
    (dict(frames=100001), r"frames: 100001 exceeds the model's position table .*\(allowed: at most 4093\)"),
    (dict(width=32768, height=720), r"width: 32768 exceeds .*\(allowed: at most 16384\)"),
    (dict(prompt="a cat\x00"), r"prompt: holds the control character U\+0000 at position 5"),
    (dict(negative_prompt="\ud800"), r"negative_prompt: holds a lone UTF-16 surrogate"),
    (dict(seed=2**64), r"seed: must be in \[0, 4294967295\], got 18446744073709551616 \(allowed: 0..4294967295\)"),
])
def test_ranges_and_text_are_checked(kw, pattern):
    with pytest.raises(InvalidRequestError, match=pattern):
        resolve(**kw)
    _, s, _ = resolve(prompt="tabs\tand\nnewlines are text")
    assert s.prompt == "tabs\tand\nnewlines are text"


def test_hints_respect_the_limits_in_force():
    """A server's caps are checked with the model's, so a hint never names a value the server refuses."""
    from artifex.engine.request import RequestLimits

    limits = RequestLimits(max_width=1280, max_height=1280, max_frames=121, max_steps=100)
    with pytest.raises(InvalidRequestError, match=r"width: 99999 is over this server's limit \(allowed: multiples of "
                                                  r"16 up to 1280\)"):
        resolve_request(GenerationRequest(model="t2v-a14b", prompt="x", width=99999, height=99999), limits)
    with pytest.raises(InvalidRequestError, match=r"width: 1267 is not a multiple of 16 .*nearest valid: 1264 "
                                                  r"\(allowed: multiples of 16 up to 1264\)"):  # not 1280
        resolve_request(GenerationRequest(model="t2v-a14b", prompt="x", width=1267, height=720),
                        RequestLimits(max_width=1270))
    with pytest.raises(InvalidRequestError, match=r"frames: 100001 is over this server's limit \(allowed: 4n\+1 up "
                                                  r"to 121\)"):
        resolve_request(GenerationRequest(model="t2v-a14b", prompt="x", frames=100001), limits)
    with pytest.raises(InvalidRequestError, match=r"frames: must be 4n\+1 .*got 118; nearest valid: 117 \(allowed: "
                                                  r"4n\+1 up to 117\)"):  # not 121
        resolve_request(GenerationRequest(model="t2v-a14b", prompt="x", frames=118), RequestLimits(max_frames=118))
    with pytest.raises(InvalidRequestError, match=r"steps: 500 is over this server's limit \(allowed: 1..100\)"):
        resolve_request(GenerationRequest(model="t2v-a14b", prompt="x", steps=500), limits)
    # without a server's limits the model's own maximum bounds the hint
    with pytest.raises(InvalidRequestError, match=r"nearest valid: 16368, 16384 \(allowed: multiples of 16 up to "
                                                  r"16384\)"):
        resolve(width=16370, height=720)
