"""imports_cpu: what ``import_libraries()`` costs on the CPU machine, per set of packages and ARTIFEX_LAZY_IMPORTS.

The GPU image holds an older transformers (5.17) and scipy, scikit-learn and pandas (probe12-h200.json); the
pinned set holds transformers 5.24. Each set named on the command line puts its folders in front of PYTHONPATH
(installed with ``pip install --no-deps --target``); ``pinned`` adds none. For each set, fresh processes alternate
ARTIFEX_LAZY_IMPORTS on and off (``--repeat`` each; the bytecode is compiled by a process before them), and one
more process with the switch off runs under ``python -X importtime`` for the cumulative import time of the
packages ``artifex.lazy_packages`` defers, and times ``importlib.metadata.packages_distributions()``. ``--eager PKG``
adds a third mode beside on and off, in the same rotation: on, but PKG left out of the deferred packages (what
deferring that one package saves).
Usage: imports_cpu.py OUT.json NAME=DIR[:DIR...] ... [--repeat N] [--eager PKG]   (NAME= alone: the pinned set)
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")
CHILD = """
import json, os, sys, time
t = time.perf_counter()
from artifex import lazy_packages
eager = os.environ.get("IMPORTS_CPU_EAGER")
if eager:
    lazy_packages.DEFERRED_PACKAGES = tuple(p for p in lazy_packages.DEFERRED_PACKAGES if p != eager)
from artifex.timeline import import_libraries
import_libraries()
s = time.perf_counter() - t
import importlib.metadata as md
t = time.perf_counter(); md.packages_distributions(); pd = time.perf_counter() - t
print(json.dumps({"import_libraries_s": s, "transformers": sys.modules["transformers"].__version__,
                  "sklearn_imported": "sklearn" in sys.modules, "modules": len(sys.modules),
                  "distributions": len(list(md.distributions())), "packages_distributions_s": pd}))
"""
DEFERRED = ("scipy.stats", "scipy.integrate", "scipy.optimize", "transformers.models", "diffusers.models.transformers",
            "diffusers.models.autoencoders", "diffusers.models.unets")


def child(path: str, lazy: str, importtime: bool = False, eager: str = "") -> tuple[dict, str]:
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in (path, SRC) if p), "ARTIFEX_LAZY_IMPORTS": lazy,
                        "IMPORTS_CPU_EAGER": eager}
    p = subprocess.run([sys.executable, *(["-X", "importtime"] if importtime else []), "-c", CHILD], env=env,
                       capture_output=True, text=True, timeout=300)
    if p.returncode:
        raise SystemExit(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


def cumulative(importtime: str) -> dict:
    out = {}
    for line in importtime.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s*(\S+)", line)
        if m and m.group(2) in DEFERRED:
            out[m.group(2)] = round(int(m.group(1)) / 1e6, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("sets", nargs="+", help="NAME=DIR[:DIR...]")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--eager", default="", help="a deferred package to time as eagerly imported (mode on-but-PKG)")
    args = ap.parse_args()
    out_path, sets, repeat = args.out, args.sets, args.repeat
    res = {"device": "cpu", "command": " ".join(["imports_cpu.py", *sys.argv[1:]]), "date": time.strftime("%F"),
           "cores": os.cpu_count(), "sets": {}}
    for spec in sets:
        name, _, path = spec.partition("=")
        child(path, "on")  # compiles the bytecode of what this set adds
        modes = {"on": ("on", ""), "off": ("off", "")} | (
            {f"on-but-{args.eager}": ("on", args.eager)} if args.eager else {})
        runs = {mode: [] for mode in modes}
        for _ in range(repeat):
            for mode, (lazy, eager) in modes.items():
                runs[mode].append(child(path, lazy, eager=eager)[0])
        info, err = child(path, "off", importtime=True)
        res["sets"][name] = {
            "pythonpath_extra": path, "transformers": info["transformers"], "distributions": info["distributions"],
            "sklearn_imported": {k: [r["sklearn_imported"] for r in v] for k, v in runs.items()},
            "import_libraries_s": {k: [round(r["import_libraries_s"], 3) for r in v] for k, v in runs.items()},
            "median_s": {k: round(statistics.median(r["import_libraries_s"] for r in v), 3) for k, v in runs.items()},
            "modules": {k: v[0]["modules"] for k, v in runs.items()},
            "packages_distributions_s": round(statistics.median(r["packages_distributions_s"] for r in runs["off"]),
                                              3),
            "lazy_off_cumulative_s": cumulative(err)}
        print(name, res["sets"][name]["median_s"], flush=True)
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
