#!/usr/bin/env python3
"""GPU check of artifex.kernels: each fast path against its twin (relative L2) and timed, at real Wan shapes.

    python scripts/check_kernels.py [--iters 30] [--warmup 5] [--only qk,fp8,rows,attn,ada,vae] [--out result.json]

Sections (each runs on its own; a failure is recorded in the JSON and the others still run):
- qk: fused q/k RMS norm + rotary (Triton) vs its PyTorch twin and vs diffusers' unfused math,
  TI2V-5B 720p shape (B=2, L=27280, 24 heads, D=128, bf16).
- fp8: Fp8Linear (row-wise torch._scaled_mm, eager and compiled) vs the bf16 nn.Linear at the
  TI2V-5B DiT GEMM shapes (27280 tokens).
- rows: the one-pass fp8 row quantization (Triton; with tanh-GELU for the feed-forward) vs its twin
  and vs the compiled PyTorch form it replaces, at the TI2V-5B 720p widths (3072, 14336):
  equality of the e4m3 values and scales, GB/s.
- attn: fa3-fp8 (per-head and per-tensor scales; with and without the quantization) vs bf16
  FA3 / SDPA, TI2V-5B and A14B 720p shapes (rel L2 vs bf16, TFLOP/s).
- vae: the VAE's fused RMS norm + SiLU (Triton) vs diffusers' modules at the TI2V-5B 720p decoder's shapes
  (bf16, both layouts: equal fraction, ms), and whole decodes with diffusers' and Artifex's VAE pieces.
- ada: the one-pass adaptive norms (Triton; the block's three forms, bf16 out and fp8 rows) vs their twin
  compiled by inductor, TI2V-5B 720p (equality of the residual stream, rel L2 of the norm, ms).

Timing: CUDA events, warm-up, median over --iters calls rotating 3 input sets (so no call reads
what the previous one left in L2). Prints a line per measurement and one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

SETS = 3


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def time_ms(fn, inputs: list, warmup: int, iters: int) -> float:
    """Median ms of fn over the rotated input sets on the GPU (Artifex's benchmark timer)."""
    from artifex.bench.report import median_ms

    return median_ms(fn, inputs, torch.device("cuda"), warmup, iters)


def free() -> None:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


# -- fused q/k norm + rope ------------------------------------------------------------------
def check_qk(args) -> dict:
    from artifex.kernels import qk_norm_rope as qnr

    b, n, h, d = 2, 27280, 24, 128
    dev, dt = torch.device("cuda"), torch.bfloat16
    out = {"shape": [b, n, h, d], "dtype": "bf16", "decision": vars(qnr.decide(dev, dt))}
    try:  # the real rotary table: TI2V-5B 1280x704x121 -> latent 31x44x80, patch (1, 2, 2)
        from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

        rope = WanRotaryPosEmbed(d, (1, 2, 2), 1024)
        freqs_cos, freqs_sin = (t.to(dev, torch.float32) for t in rope(torch.empty(1, 48, 31, 44, 80,
                                                                                   device="meta")))
        cos, sin = qnr.rope_table(rope, (1, 48, 31, 44, 80), dev)
        out["rope"] = "diffusers WanRotaryPosEmbed"
    except Exception as e:  # diffusers missing: a synthetic table of the same shape
        ang = torch.rand(n, d // 2, device=dev) * 100
        cos, sin = ang.cos(), ang.sin()
        freqs_cos, freqs_sin = (t.repeat_interleave(2, -1)[None, :, None] for t in (cos, sin))
        out["rope"] = f"synthetic ({type(e).__name__})"
    g = torch.Generator(dev).manual_seed(0)
    w = h * d
    weight_q = (1 + 0.1 * torch.randn(w, device=dev, generator=g)).to(dt)
    weight_k = (1 + 0.1 * torch.randn(w, device=dev, generator=g)).to(dt)
    sets = [tuple(torch.randn(b, n, w, device=dev, dtype=dt, generator=g) * 2 for _ in range(2)) for _ in range(SETS)]
    eps = 1e-6
    norm_q, norm_k = (torch.nn.RMSNorm(w, eps=eps).to(dev, dt) for _ in range(2))
    with torch.no_grad():
        norm_q.weight.copy_(weight_q)
        norm_k.weight.copy_(weight_k)

    def diffusers_unfused(q, k):  # WanAttnProcessor: norm over all heads, unflatten, rotate pairs
        def rotate(x):
            x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
            c, s = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
            o = torch.empty_like(x)
            o[..., 0::2] = x1 * c - x2 * s
            o[..., 1::2] = x1 * s + x2 * c
            return o.type_as(x)

        return rotate(norm_q(q).unflatten(2, (h, -1))), rotate(norm_k(k).unflatten(2, (h, -1)))

    def triton_path(q, k):
        return qnr.qk_norm_rope(q, k, weight_q, weight_k, eps, cos, sin, h, path="triton")

    def twin(q, k):
        return qnr.qk_norm_rope(q, k, weight_q, weight_k, eps, cos, sin, h, path="torch")

    with torch.no_grad():
        q, k = sets[0]
        exact = qnr.qk_norm_rope(q.float(), k.float(), weight_q, weight_k, eps, cos, sin, h, path="torch")
        tq, tk = triton_path(q, k)
        rq, rk = twin(q, k)
        dq, dk = diffusers_unfused(q, k)
        out["rel_l2_triton_vs_twin"] = max(rel_l2(tq, rq), rel_l2(tk, rk))
        out["max_abs_triton_vs_twin"] = max((tq.float() - rq.float()).abs().max().item(),
                                            (tk.float() - rk.float()).abs().max().item())
        out["rel_l2_vs_fp32"] = {"triton": max(rel_l2(tq, exact[0]), rel_l2(tk, exact[1])),
                                 "diffusers_unfused": max(rel_l2(dq, exact[0]), rel_l2(dk, exact[1]))}
        # strided input (q, k as views of a fused qkv projection) gives the same result
        qkv = torch.cat([q, k, q], dim=-1)
        vq, vk = triton_path(*qkv.chunk(3, dim=-1)[:2])
        out["strided_input_equal"] = bool(torch.equal(vq, tq) and torch.equal(vk, tk))
        del qkv, vq, vk, exact
        # e4m3 output at static per-head scales (fp8 attention): e4m3 values against the twin's
        (fq, fdq), (fk, _) = qnr.qk_norm_rope_fp8(q, k, weight_q, weight_k, eps, cos, sin, h, path="triton")
        (gq, _), (gk, _) = qnr.qk_norm_rope_fp8(q, k, weight_q, weight_k, eps, cos, sin, h, path="torch")
        out["fp8_values_differ_fraction"] = max((fq.float() != gq.float()).float().mean().item(),
                                                (fk.float() != gk.float()).float().mean().item())
        out["fp8_rel_l2_dequantized_vs_bf16"] = rel_l2(fq.float() * fdq[:, None, :, None], tq)
        out["fp8_max_abs_over_448"] = max(fq.float().abs().max().item(), fk.float().abs().max().item()) / 448
        del fq, fk, gq, gk

        def triton_fp8(q, k):
            return qnr.qk_norm_rope_fp8(q, k, weight_q, weight_k, eps, cos, sin, h, path="triton")

        ms = {name: time_ms(fn, sets, args.warmup, args.iters)
              for name, fn in (("triton", triton_path), ("twin", twin), ("diffusers_unfused", diffusers_unfused),
                               ("triton_fp8", triton_fp8))}
    moved = 2 * 2 * b * n * w * 2  # read q and k, write both, bf16
    out["ms"] = ms
    out["GB_per_s"] = {k_: moved / (v * 1e-3) / 1e9 for k_, v in ms.items()}
    out["speedup_vs_diffusers"] = ms["diffusers_unfused"] / ms["triton"]
    log(f"qk_norm_rope: triton {ms['triton']:.3f} ms, twin {ms['twin']:.3f} ms, diffusers {ms['diffusers_unfused']:.3f}"
        f" ms; rel L2 triton vs twin {out['rel_l2_triton_vs_twin']:.2e}")
    del sets
    free()
    return out


# -- fp8 linear -------------------------------------------------------------------------------
def check_fp8(args) -> dict:
    from artifex.kernels import fp8

    dev = torch.device("cuda")
    out = {"decision": vars(fp8.decide(dev)), "shapes": []}
    m = 27280
    for k_in, n_out in ((3072, 3072), (3072, 14336), (14336, 3072)):
        row = {"M": m, "K": k_in, "N": n_out}
        try:
            torch.manual_seed(0)
            lin = torch.nn.Linear(k_in, n_out, device=dev, dtype=torch.bfloat16)
            layer = fp8.Fp8Linear.from_linear(lin, path="scaled_mm")
            sets = [(torch.randn(m, k_in, device=dev, dtype=torch.bfloat16),) for _ in range(SETS)]
            with torch.no_grad():
                x = sets[0][0]
                ref32 = x.float() @ lin.weight.float().t() + lin.bias.float()
                real, twin = layer(x), layer.forward_twin(x)
                row["rel_l2_fp8_vs_fp32"] = rel_l2(real, ref32)
                row["rel_l2_bf16_vs_fp32"] = rel_l2(lin(x), ref32)
                row["rel_l2_fp8_vs_twin"] = rel_l2(real, twin)
                del ref32, real, twin
                values, scale = fp8.quantize_rows(x)
                w8, ws = layer.weight_fp8.t(), layer.weight_scale[None, :]
                bias = layer.bias.to(torch.bfloat16)
                compiled = torch.compile(layer, dynamic=False)
                ms = {"bf16_linear": time_ms(lin, sets, args.warmup, args.iters),
                      "fp8_eager": time_ms(layer, sets, args.warmup, args.iters),
                      "fp8_compiled": time_ms(compiled, sets, args.warmup + 2, args.iters),
                      "scaled_mm_only": time_ms(lambda _x, a=values, sa=scale, w=w8, sw=ws, c=bias: torch._scaled_mm(
                          a, w, scale_a=sa, scale_b=sw, bias=c, out_dtype=torch.bfloat16), sets, args.warmup,
                          args.iters)}
            flops = 2 * m * k_in * n_out
            row["ms"] = ms
            row["TFLOP_per_s"] = {k_: flops / (v * 1e-3) / 1e12 for k_, v in ms.items()}
            log(f"fp8 {m}x{k_in}x{n_out}: " + ", ".join(f"{k_} {v:.0f}" for k_, v in row["TFLOP_per_s"].items())
                + f" TFLOP/s; rel L2 vs fp32 {row['rel_l2_fp8_vs_fp32']:.3f} (bf16 {row['rel_l2_bf16_vs_fp32']:.4f})")
            del sets, lin, layer, compiled, values
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:500]
            log(f"fp8 {m}x{k_in}x{n_out}: {row['error']}")
        out["shapes"].append(row)
        free()
    return out


# -- fp8 attention ----------------------------------------------------------------------------
def check_attn(args) -> dict:
    from artifex.attention.backends import BACKENDS, _fa3_module, attention_flops, probe
    from artifex.kernels import fp8_attention as fa

    dev = torch.device("cuda")
    fa3 = _fa3_module()
    out = {"fa3_module": getattr(fa3, "__name__", None),
           "probe_fa3_fp8": probe(BACKENDS["fa3-fp8"], dev, torch.bfloat16, 128) or "ok", "shapes": []}
    for label, shape in (("TI2V-5B 720p", (1, 27280, 24, 128)), ("A14B 720p", (1, 75600, 40, 128))):
        b, n, h, d = shape
        row = {"model": label, "shape": list(shape)}
        flops = attention_flops(b, n, n, h, d)
        try:
            g = torch.Generator(dev).manual_seed(0)
            sets = [tuple(torch.randn(shape, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
                    for _ in range(SETS)]
            runs = {"sdpa_bf16": lambda q, k, v: BACKENDS["sdpa"].run(q, k, v, None, False, 0.0, 1)}
            if fa3 is not None:
                runs["fa3_bf16"] = lambda q, k, v: BACKENDS["fa3"].run(q, k, v, None, False, 0.0, 1)
                for gran in fa.GRANULARITIES:
                    runs[f"fa3_fp8_{gran}"] = (lambda gr: lambda q, k, v: fa.fa3_fp8_attention(
                        fa3, q, k, v, granularity=gr))(gran)
            with torch.no_grad():
                q, k, v = sets[0]
                outs = {name: fn(q, k, v) for name, fn in runs.items()}
                base = "fa3_bf16" if "fa3_bf16" in outs else "sdpa_bf16"
                row["baseline"] = base
                row["rel_l2_vs_baseline"] = {name: rel_l2(o, outs[base]) for name, o in outs.items() if name != base}
                row["finite"] = {name: bool(torch.isfinite(o).all()) for name, o in outs.items()}
                del outs
                ms = {name: time_ms(fn, sets, args.warmup, args.iters) for name, fn in runs.items()}
                if fa3 is not None:  # the kernel alone, on inputs quantized beforehand
                    for gran in fa.GRANULARITIES:
                        pre = [tuple(x for t in s for x in fa.quantize_fp8(t, gran)) for s in sets]

                        def kernel_only(q8, dq, k8, dk, v8, dv):
                            return fa3.flash_attn_func(q8, k8, v8, q_descale=dq, k_descale=dk, v_descale=dv)

                        ms[f"fa3_fp8_{gran}_kernel_only"] = time_ms(kernel_only, pre, args.warmup, args.iters)
                        del pre
            row["ms"] = ms
            row["TFLOP_per_s"] = {name: flops / (t * 1e-3) / 1e12 for name, t in ms.items()}
            log(f"attention {label}: " + ", ".join(f"{k_} {v:.0f}" for k_, v in row["TFLOP_per_s"].items())
                + " TFLOP/s; rel L2 vs " + base + ": "
                + ", ".join(f"{k_} {v:.4f}" for k_, v in row["rel_l2_vs_baseline"].items()))
            del sets
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:500]
            log(f"attention {label}: {row['error']}")
        out["shapes"].append(row)
        free()
    return out


def check_rows(args) -> dict:
    import torch.nn.functional as F

    from artifex.kernels import compile_static, fp8

    dev, dt, m = torch.device("cuda"), torch.bfloat16, 27280
    compiled = compile_static(lambda x, gelu: fp8.quantize_rows(F.gelu(x, approximate="tanh") if gelu else x))
    out = {"rows": m, "shapes": []}
    for width, gelu in ((3072, False), (14336, True)):
        g = torch.Generator(dev).manual_seed(width)
        sets = [(torch.randn(m, width, device=dev, dtype=dt, generator=g) * 3,) for _ in range(SETS)]
        x = sets[0][0]
        with torch.no_grad():
            kv, ks = fp8.quantize_rows_fused(x, gelu, path="triton")
            tv, ts = fp8.quantize_rows_fused(x, gelu, path="torch")
            diff = kv.float() != tv.float()
            row = {"width": width, "gelu": gelu, "values_differ_fraction": diff.float().mean().item(),
                   "max_abs_dequantized_diff": (fp8.dequantize(kv, ks) - fp8.dequantize(tv, ts)).abs().max().item(),
                   "max_rel_scale_diff": ((ks - ts).abs() / ts).max().item()}
            nbytes = m * width * (2 + 1)  # read bf16, write e4m3
            ms = {"triton": time_ms(lambda x, gelu=gelu: fp8.quantize_rows_fused(x, gelu, path="triton"), sets,
                                    args.warmup, args.iters),
                  "compiled_torch": time_ms(lambda x, gelu=gelu: compiled(x, gelu), sets, args.warmup, args.iters)}
        row["ms"] = ms
        row["GB_per_s"] = {k: round(nbytes / (v / 1e3) / 1e9, 1) for k, v in ms.items()}
        log(f"rows {row}")
        out["shapes"].append(row)
        del sets, x, kv, tv
        free()
    return out


def check_ada(args) -> dict:
    """The adaptive norms (kernels.ada_norm) at TI2V-5B 720p (1 x 27280 x 3072, bf16): Triton vs the twin
    compiled by inductor (what the blocks ran before), each of the block's three forms, bf16 and fp8 rows."""
    from artifex.kernels import ada_norm as an
    from artifex.kernels import compile_static, fp8

    dev, dt, n, c = torch.device("cuda"), torch.bfloat16, 27280, 3072
    compiled = compile_static(an.ada_norm_torch)
    g = torch.Generator(dev).manual_seed(5)
    mod = torch.randn(1, 6, c, device=dev, generator=g) * 0.3
    w, b = torch.rand(c, device=dev, generator=g) + 0.5, torch.randn(c, device=dev, generator=g) * 0.1
    forms = {"norm1": dict(shift=0, scale=1), "norm2": dict(res=True, gate=2, weight=w, bias=b),
             "norm3": dict(res=True, shift=3, scale=4)}
    sets = [(torch.randn(1, n, c, device=dev, dtype=dt, generator=g) * 2,
             torch.randn(1, n, c, device=dev, dtype=dt, generator=g)) for _ in range(SETS)]
    out = {"tokens": n, "width": c, "forms": []}
    for name, form in forms.items():
        for quantize in (False, True):
            def run(x, r, path, form=form, quantize=quantize):  # path None: the compiled twin
                kw = {**form, "res": r if form.get("res") else None, "quantize": quantize}
                return an.ada_norm(x, mod, None, 1e-6, path=path, **kw) if path else compiled(x, mod, None, 1e-6,
                                                                                               **kw)

            with torch.no_grad():
                gx, gh = run(*sets[0], "triton")
                tx, th = run(*sets[0], None)
                row = {"form": name, "quantize": quantize}
                if gx is not None:
                    row["x_equal_fraction"] = (gx == tx).float().mean().item()
                if quantize:
                    row["rel_l2_dequantized"] = rel_l2(fp8.dequantize(*gh), fp8.dequantize(*th))
                else:
                    row["rel_l2_h"] = rel_l2(gh, th)
                ms = {"triton": time_ms(lambda x, r: run(x, r, "triton"), sets, args.warmup, args.iters),
                      "compiled_torch": time_ms(lambda x, r: run(x, r, None), sets, args.warmup, args.iters)}
            row["ms"] = ms
            log(f"ada {row}")
            out["forms"].append(row)
    del sets
    free()
    return out


def check_vae(args) -> dict:
    """The Wan2.2 VAE (TI2V-5B) at 1280x704x121, bf16: the fused RMS norm + SiLU (kernels.rms_silu) against
    diffusers' modules at every shape the decoder's norms see (contiguous and channels_last_3d), then whole
    decodes with diffusers' modules, with Artifex's (engine.vae.accelerate_vae), and with those in
    channels_last_3d, and the twelve kernels that take the most time in diffusers' and in Artifex's decode."""
    from diffusers import AutoencoderKLWan
    from diffusers.models.autoencoders import autoencoder_kl_wan as wan
    from torch.profiler import ProfilerActivity, profile

    from artifex.engine.vae import accelerate_vae, decode_stream, set_layout
    from artifex.kernels import rms_silu as rs
    from artifex.models.configs import vae_kwargs
    from artifex.models.registry import get_model

    dev, dt = torch.device("cuda"), torch.bfloat16
    spec = get_model("ti2v-5b")
    torch.manual_seed(0)
    with torch.device(dev):
        vae = AutoencoderKLWan(**vae_kwargs(spec)).to(dt).eval()
    with torch.no_grad():  # norms away from their identity start
        for m in vae.modules():
            if isinstance(m, wan.WanRMS_norm):
                m.gamma.mul_(1 + 0.2 * torch.randn_like(m.gamma))
    _, t, h, w = spec.latent_shape(1280, 704, 121)
    g = torch.Generator(dev).manual_seed(6)
    z = torch.randn(1, spec.vae.z_dim, t, h, w, device=dev, dtype=dt, generator=g)
    distinct: dict = {}  # input shape -> the first norm seen with it

    def record(mod, args):
        if args[0].dim() == 5:  # the residual blocks' and the head's norms (the attention's norm sees 2-D frames)
            distinct.setdefault(tuple(args[0].shape), mod)

    hooks = [m.register_forward_pre_hook(record) for m in vae.decoder.modules() if isinstance(m, wan.WanRMS_norm)]
    with torch.no_grad():
        for _ in decode_stream(vae, z[:, :, :3]):
            pass
    for hk in hooks:
        hk.remove()
    out = {"latents": list(z.shape), "norms": [], "decode": {}}
    silu = torch.nn.SiLU()
    for shape, norm in sorted(distinct.items()):
        for layout in ("contiguous", "channels_last"):
            fmt = torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format
            sets = [((torch.randn(shape, device=dev, dtype=dt, generator=g) * 2).contiguous(memory_format=fmt),)
                    for _ in range(SETS)]
            x0 = sets[0][0]
            with torch.no_grad():
                want = silu(norm(x0))
                got = rs.rms_silu(x0, norm.gamma, norm.bias, norm.scale, path="triton")
                diff = (got.float() - want.float()).abs()
                ulp = torch.finfo(dt).eps * want.float().abs().clamp_min(2.0 ** -100)
                row = {"shape": list(shape), "layout": layout, "equal_fraction": (got == want).float().mean().item(),
                       "max_ulps": (diff / ulp).max().item(), "rel_l2": rel_l2(got, want),
                       "ms": {"triton": time_ms(lambda x, n=norm: rs.rms_silu(x, n.gamma, n.bias, n.scale,
                                                                            path="triton"), sets, args.warmup,
                                                args.iters),
                              "diffusers": time_ms(lambda x, n=norm: silu(n(x)), sets, args.warmup, args.iters)}}
            row["triton_gb_per_s"] = round(2 * x0.numel() * 2 / row["ms"]["triton"] / 1e6, 1)  # 1 read + 1 write
            log(f"vae norm {row}")
            out["norms"].append(row)
            del sets, x0
    free()

    def decode() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([p for p in decode_stream(vae, z)], dim=2)

    pixels = {}
    for name in ("diffusers", "artifex", "artifex_channels_last"):
        accelerate_vae(vae, on=name != "diffusers")
        set_layout(vae, name == "artifex_channels_last")
        times = []
        try:
            with torch.no_grad():
                for _ in decode_stream(vae, z[:, :, :3]):  # warm-up: cuDNN picks its kernels, Triton compiles
                    pass
            free()
            torch.cuda.reset_peak_memory_stats()
            for _ in range(2):
                start = time.perf_counter()
                pixels[name] = decode()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        except Exception as e:  # one variant's failure leaves the others' figures
            out["decode"][name] = {"error": f"{type(e).__name__}: {e}"[:500]}
            log(f"vae decode {name} {out['decode'][name]}")
            continue
        out["decode"][name] = {"seconds": [round(x, 3) for x in times],
                               "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        if name != "diffusers":
            out["decode"][name]["rel_l2_vs_diffusers"] = rel_l2(pixels[name], pixels["diffusers"])
            pixels[name] = None
        log(f"vae decode {name} {out['decode'][name]}")
        free()
        if name in ("diffusers", "artifex"):
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                decode()
                torch.cuda.synchronize()
            kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
            kernels.sort(key=lambda e: -e.self_device_time_total)
            out["decode"][name]["kernel_ms_total"] = round(sum(e.self_device_time_total for e in kernels) / 1e3, 1)
            out["decode"][name]["top_kernels_ms"] = [(e.key[:90], round(e.self_device_time_total / 1e3, 1), e.count)
                                                     for e in kernels[:12]]
    pixels.clear()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--only", default="qk,fp8,rows,attn,ada,vae",
                        help="comma-separated sections: qk, fp8, rows, attn, ada, vae")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()

    result = {"script": "check_kernels", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
              "python": platform.python_version(), "iters": args.iters, "warmup": args.warmup}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    if not torch.cuda.is_available():
        result["error"] = "no CUDA device: this script checks the GPU paths (the CPU tests cover the twins)"
        print(json.dumps(result))
        return 2
    props = torch.cuda.get_device_properties(0)
    result["gpu"] = f"{props.name} sm{props.major}{props.minor}"
    sections = {"qk": check_qk, "fp8": check_fp8, "rows": check_rows, "attn": check_attn, "ada": check_ada,
                "vae": check_vae}
    for name in args.only.split(","):
        name = name.strip()
        if name not in sections:
            result[name] = {"error": f"unknown section; sections: {', '.join(sections)}"}
            continue
        try:
            result[name] = sections[name](args)
        except Exception as e:
            result[name] = {"error": f"{type(e).__name__}: {e}"[:500], "traceback": traceback.format_exc()[-2000:]}
            log(f"{name}: {result[name]['error']}")
        free()
    from artifex.bench.report import header

    result.update(header(torch.device("cuda", 0), prog="python scripts/check_kernels.py"))
    result["summary"] = summary_of(result)
    line = json.dumps(result)
    if args.out:
        args.out.write_text(line + "\n")
    print(line)
    return 0


def summary_of(r: dict) -> dict:
    """The headline figures of each section that ran (sections that failed are left out)."""
    out: dict = {}
    qk, f8, at = r.get("qk", {}), r.get("fp8", {}), r.get("attn", {})
    for s in r.get("ada", {}).get("forms", []):
        out.setdefault("ada_norm_ms", {})[f"{s['form']}{'_fp8' if s['quantize'] else ''}"] = s["ms"]
    for s in r.get("vae", {}).get("norms", []):
        key = f"{s['shape'][1]}x{'x'.join(map(str, s['shape'][2:]))}_{s['layout']}"
        out.setdefault("vae_rms_silu_ms", {})[key] = s["ms"]
    for name, d in r.get("vae", {}).get("decode", {}).items():
        if "seconds" in d:
            out.setdefault("vae_decode_s", {})[name] = min(d["seconds"])
    for s in r.get("rows", {}).get("shapes", []):
        out.setdefault("fp8_rows_ms", {})[f"{s['width']}{'_gelu' if s['gelu'] else ''}"] = s["ms"]
    if "ms" in qk:
        out["qk_norm_rope_ms"] = {k: qk["ms"].get(k) for k in ("triton", "diffusers_unfused")}
        out["qk_norm_rope_rel_l2_triton_vs_twin"] = qk.get("rel_l2_triton_vs_twin")
    for s in f8.get("shapes", []):
        key = f"{s['M']}x{s['K']}x{s['N']}"
        out.setdefault("fp8_gemm_tflops_compiled", {})[key] = round(s["TFLOP_per_s"].get("fp8_compiled", 0), 1)
        out.setdefault("bf16_gemm_tflops", {})[key] = round(s["TFLOP_per_s"].get("bf16_linear", 0), 1)
    for s in at.get("shapes", []):
        out.setdefault("fa3_fp8_head_tflops", {})[s["model"]] = round(s["TFLOP_per_s"].get("fa3_fp8_head", 0), 1)
        out.setdefault("fa3_bf16_tflops", {})[s["model"]] = round(s["TFLOP_per_s"].get("fa3_bf16", 0), 1)
        out.setdefault("fa3_fp8_rel_l2_vs_bf16", {})[s["model"]] = round(
            s["rel_l2_vs_baseline"].get("fa3_fp8_head", 0), 4)
    return out


if __name__ == "__main__":
    sys.exit(main())
