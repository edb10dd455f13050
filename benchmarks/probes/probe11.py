"""probe11: what a fresh process pays the first time it decodes, and what its imports and exit cost.

In `artifex generate` (a fresh process) the TI2V-5B 1280x704x121 decode took 5.9-6.7 s, in the server's first job
after its warm-up 4.28 s (ttv-h200.json). This probe decodes the same shape (random latents, the VAE at TI2V-5B's
config with random weights, bf16, Artifex's fused norms, channels_last_3d: the GPU default plan) in fresh child
processes:

- cold: the whole decode twice (the first pays every kernel's and cuDNN plan's first use);
- serial: the first three latent frames (every shape of the whole decode: pipeline.WARM_UP_DECODE_FRAMES), then the
  whole decode;
- overlap_same / overlap_side: a bf16 matmul loop standing in for the denoise on the main thread while another
  thread decodes the first three latent frames on the same / on a side CUDA stream; the loop's rate with and
  without it, then the whole decode.

Besides: the import profile of `import_libraries()` (python -X importtime, five processes: the first compiles the
bytecode; ARTIFEX_LAZY_IMPORTS off and on), the host-to-device copy rate from pinned memory, and a process's exit
after it held the GPU.
Usage: probe11.py OUT_DIR
"""
import json
import os
import subprocess
import sys
import time

OUT = sys.argv[1] if len(sys.argv) > 1 else "/tmp/out"
CHILD = """
import json, os, sys, threading, time
t_start = time.perf_counter()
from artifex import timeline
timeline.import_libraries()
import torch
from diffusers import AutoencoderKLWan
from artifex.engine.vae import accelerate_vae, set_layout, decode_stream
from artifex.models.configs import vae_kwargs
from artifex.models.registry import get_model
mode = sys.argv[1]
res = {"mode": mode, "imports_s": time.perf_counter() - t_start}
t = time.perf_counter(); torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
res["cuda_init_s"] = time.perf_counter() - t
spec = get_model("ti2v-5b")
torch.manual_seed(0)
with torch.device("cuda"):
    vae = AutoencoderKLWan(**vae_kwargs(spec)).to(torch.bfloat16).eval()
accelerate_vae(vae, on=True)
set_layout(vae, True)
g = torch.Generator("cuda").manual_seed(1)
z = torch.randn(1, vae.config.z_dim, 31, 44, 80, device="cuda", generator=g).to(torch.bfloat16)
z = z.contiguous(memory_format=torch.channels_last_3d)

def decode(frames=None, stream=None):
    x = z if frames is None else z[:, :, :frames]
    t = time.perf_counter()
    with torch.no_grad(), torch.cuda.stream(stream or torch.cuda.current_stream()):
        n = 0
        for out in decode_stream(vae, x):
            n += out.shape[2]
            v = out[0].float().add(1).mul(127.5).round().to(torch.uint8).cpu()  # the writer's copy per chunk
    torch.cuda.synchronize()
    return round(time.perf_counter() - t, 4), n

a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
def loop(seconds):  # matmuls in 0.1 s batches: products per second
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        for _ in range(50):
            a @ b
        torch.cuda.synchronize(); n += 50
    return n / (time.perf_counter() - t)

if mode == "cold":
    res["first_s"], res["frames"] = decode()
    res["second_s"], _ = decode()
elif mode == "serial":
    res["warm3_s"], _ = decode(3)
    res["whole_s"], res["frames"] = decode()
else:
    loop(1.0)
    res["loop_alone_per_s"] = loop(3.0)
    stream = torch.cuda.Stream() if mode == "overlap_side" else None
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream())
    box = {}
    th = threading.Thread(target=lambda: box.update(w=decode(3, stream)))
    t = time.perf_counter(); th.start()
    n = 0
    while th.is_alive():
        for _ in range(50):
            a @ b
        torch.cuda.synchronize(); n += 50
    th.join()
    span = time.perf_counter() - t
    res["overlap_window_s"] = round(span, 4)
    res["loop_during_per_s"] = n / span
    res["warm3_in_thread_s"] = box["w"][0]
    # GPU time the warm-up took from the loop, in seconds of loop work
    res["loop_lost_s"] = round(span - n / res["loop_alone_per_s"], 4)
    torch.cuda.synchronize()
    res["whole_s"], res["frames"] = decode()
res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
print("RESULT " + json.dumps(res), flush=True)
"""

EXIT_CHILD = """
import time, torch
x = torch.empty(int(20 * 2**30), dtype=torch.uint8, device="cuda"); torch.cuda.synchronize()
h = torch.empty(int(4 * 2**30), dtype=torch.uint8).pin_memory()
print("EXITING", time.time(), flush=True)
"""


def child(code: str, *args: str, env=None, timeout=300) -> tuple[str, str, float]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, *(["-c", code] if code else []), *args], capture_output=True, text=True,
                       timeout=timeout, env=env)
    return p.stdout, p.stderr, time.perf_counter() - t


def main() -> None:
    import torch

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    code = ("import json; from artifex import timeline; timeline.import_libraries(); "
            "print(json.dumps(timeline.imports_section() | {'imports': timeline.imports_s()}))")
    for i, lazy in enumerate(("off", "off", "on", "off", "on"), 1):  # the first one compiles torch's bytecode
        out, err, wall = child("", "-X", "importtime", "-c", code, env=os.environ | {"ARTIFEX_LAZY_IMPORTS": lazy})
        with open(f"{OUT}/importtime-{i}-lazy-{lazy}.txt", "w") as f:
            f.write(err)
        groups = json.loads(out.strip().splitlines()[-1]) if out else err[-800:]
        res.setdefault("imports", []).append({"lazy": lazy, "process_s": round(wall, 3), "groups": groups})
    for mode in ("cold", "serial", "overlap_same", "overlap_side", "cold"):
        out, err, wall = child(CHILD, mode)
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        r = json.loads(line[0][7:]) if line else {"mode": mode, "error": err[-2000:]}
        r["process_s"] = round(wall, 3)
        res["runs"].append(r)
        print(r, flush=True)
    # pinned host -> GPU
    h = torch.empty(4 * 2**30, dtype=torch.uint8).pin_memory()
    h.random_(0, 255)
    d = torch.empty_like(h, device="cuda")
    rates = []
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        d.copy_(h, non_blocking=True)
        torch.cuda.synchronize()
        rates.append(h.numel() / (time.perf_counter() - t) / 1e9)
    res["h2d_pinned_gb_s"] = sorted(rates)[2]
    del h, d
    for _ in range(2):
        t = time.time()
        p = subprocess.run([sys.executable, "-c", EXIT_CHILD], capture_output=True, text=True, timeout=120)
        end = time.time()
        said = [float(ln.split()[1]) for ln in p.stdout.splitlines() if ln.startswith("EXITING")]
        res.setdefault("exit_after_gpu_s", []).append(round(end - said[0], 3) if said else p.stderr[-500:])
    with open(f"{OUT}/probe11.json", "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
