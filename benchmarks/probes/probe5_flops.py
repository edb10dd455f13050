"""The convolution FLOPs of one Wan2.2 VAE decode (TI2V-5B, 1280x704x121), counted on the meta device (no
weights, no GPU): 2 x output elements x (kernel volume x input channels / groups) summed over every Conv2d/Conv3d
call of ``engine.vae.decode_stream``. probe5 divides its convolution time by this. Runs anywhere:
``PYTHONPATH=src python benchmarks/probes/probe5_flops.py OUT``."""
import collections
import json
import math
import sys

import torch
from diffusers import AutoencoderKLWan

from artifex.engine.vae import decode_stream
from artifex.models.configs import vae_kwargs
from artifex.models.registry import get_model

spec = get_model("ti2v-5b")
with torch.device("meta"):
    vae = AutoencoderKLWan(**vae_kwargs(spec))
flops = collections.Counter()


def count(m, args, out):
    key = f"{type(m).__name__} {m.in_channels}->{m.out_channels} k{tuple(m.kernel_size)} out{tuple(out.shape[2:])}"
    flops[key] += 2 * out.numel() * math.prod(m.kernel_size) * m.in_channels // m.groups


for m in vae.decoder.modules():
    if isinstance(m, torch.nn.Conv3d | torch.nn.Conv2d):
        m.register_forward_hook(count)
_, t, h, w = spec.latent_shape(1280, 704, 121)
frames = 0
with torch.no_grad():
    for px in decode_stream(vae, torch.empty(1, spec.vae.z_dim, t, h, w, device="meta")):
        frames += px.shape[2]
res = {"model": "ti2v-5b", "video": "1280x704x121", "frames_decoded": frames,
       "conv_pflop": round(sum(flops.values()) / 1e15, 4),
       "largest_tflop": {k: round(v / 1e12, 1) for k, v in flops.most_common(8)}}
print(json.dumps(res, indent=1))
open(f"{sys.argv[1]}/probe5-flops.json", "w").write(json.dumps(res, indent=1) + "\n")
