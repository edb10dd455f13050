"""The streamed VAE decode and the background mp4 writer against their plain twins."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from artifex.engine.vae import can_stream, decode_stream
from artifex.engine.video import Mp4Stream, write_mp4
from artifex.models.registry import get_model


@pytest.mark.parametrize("model", ["tiny-ti2v", "tiny-t2v-moe"])  # the Wan2.2 VAE (patchified) and the Wan2.1 VAE
def test_streamed_decode_concatenates_to_diffusers_decode(model):
    from diffusers import AutoencoderKLWan

    from artifex.models.configs import vae_kwargs

    spec = get_model(model)
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**vae_kwargs(spec)).eval()
    _, t, h, w = spec.latent_shape(64, 48, 9)
    z = torch.randn(1, spec.vae.z_dim, t, h, w)
    assert can_stream(vae)  # a fresh VAE too (its feature caches appear at its first clear_cache)
    with torch.no_grad():
        whole = vae.decode(z, return_dict=False)[0]
        chunks = list(decode_stream(vae, z))
    assert len(chunks) == t and chunks[0].shape[2] == 1  # the first latent frame is one pixel frame
    assert torch.equal(torch.cat(chunks, dim=2), whole)
    vae.enable_tiling()
    assert not can_stream(vae)  # tiles go through diffusers' own path


@pytest.mark.parametrize("model", ["tiny-ti2v", "tiny-t2v-moe"])
def test_every_decode_shape_is_met_within_the_warm_ups_latent_frames(model):
    """What a warm-up's short decode rests on (``WARM_UP_DECODE_FRAMES``): in a streamed decode, the last new input
    shape any convolution sees comes before that many latent frames; the rest of a long video repeats them."""
    from diffusers import AutoencoderKLWan

    from artifex.engine.pipeline import WARM_UP_DECODE_FRAMES
    from artifex.models.configs import vae_kwargs

    spec = get_model(model)
    vae = AutoencoderKLWan(**vae_kwargs(spec)).eval()
    _, t, h, w = spec.latent_shape(64, 48, 41)
    first_seen: dict = {}
    frame = [-1]

    def record(module, args):
        first_seen.setdefault((id(module), tuple(args[0].shape)), frame[0])

    convs = [m for m in vae.decoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    hooks = [m.register_forward_pre_hook(record) for m in convs]
    with torch.no_grad():
        for _ in decode_stream(vae, torch.randn(1, spec.vae.z_dim, t, h, w)):
            frame[0] += 1  # the chunk of latent frame k arrived; latent frame k + 1 decodes next
    for hk in hooks:
        hk.remove()
    seen_at = [k + 1 for k in first_seen.values()]  # the latent frame at which each shape first appeared
    assert t == 11 and len(seen_at) > len(convs)  # some convolutions meet more than one shape
    assert 0 < max(seen_at) < WARM_UP_DECODE_FRAMES  # > 0: counted per latent frame


def _frames(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_background_mp4_stream_writes_what_write_mp4_writes(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(9, 48, 64, 3), dtype=np.uint8)
    write_mp4(frames, tmp_path / "plain.mp4", fps=16)
    out = Mp4Stream(tmp_path / "stream.mp4", fps=16, background=True)
    for chunk in (frames[:1], frames[1:5], frames[5:]):
        out.add(chunk)
    assert out.close() == tmp_path / "stream.mp4"
    assert np.array_equal(_frames(tmp_path / "stream.mp4"), _frames(tmp_path / "plain.mp4"))
    assert not list(tmp_path.glob(".*partial*"))
    sync = Mp4Stream(tmp_path / "sync.mp4", fps=16)
    sync.add(frames[:1])
    assert sync._stream.codec_context.thread_type.name == "FRAME"  # x264's frame threads (probe9-h100.json)
    sync.close()


def test_an_aborted_stream_leaves_no_file(tmp_path):
    out = Mp4Stream(tmp_path / "x.mp4", fps=16, background=True)
    out.add(np.zeros((2, 32, 32, 3), dtype=np.uint8))
    out.abort()
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="uint8"):
        Mp4Stream(tmp_path / "y.mp4", fps=16).add(np.zeros((2, 32, 32, 3), dtype=np.float32))


def test_mp4_is_bt709_and_tagged_so_colours_come_back(tmp_path):
    """Flat colour patches: the stream is tagged BT.709 / limited range, its luma is BT.709's (pure red: 16 +
    219 x 0.2126 = 62.6, where swscale's default BT.601 gives 81.5), and decoding by the tags returns the colours."""
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [200, 150, 120], [128, 128, 128]], dtype=np.uint8)
    frames = np.repeat(np.repeat(colours[:, None, None, :], 32, 1), 32, 2)  # one 32x32 frame per colour
    write_mp4(frames, tmp_path / "c.mp4", fps=16)
    with av.open(str(tmp_path / "c.mp4")) as c:
        cc = c.streams.video[0].codec_context
        assert (cc.color_primaries, cc.color_trc, cc.colorspace, cc.color_range) == (1, 1, 1, 1)
        decoded = list(c.decode(video=0))
    planes = np.stack([f.to_ndarray(format="yuv420p") for f in decoded]).astype(float)  # (T, 48, 32): Y, U, V
    y, u, v = planes[:, :32], planes[:, 32:40].reshape(-1, 16, 16), planes[:, 40:].reshape(-1, 16, 16)
    assert abs(y[0, 16, 16] - 63) <= 1
    # BT.709 limited range back to RGB at each patch's centre (chroma is stored at half resolution)
    yc, uc, vc = (y[:, 16, 16] - 16) * 255 / 219, (u[:, 8, 8] - 128) * 255 / 224, (v[:, 8, 8] - 128) * 255 / 224
    rgb = np.stack([yc + 1.5748 * vc, yc - 0.1873 * uc - 0.4681 * vc, yc + 1.8556 * uc], axis=1)
    assert np.abs(rgb - colours).max() <= 4
