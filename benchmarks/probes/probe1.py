"""Probe: where the attention time goes (self vs cross, bf16 vs fp8), alternatives for the cross-attention,
B=2 vs B=1 forward and the pipeline's per-step extras. Exploratory; results to $OUT."""
import json, os, statistics, sys, time, traceback
import torch, torch.nn.functional as F
import fa3_fwd_interface as fa3
from artifex.kernels.fp8_attention import quantize_fp8, _quantize
from artifex.bench.report import kernel_breakdown
OUT = sys.argv[1]
dev = torch.device("cuda")
res = {"gpu": torch.cuda.get_device_name(0)}

def med(fn, sets, warm=3, iters=12):
    for i in range(warm):
        fn(*sets[i % len(sets)])
    torch.cuda.synchronize()
    ts = []
    for i in range(iters):
        s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
        s.record(); fn(*sets[i % len(sets)]); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    return round(statistics.median(ts), 4)

def save():
    json.dump(res, open(f"{OUT}/probe1.json", "w"), indent=1)

def rnd(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device=dev, dtype=dtype)

def fa(q, k, v, **kw):
    o = fa3.flash_attn_func(q, k, v, **kw)
    return o[0] if isinstance(o, tuple) else o

for name, L, H in (("ti2v", 27280, 24), ("a14b", 75600, 40)):
    D, S = 128, 512
    r = res[name] = {}
    for B in ((1, 2) if name == "ti2v" else (1,)):
        sets = [(rnd(B, L, H, D), rnd(B, L, H, D), rnd(B, L, H, D)) for _ in range(2)]
        r[f"self_fa3_B{B}_ms"] = med(fa, sets)
        q8 = [tuple(quantize_fp8(t)[0] for t in s) for s in sets]
        ds = torch.ones(B, H, device=dev)
        r[f"self_fa3fp8_kernel_B{B}_ms"] = med(lambda q, k, v: fa(q, k, v, q_descale=ds, k_descale=ds, v_descale=ds), q8)
        r[f"quantize_qkv_B{B}_ms"] = med(lambda q, k, v: [_quantize(t, "head") for t in (q, k, v)], sets)
        del sets, q8
        csets = [(rnd(B, L, H, D), rnd(B, S, H, D), rnd(B, S, H, D)) for _ in range(2)]
        r[f"cross_fa3_B{B}_ms"] = med(fa, csets)
        ref = fa(*csets[0]).float()
        def cudnn(q, k, v):
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        def effic(q, k, v):
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        def mathbmm(q, k, v):
            qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
            s = torch.matmul(qh, kh.transpose(-1, -2)) * (D ** -0.5)
            return torch.matmul(torch.softmax(s, -1), vh).transpose(1, 2)
        for nm, fn in (("cudnn", cudnn), ("efficient", effic), ("mathbmm", mathbmm)):
            try:
                r[f"cross_{nm}_B{B}_ms"] = med(fn, csets)
                o = fn(*csets[0]).float()
                r[f"cross_{nm}_B{B}_relerr"] = round(float((o - ref).norm() / ref.norm()), 6)
            except Exception as e:
                r[f"cross_{nm}_B{B}_error"] = repr(e)[:300]
        c8 = [tuple(quantize_fp8(t)[0] for t in s) for s in csets]
        r[f"cross_fa3fp8_kernel_B{B}_ms"] = med(lambda q, k, v: fa(q, k, v, q_descale=ds, k_descale=ds, v_descale=ds), c8)
        for ns in (2, 4):
            try:
                r[f"cross_fa3_splits{ns}_B{B}_ms"] = med(lambda q, k, v: fa(q, k, v, num_splits=ns), csets)
            except Exception as e:
                r[f"cross_fa3_splits{ns}_error"] = repr(e)[:200]
        del csets, c8
        torch.cuda.empty_cache()
        save()
print(json.dumps(res, indent=1), flush=True)

# The whole forward, B=1 vs B=2, and the pipeline step's extras.
try:
    from artifex.bench.dit import build_model, inputs_for
    from artifex.attention import install, runtime_from_config
    from artifex.config import OptimizationConfig
    from artifex.engine.dit import accelerate_model
    from artifex.env import read_env
    spec, m = build_model("ti2v-5b", dev, torch.bfloat16)
    text, sets = inputs_for(spec, m.config.text_dim, 1280, 704, 121, dev, torch.bfloat16)
    runtime = runtime_from_config(OptimizationConfig(), read_env().home)
    tokens = spec.tokens(1280, 704, 121)
    runtime.prepare((2, tokens, 24, 128), torch.bfloat16, dev)
    install([m], runtime)
    accelerate_model(m, compile_blocks=True)
    uncond = torch.randn_like(text)
    pair = torch.cat([text, uncond])
    f = res["forward"] = {}
    with torch.no_grad():
        one = lambda x, ts, _: m(hidden_states=x, timestep=ts, encoder_hidden_states=text, return_dict=False)[0]
        two = lambda x, ts, _: m(hidden_states=torch.cat([x, x]), timestep=torch.cat([ts, ts]), encoder_hidden_states=pair, return_dict=False)[0]
        t0 = time.time(); one(*sets[0]); torch.cuda.synchronize(); f["compile_B1_s"] = round(time.time() - t0, 1)
        f["B1_ms"] = med(one, sets, 2, 6)
        t0 = time.time(); two(*sets[0]); torch.cuda.synchronize(); f["compile_B2_s"] = round(time.time() - t0, 1)
        f["B2_ms"] = med(two, sets, 2, 6)
        save()
        f["B1_kernels"] = kernel_breakdown(lambda: one(*sets[1]), dev, top=20)
        f["B2_kernels"] = kernel_breakdown(lambda: two(*sets[1]), dev, top=20)
        save()
        # scheduler step + CFG combine at the real latent shape (fp32), as Engine.denoise runs them
        from diffusers import UniPCMultistepScheduler
        sch = UniPCMultistepScheduler(flow_shift=5.0, use_flow_sigmas=True, prediction_type="flow_prediction")
        sch.set_timesteps(50, device=dev)
        lat = sets[0][0].float()
        both = torch.randn(2, *lat.shape[1:], device=dev)
        def step(i):
            pos, neg = both.chunk(2)
            noise = neg + 5.0 * (pos - neg)
            return sch.step(noise, sch.timesteps[i], lat, return_dict=False)[0]
        ts = []
        for i in range(10):
            torch.cuda.synchronize(); t0 = time.perf_counter(); step(i); torch.cuda.synchronize(); ts.append(time.perf_counter() - t0)
        f["scheduler_cfg_step_ms"] = [round(1e3 * t, 3) for t in ts]
        save()
except Exception:
    res["forward_error"] = traceback.format_exc()[-3000:]
save()
print(json.dumps({k: v for k, v in res.get("forward", {}).items() if "kernels" not in k}, indent=1))
