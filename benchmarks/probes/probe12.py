"""probe12: where a fresh process's imports go on the GPU image, as `artifex generate` makes them.

In the H200 series of ttv-h200.json the CLI's `imports` phase took 6.5-8.3 s of a 99.8 s run, the largest cost
outside the engine's stages; on the CPU machine the same `import_libraries()` takes 2.8-3.3 s. The GPU image holds
more packages (scipy, scikit-learn, pandas, torchvision, peft, ...) and a CUDA torch. This probe, in fresh child
processes with the bytecode compiled (the setup's processes compiled it):

- `import_libraries()` under python -X importtime, ARTIFEX_LAZY_IMPORTS on (the default) and off, alternating, five
  processes; each profile summarized here (self seconds by top-level package, the largest self and cumulative
  modules, and what imported each of a few heavy packages) so only the summary comes back;
- `import torch` alone, and the time to the first CUDA context and the first bf16 GEMM after it (what a process's
  first GPU work pays: the text stage's share);
- the packages' versions, and a cProfile of one `import_libraries()` (probe12-cprofile.txt: which functions the
  import time goes to);
- `importlib.metadata.packages_distributions()` (diffusers calls it at import: it reads every distribution's file
  list) and how many distributions the image has.
Usage: probe12.py OUT_DIR
"""
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter

OUT = sys.argv[1] if len(sys.argv) > 1 else "/tmp/out"
IMPORTS = """
import json
from artifex import timeline
timeline.import_libraries()
print(json.dumps(timeline.IMPORTS.to_dict() | {"imports": timeline.imports_s()}))
"""
TORCH_FIRST_GPU = """
import json, time
t = time.perf_counter()
import torch
r = {"import_torch_s": time.perf_counter() - t}
t = time.perf_counter()
torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
r["cuda_context_s"] = time.perf_counter() - t
a = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16); b = torch.randn(4096, 4096, device="cuda",
    dtype=torch.bfloat16); torch.cuda.synchronize()
t = time.perf_counter()
(a @ b).sum().item()
r["first_gemm_s"] = time.perf_counter() - t
t = time.perf_counter()
(a @ b).sum().item()
r["second_gemm_s"] = time.perf_counter() - t
print(json.dumps(r))
"""
METADATA = """
import json, time, importlib.metadata as md
t = time.perf_counter(); n = len(list(md.distributions())); t1 = time.perf_counter() - t
t = time.perf_counter(); m = md.packages_distributions(); t2 = time.perf_counter() - t
print(json.dumps({"distributions": n, "distributions_s": t1, "packages_distributions_s": t2, "names": len(m)}))
"""
PROFILE = """
import cProfile, io, pstats
from artifex import timeline
prof = cProfile.Profile()
prof.runcall(timeline.import_libraries)
for key in ("tottime", "cumulative"):
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats(key).print_stats(30)
    print(s.getvalue())
"""
VERSIONS = """
import importlib.metadata as md, json
names = ("torch", "diffusers", "transformers", "peft", "scipy", "scikit-learn", "pandas", "torchvision",
         "accelerate", "huggingface-hub", "safetensors", "numpy", "triton", "sympy")
out = {}
for n in names:
    try:
        out[n] = md.version(n)
    except md.PackageNotFoundError:
        out[n] = None
print(json.dumps(out))
"""
HEAVY = ("scipy", "sklearn", "pandas", "torchvision", "peft", "sympy", "accelerate", "PIL")


def child(code: str, *args: str, env=None, timeout=300) -> tuple[str, str, float]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, *args, "-c", code], capture_output=True, text=True, env=env,
                       timeout=timeout)
    return p.stdout, p.stderr, time.perf_counter() - t


def summarize(importtime: str) -> dict:
    """python -X importtime's lines: (self us, cumulative us, depth, module), children before their parent."""
    rows = []
    for line in importtime.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m:
            rows.append((int(m.group(1)) / 1e6, int(m.group(2)) / 1e6, len(m.group(3)), m.group(4)))
    by_pkg = Counter()
    for self_s, _, _, name in rows:
        by_pkg[name.split(".")[0]] += self_s
    out = {"modules": len(rows), "self_s": round(sum(r[0] for r in rows), 3),
           "by_package_self_s": {k: round(v, 3) for k, v in by_pkg.most_common(14)},
           "largest_self_s": {r[3]: round(r[0], 3) for r in sorted(rows, key=lambda r: -r[0])[:14]},
           "largest_cumulative_s": {r[3]: round(r[1], 3) for r in sorted(rows, key=lambda r: -r[1])[:30]},
           "imported_through": {}}
    for pkg in HEAVY:
        idx = [i for i, r in enumerate(rows) if r[3] == pkg]
        if not idx:
            continue
        i = idx[0]
        depth, chain = rows[i][2], [(rows[i][3], round(rows[i][1], 3))]
        for j in range(i + 1, len(rows)):  # the enclosing imports come after, each one level up
            if rows[j][2] < depth:
                chain.append((rows[j][3], round(rows[j][1], 3)))
                depth = rows[j][2]
        out["imported_through"][pkg] = chain[:12]
    return out


def save(res: dict) -> None:
    """Written after each measurement: a run cut short still leaves what it measured."""
    with open(f"{OUT}/probe12.json", "w") as f:
        json.dump(res, f, indent=1)


def main() -> None:
    res = {"torch": None, "imports": []}
    # PROBE12_MODES: the ARTIFEX_LAZY_IMPORTS value of each import process, in order
    for lazy in os.environ.get("PROBE12_MODES", "on,off,on,off,on").split(","):
        out, err, wall = child(IMPORTS, "-X", "importtime", env=os.environ | {"ARTIFEX_LAZY_IMPORTS": lazy})
        groups = json.loads(out.strip().splitlines()[-1]) if out.strip() else err[-800:]
        res["imports"].append({"lazy": lazy, "process_s": round(wall, 3), "groups": groups,
                               "profile": summarize(err)})
        print(lazy, round(wall, 2), groups, flush=True)
        save(res)
    for _ in range(3):
        out, err, wall = child(TORCH_FIRST_GPU)
        res.setdefault("torch_first_gpu", []).append(json.loads(out) if out.strip() else err[-800:])
    out, err, _ = child(METADATA)
    res["metadata"] = json.loads(out) if out.strip() else err[-800:]
    out, err, _ = child(VERSIONS)
    res["versions"] = json.loads(out) if out.strip() else err[-800:]
    out, err, _ = child(PROFILE)  # cProfile of one import_libraries (lazy on): the functions, not the modules
    with open(f"{OUT}/probe12-cprofile.txt", "w") as f:
        f.write(out + err[-3000:])
    import torch
    res["torch"] = torch.__version__
    res["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    save(res)
    print(json.dumps({k: v for k, v in res.items() if k != "imports"}, indent=1))


if __name__ == "__main__":
    main()
