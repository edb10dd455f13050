"""Tune the ada_norm kernel's rows per program and warps (TI2V 720p, bf16 norm1 / norm3 and fp8 norm3)."""
import json, statistics, sys
import torch, triton
from artifex.kernels import ada_norm as an
from artifex.kernels.fp8 import _TINY, FP8_MAX, FP8
OUT = sys.argv[1]
dev = torch.device("cuda")

def med(fn, sets, warm=5, iters=30):
    for i in range(warm):
        fn(*sets[i % len(sets)])
    torch.cuda.synchronize()
    ts = []
    for i in range(iters):
        s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
        s.record(); fn(*sets[i % len(sets)]); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    return round(statistics.median(ts), 4)

n, c = 27280, 3072
g = torch.Generator(dev).manual_seed(0)
mod = torch.randn(1, 6, c, device=dev, generator=g) * 0.3
sets = [(torch.randn(1, n, c, device=dev, dtype=torch.bfloat16, generator=g),
         torch.randn(1, n, c, device=dev, dtype=torch.bfloat16, generator=g)) for _ in range(3)]
res = {"gpu": torch.cuda.get_device_name(0)}
xo = torch.empty(1, n, c, device=dev, dtype=torch.bfloat16)
hb = torch.empty(1, n, c, device=dev, dtype=torch.bfloat16)
h8 = torch.empty(n, c, device=dev, dtype=FP8)
sc = torch.empty(n, 1, device=dev)
for form, (shift, scale, gate, has_res, q) in {"norm1": (0, 1, -1, False, False), "norm3": (3, 4, -1, True, False),
                                              "norm3_fp8": (3, 4, -1, True, True), "norm2_fp8": (-1, -1, 2, True, True)}.items():
    for rows in (1, 2, 4, 8, 16, 32):
        for warps in (4, 8, 16):
            def run(x, r):
                an._ada_norm_kernel[(triton.cdiv(n, rows),)](x, r, mod, x, x, x, xo, h8 if q else hb, sc, n, n, c, 1e-6,
                    _TINY, FP8_MAX, SHIFT=shift, SCALE=scale, GATE=gate, HAS_RES=has_res, HAS_INDEX=False,
                    AFFINE=False, QUANTIZE=q, ROWS=rows, BLOCK=4096, num_warps=warps)
            try:
                res[f"{form}_r{rows}_w{warps}"] = med(run, sets)
            except Exception as e:
                res[f"{form}_r{rows}_w{warps}"] = repr(e)[:100]
    best = min((v, k) for k, v in res.items() if k.startswith(form + "_r") and isinstance(v, float))
    print(form, best, flush=True)
json.dump(res, open(f"{OUT}/probe3.json", "w"), indent=1)
