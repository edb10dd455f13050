"""probe13: the read-ahead (``artifex.models.read_ahead``) on the GPU: the weights it gives, and what it saves.

In series 7 (ttv-h200.json) a fresh `artifex generate` spent 6.8-7.2 s importing libraries and then 2.1-2.3 s
loading (plan_before_load 0.35 s, checkpoint_read 1.5 s): the GPU idle during the imports, the imports idle
during the load. The read-ahead reads the safetensors to the GPU on a thread once torch is imported. This probe,
on the TI2V-5B checkpoint the ttv setup saved:

1. in a child process, the loader's GPU path (``load_components`` with every component on cuda) once taking the
   read-ahead's files and once reading them itself: every tensor compared (names, dtype, device, values);
2. `artifex generate` (2 steps, 1280x704x17: the load does not depend on them) as fresh processes, the read-ahead
   on (its default 8 threads), on with 4 and with 2 threads, and off, in turn, REPEATS each: the process wall from
   outside, the sidecar's imports, load stages and read-ahead report (after one warm-up run that fills this probe's
   own caches).
Usage: probe13.py OUT_DIR [CHECKPOINT]   (PROBE13_REPEATS, default 3). Writes OUT_DIR/probe13.json after each part.
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

OUT = sys.argv[1] if len(sys.argv) > 1 else "/tmp/out"
CKPT = sys.argv[2] if len(sys.argv) > 2 else open("/tmp/keep/ck").read().strip()
REPEATS = int(os.environ.get("PROBE13_REPEATS", "3"))
MODEL = os.environ.get("PROBE13_MODEL", "ti2v-5b")  # a dry run on the CPU: tiny-ti2v and PROBE13_DEVICE=cpu
DEVICE = os.environ.get("PROBE13_DEVICE", "cuda")
W, H = (int(v) for v in os.environ.get("PROBE13_SIZE", "1280x704").split("x"))
SAME_WEIGHTS = """
import json, sys, time
from pathlib import Path
from artifex.config import OptimizationConfig
from artifex.models import read_ahead
read_ahead.start(sys.argv[1], OptimizationConfig())
from artifex import timeline
timeline.import_libraries()
import torch
from artifex.models.loader import load_components
from artifex.models.registry import get_model
spec = get_model(sys.argv[2])
devices = {r: sys.argv[3] for r in ("transformer", "transformer_2", "vae", "text_encoder")}
def state(c):
    models = {"text_encoder": c.text_encoder, "vae": c.vae} | {f"expert{i}": e for i, e in enumerate(c.experts)}
    return {f"{k}.{n}": t for k, m in models.items() for n, t in m.state_dict().items()}
t1 = time.perf_counter()
ahead = state(load_components(spec, Path(sys.argv[1]), "bf16", devices=devices))
load_ahead = time.perf_counter() - t1
read_ahead.finish()
report = read_ahead.report()
t1 = time.perf_counter()
plain = state(load_components(spec, Path(sys.argv[1]), "bf16", devices=devices))
if torch.cuda.is_available():
    torch.cuda.synchronize()
load_plain = time.perf_counter() - t1
bad = [k for k in plain if k not in ahead or ahead[k].dtype != plain[k].dtype or ahead[k].device != plain[k].device
       or not torch.equal(ahead[k], plain[k])]
print(json.dumps({"tensors": len(plain), "same_keys": ahead.keys() == plain.keys(), "mismatched": bad[:20],
                  "dtypes": sorted({str(t.dtype) for t in plain.values()}), "devices": sorted({str(t.device) for t in
                  ahead.values()}), "read_ahead": report, "load_taking_read_ahead_s": round(load_ahead, 3),
                  "load_reading_itself_s": round(load_plain, 3),
                  "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}))
"""


def save(res: dict) -> None:
    with open(f"{OUT}/probe13.json", "w") as f:
        json.dump(res, f, indent=1)


def main() -> None:
    src = str(Path(__file__).resolve().parents[2] / "src")
    sys.path.insert(0, src)
    from artifex.bench.pipeline import cli_generate_run
    from artifex.models.registry import get_model

    res = {"command": f"probe13.py {OUT} {CKPT}", "checkpoint": CKPT, "repeats": REPEATS}
    p = subprocess.run([sys.executable, "-c", SAME_WEIGHTS, CKPT, MODEL, "cuda:0" if DEVICE == "cuda" else DEVICE],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "ARTIFEX_HOME": "/tmp/probe13-home"})
    res["same_weights"] = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {
        "error": p.stderr[-3000:]}
    save(res)
    print(json.dumps(res["same_weights"], indent=1)[:2000])
    spec, work = get_model(MODEL), Path(tempfile.mkdtemp(prefix="probe13-"))
    res["runs"] = []
    # Its own caches (attention choice, package map, Triton kernels): the ttv series' first-on-machine row stays so.
    caches = {"ARTIFEX_HOME": "/tmp/probe13-home", "TRITON_CACHE_DIR": "/tmp/probe13-triton"}
    warm = cli_generate_run(spec, Path(CKPT), W, H, 17, 2, DEVICE, work, name="warm-up", env=caches)
    res["warm_up_run_s"] = warm["cli_wall_s"]  # fills those caches; not counted
    modes = {"on": {"ARTIFEX_READ_AHEAD": "on"}, "on-4-threads": {"ARTIFEX_READ_AHEAD_THREADS": "4"},
             "on-2-threads": {"ARTIFEX_READ_AHEAD_THREADS": "2"}, "off": {"ARTIFEX_READ_AHEAD": "off"}}
    for k in range(REPEATS):
        for mode, env in modes.items():
            row = cli_generate_run(spec, Path(CKPT), W, H, 17, 2, DEVICE, work, name=f"read-ahead-{mode}-{k}",
                                   env={**env, **caches})
            stages = row["wall"]["stages_s"]
            res["runs"].append({"mode": mode, "cli_wall_s": row["cli_wall_s"], "process_s": row["process_to_mp4_s"],
                                "imports_s": stages.get("process.imports"), "load_s": row["timings_s"]["load"],
                                "load_timings_s": row["load_timings_s"], "read_ahead": row["read_ahead"],
                                "to_end_of_load_s": round(sum(v for s, v in stages.items()
                                                             if s.startswith(("process.", "load."))), 4)})
            save(res)
            print(json.dumps(res["runs"][-1]))
    for mode in modes:
        rows = sorted(r["to_end_of_load_s"] for r in res["runs"] if r["mode"] == mode)
        res[f"median_to_end_of_load_s_{mode}"] = rows[len(rows) // 2]
        walls = sorted(r["cli_wall_s"] for r in res["runs"] if r["mode"] == mode)
        res[f"median_cli_wall_s_{mode}"] = walls[len(walls) // 2]
    save(res)


if __name__ == "__main__":
    main()
