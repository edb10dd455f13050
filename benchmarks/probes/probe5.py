"""probe5: where the accelerated VAE decode's time goes (TI2V-5B 1280x704x121, bf16, channels_last_3d), by aten
op and by kernel, and whether cuDNN's autotuner (cudnn.benchmark) finds faster convolutions."""
import json
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from artifex.engine.vae import accelerate_vae, decode_stream
from artifex.models.configs import vae_kwargs
from artifex.models.registry import get_model

out_dir = sys.argv[1]
dev, dt = torch.device("cuda"), torch.bfloat16
spec = get_model("ti2v-5b")
torch.manual_seed(0)
with torch.device(dev):
    from diffusers import AutoencoderKLWan
    vae = AutoencoderKLWan(**vae_kwargs(spec)).to(dt).eval()
accelerate_vae(vae)
for p in vae.parameters():
    if p.dim() == 5:
        p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
_, t, h, w = spec.latent_shape(1280, 704, 121)
z = torch.randn(1, spec.vae.z_dim, t, h, w, device=dev, dtype=dt).contiguous(memory_format=torch.channels_last_3d)


def decode(zz):
    with torch.no_grad():
        n = 0
        for px in decode_stream(vae, zz):
            n += px.shape[2]
    torch.cuda.synchronize()
    return n


res = {}
decode(z[:, :, :3])
times = []
for _ in range(2):
    s = time.perf_counter()
    decode(z)
    times.append(time.perf_counter() - s)
res["seconds"] = times
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    decode(z)
ka = prof.key_averages()
ops = sorted([e for e in ka if e.key.startswith("aten::") and e.self_device_time_total > 0],
             key=lambda e: -e.self_device_time_total)
res["ops_self_ms"] = [(e.key, round(e.self_device_time_total / 1e3, 1), e.count) for e in ops[:25]]
kern = sorted([e for e in ka if e.device_type.name == "CUDA"], key=lambda e: -e.self_device_time_total)
res["kernels_ms"] = [(e.key[:200], round(e.self_device_time_total / 1e3, 1), e.count) for e in kern[:25]]
res["kernel_total_ms"] = round(sum(e.self_device_time_total for e in kern) / 1e3, 1)
torch.backends.cudnn.benchmark = True
s = time.perf_counter()
decode(z[:, :, :3])
res["benchmark_warmup_s"] = time.perf_counter() - s
times = []
for _ in range(2):
    s = time.perf_counter()
    decode(z)
    times.append(time.perf_counter() - s)
res["seconds_cudnn_benchmark"] = times
print(json.dumps(res, indent=1))
open(f"{out_dir}/probe5.json", "w").write(json.dumps(res, indent=1))
