"""probe7: what one CFG step costs at TI2V-5B 720p as two passes with the first block's self-attention shared
(engine.dit.share_first_block), as two passes without it, and as one batch of two; bf16, then fp8=all. The three
forms run interleaved (a, b, c, a, b, c, ...) so that they share the card's clock and temperature; the shared
passes' outputs are compared bit for bit with the unshared ones first."""
import contextlib, json, statistics, sys
import torch
from artifex.attention import install, runtime_from_config
from artifex.attention.processor import AttentionRuntime
from artifex.bench.dit import build_model, inputs_for
from artifex.config import OptimizationConfig
from artifex.engine.dit import accelerate_model, share_first_block
from artifex.env import read_env
from artifex.kernels import fp8

OUT = sys.argv[1]
dev, dt = torch.device("cuda", 0), torch.bfloat16
spec, m = build_model("ti2v-5b", dev, dt)
text, sets = inputs_for(spec, m.config.text_dim, 1280, 704, 121, dev, dt)
uncond = torch.randn_like(text)
pair = torch.cat([text, uncond])
tokens = spec.tokens(1280, 704, 121)
shape = (1, tokens, spec.transformer.heads, spec.transformer.head_dim)
runtime = runtime_from_config(OptimizationConfig(), read_env().home)
runtime.prepare(shape, dt, dev)
install([m], runtime)
accelerate_model(m, compile_blocks=True)
res = {"gpu": torch.cuda.get_device_name(0), "tokens": tokens}


def two(x, t, shared):
    with torch.no_grad(), (share_first_block(m) if shared else contextlib.nullcontext()):
        return [m(hidden_states=x, timestep=t, encoder_hidden_states=c, return_dict=False)[0] for c in (text, uncond)]


def batched(x, t):
    with torch.no_grad():
        return m(hidden_states=torch.cat([x, x]), timestep=torch.cat([t, t]), encoder_hidden_states=pair,
                 return_dict=False)[0]


forms = {"two_passes_shared": lambda x, t: two(x, t, True), "two_passes": lambda x, t: two(x, t, False),
         "batch_of_two": batched}


def measure(label, iters=10):
    x, t, _ = sets[0]
    a, b = two(x, t, True), two(x, t, False)
    r = {"shared_equals_unshared": all(torch.equal(p, q) for p, q in zip(a, b))}
    for f in forms.values():  # warm-up (compile) of each form
        f(*sets[1][:2])
    ms = {k: [] for k in forms}
    for i in range(iters):
        x, t, _ = sets[i % len(sets)]
        for k, f in forms.items():
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); f(x, t); e.record(); torch.cuda.synchronize()
            ms[k].append(s.elapsed_time(e))
    for k, v in ms.items():
        r[f"{k}_ms_median"] = round(statistics.median(v), 2)
        r[f"{k}_ms"] = [round(u, 2) for u in v]
    res[label] = r
    print(label, {k: v for k, v in r.items() if not isinstance(v, list)}, flush=True)
    json.dump(res, open(f"{OUT}/probe7.json", "w"), indent=1)


measure("bf16")
fp8.quantize_linears(m.blocks, path="scaled_mm")
att = AttentionRuntime(requested="fa3-fp8")
att.prepare(shape, dt, dev)
install([m], att)
measure("fp8_all")
