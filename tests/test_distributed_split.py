"""The two-device memory split gives one device's output (on CPU both 'devices' are the CPU: the hooks run, nothing moves)."""

from __future__ import annotations

import av
import pytest
import torch

from artifex.config import OptimizationConfig
from artifex.engine.pipeline import Engine
from artifex.engine.request import GenerationRequest
from artifex.errors import InvalidRequestError
from artifex.multidevice.split import split_across_devices


@pytest.mark.parametrize("model, extra", [("tiny-t2v-moe", {}), ("tiny-ti2v", {"image": True})])
def test_two_device_split_gives_the_one_device_output(model, extra, tmp_path, image_file):
    eng = Engine.load(model, config=OptimizationConfig(precision="fp32", tf32=False))
    kw = dict(prompt="a boat on the river", seed=4, steps=3, frames=5)
    if extra.get("image"):
        kw["image"] = str(image_file)  # TI2V: the VAE encodes on device 1 and hands latents back to device 0
    one = eng.generate(GenerationRequest(model=model, output=str(tmp_path / "one.mp4"), **kw))
    pixels_one = eng.decode(one.latents)
    split = split_across_devices(eng, ("cpu", "cpu"))
    try:
        two = eng.generate(GenerationRequest(model=model, output=str(tmp_path / "two.mp4"), **kw))
        pixels_two = eng.decode(two.latents)  # the VAE on device 1, its input moved there by the hook
    finally:
        split.remove()
    assert split.moves > 0  # the hooks ran
    assert torch.equal(one.latents, two.latents)
    assert torch.equal(pixels_one, pixels_two)
    with av.open(str(two.video_path)) as c:  # the split run's video is a real one
        assert len(list(c.decode(c.streams.video[0]))) == 5


def test_two_device_split_refuses_offload_placement():
    eng = Engine.load("tiny-t2v-moe", config=OptimizationConfig(precision="fp32", offload_to_cpu=True))
    with pytest.raises(InvalidRequestError, match="placement 'model_offload'"):
        split_across_devices(eng, ("cpu", "cpu"))
