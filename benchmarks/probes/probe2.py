"""FA3 with v as a strided view of the fused q/k/v output (as the block passes it) vs a contiguous v."""
import json, statistics, sys
import torch
import fa3_fwd_interface as fa3
OUT = sys.argv[1]
dev = torch.device("cuda")

def med(fn, sets, warm=3, iters=15):
    for i in range(warm):
        fn(*sets[i % len(sets)])
    torch.cuda.synchronize()
    ts = []
    for i in range(iters):
        s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
        s.record(); fn(*sets[i % len(sets)]); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    return round(statistics.median(ts), 4)

def fa(q, k, v):
    o = fa3.flash_attn_func(q, k, v)
    return o[0] if isinstance(o, tuple) else o

res = {"gpu": torch.cuda.get_device_name(0)}
L, H, D = 27280, 24, 128
qkv = [torch.randn(1, L, 3 * H * D, device=dev, dtype=torch.bfloat16) for _ in range(2)]
strided = [(t[..., :H * D].reshape(1, L, H, D).contiguous(), t[..., H * D:2 * H * D].reshape(1, L, H, D).contiguous(),
            t[..., 2 * H * D:].unflatten(2, (H, D))) for t in qkv]
contig = [(q, k, v.contiguous()) for q, k, v in strided]
res["v_strided_ms"] = med(fa, strided)
res["v_contiguous_ms"] = med(fa, contig)
res["v_strided_ms_again"] = med(fa, strided)
json.dump(res, open(f"{OUT}/probe2.json", "w"), indent=1)
print(res)
