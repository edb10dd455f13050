"""probe6: is FA3 slower right after the block's GEMMs than back to back (the forward's attention runs ~9% below
its isolated rate on an H100)? FA3 at TI2V-5B 720p timed alone, then each call preceded by the block's bf16 GEMMs
(q/k/v, FFN up, FFN down), with the SM clock and power sampled by nvidia-smi every 50 ms."""
import json, statistics, subprocess, sys, time
import torch
import fa3_fwd_interface as fa3

OUT = sys.argv[1]
dev, dt = torch.device("cuda"), torch.bfloat16
L, H, D, C, F = 27280, 24, 128, 3072, 14336
g = torch.Generator(dev).manual_seed(0)
qkv = [tuple(torch.randn(1, L, H, D, device=dev, dtype=dt, generator=g) for _ in range(3)) for _ in range(3)]
x = torch.randn(L, C, device=dev, dtype=dt, generator=g)
h = torch.randn(L, F, device=dev, dtype=dt, generator=g)
w_qkv = torch.randn(3 * C, C, device=dev, dtype=dt, generator=g) * 0.02
w_up = torch.randn(F, C, device=dev, dtype=dt, generator=g) * 0.02
w_down = torch.randn(C, F, device=dev, dtype=dt, generator=g) * 0.02


def attn(i):
    q, k, v = qkv[i % 3]
    o = fa3.flash_attn_func(q, k, v)
    return o[0] if isinstance(o, tuple) else o


def gemms():
    torch.nn.functional.linear(x, w_qkv)
    torch.nn.functional.linear(x, w_up)
    torch.nn.functional.linear(h, w_down)


def run(n, with_gemms, sleep_ms=0):
    ts, gs = [], []
    for i in range(n):
        if with_gemms:
            s0 = torch.cuda.Event(enable_timing=True); s0.record()
            gemms()
        s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
        s.record(); attn(i); e.record()
        if with_gemms:
            gs.append((s0, s))
        ts.append((s, e))
        if sleep_ms:
            torch.cuda.synchronize(); time.sleep(sleep_ms / 1e3)
    torch.cuda.synchronize()
    a = [s.elapsed_time(e) for s, e in ts]
    return {"attn_ms_median": round(statistics.median(a), 3), "attn_ms_first5": [round(v, 3) for v in a[:5]],
            "gemm_ms_median": round(statistics.median([s.elapsed_time(e) for s, e in gs]), 3) if gs else None}


smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu",
                        "--format=csv,noheader", "-lms", "50"], stdout=open(f"{OUT}/smi.csv", "w"))
res = {"gpu": torch.cuda.get_device_name(0), "phases": {}}
run(10, False)  # warm-up
for name, kw in [("attn_alone", dict(with_gemms=False)), ("attn_after_gemms", dict(with_gemms=True)),
                 ("attn_alone_again", dict(with_gemms=False)),
                 ("attn_alone_idle_gaps", dict(with_gemms=False, sleep_ms=30))]:
    t0 = time.time()
    r = run(40, **kw)
    r["wall"] = [t0, time.time()]
    res["phases"][name] = r
    print(name, r, flush=True)
    time.sleep(1.0)
smi.terminate()
flops = 4 * L * L * H * D
for r in res["phases"].values():
    r["attn_tflops"] = round(flops / (r["attn_ms_median"] / 1e3) / 1e12, 1)
json.dump(res, open(f"{OUT}/probe6.json", "w"), indent=1)
