"""Probe: does the DiT read straight to the GPU (``device_map``) run slower than one read to the CPU and moved?

ttv-h200.json: `artifex generate` with no flags (transformer read with device_map straight to the GPU) denoised in
95.0 s; the 24 GB run of the same process layout (DiT read to the CPU, placed after) in 86.8 s. This loads one
TI2V-5B transformer (random weights at the real shape, saved by diffusers' save_pretrained) both ways and reports,
for each: hooks on the modules, the paths Artifex's forward picks (QKV fusion, GELU epilogue, one-pass norms),
parameter layout, and the median of 5 forwards at 1280x704x121 (eager blocks, so a compile does not hide it).
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from artifex.attention import install, runtime_from_config
from artifex.bench import report
from artifex.bench.dit import build_model, inputs_for
from artifex.config import OptimizationConfig
from artifex.engine import dit
from artifex.env import read_env


def describe(m, x):
    b = m.blocks[0]
    paths = {}
    if hasattr(b, "_artifex_ffn"):  # after accelerate_model
        paths = {"fused_qkv": bool(getattr(b.attn1, "fused_projections", False)), "ffn_path": dit._ffn_path(b, x),
                 "norm_path": dit._norm_path(b, x, dit._ffn_path(b, x)), "out_path": dit._out_path(b, x)}
    return {**paths, "hooked_model": dit._hooked(m), "accelerate_hooks": sum(hasattr(x, "_hf_hook") for x in m.modules()),
            "instance_forwards": sum("forward" in x.__dict__ for x in m.modules()), "hf_device_map": str(getattr(m, "hf_device_map", None)),
            "param_dtypes": sorted({str(p.dtype) for p in m.parameters()}),
            "noncontiguous": sum(not p.is_contiguous() for p in m.parameters()),
            "distinct_storages": len({p.untyped_storage().data_ptr() for p in m.parameters()}),
            "params": sum(1 for _ in m.parameters()),
            "requires_grad": sum(p.requires_grad for p in m.parameters())}


def main(out: Path):
    from diffusers import WanTransformer3DModel

    dev = torch.device("cuda")
    spec, m = build_model("ti2v-5b", dev, torch.bfloat16)
    tmp = Path(tempfile.mkdtemp())
    m.save_pretrained(tmp / "transformer")
    del m
    torch.cuda.empty_cache()
    text, sets = inputs_for(spec, 4096, 1280, 704, 121, dev, torch.bfloat16)
    runtime = runtime_from_config(OptimizationConfig(), read_env().home)
    runtime.prepare((1, spec.tokens(1280, 704, 121), 24, 128), torch.bfloat16, dev)
    rows = {}
    for mode in ("cpu_then_to", "device_map", "cpu_then_to"):
        t = time.perf_counter()
        kw = {"device_map": {"": dev}} if mode == "device_map" else {}
        m = WanTransformer3DModel.from_pretrained(tmp / "transformer", dtype=torch.bfloat16, **kw).eval()
        m.to(dev)
        torch.cuda.synchronize()
        load_s = time.perf_counter() - t
        before = describe(m, sets[0][0])
        install([m], runtime)
        dit.accelerate_model(m)
        x_tokens = torch.zeros(1, 8, 3072, device=dev, dtype=torch.bfloat16)
        after = describe(m, x_tokens)

        def call(x, ts, ts_tokens):
            with torch.no_grad():
                return m(hidden_states=x, timestep=ts, encoder_hidden_states=text, return_dict=False)[0]

        call(*sets[0])
        secs = report.median_ms(call, sets, dev, 1, 5) / 1e3
        key = mode if mode not in rows else mode + "_again"
        rows[key] = {"load_s": round(load_s, 2), "s_per_forward": round(secs, 4), "before_accelerate": before,
                     "after_accelerate": after}
        print(key, json.dumps(rows[key]), flush=True)
        del m
        torch.cuda.empty_cache()
    data = report.header(dev)
    data.update(probe="load_paths", rows=rows, summary={k: v["s_per_forward"] for k, v in rows.items()})
    report.write(out, "probe-load-paths-h200", data, "```\n" + json.dumps(rows, indent=1) + "\n```\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")))
