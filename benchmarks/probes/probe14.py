"""probe14: what the 24 GB tier's pinned host homes cost to make, to copy from, and to give back at exit.

Under `--vram-budget 24GB` a fresh `artifex generate` of TI2V-5B holds ~23.5 GiB of pinned host memory (the
text encoder, the VAE and the DiT's homes): its load's placement took 2.90 s and the process's exit 2.69 s, against
0.08 s and 0.28 s without the budget (ttv-h100.json, series 8). Pinned memory is ordinary pages page-locked with
cudaHostRegister (fast_read.pin_by_registering); with 4 KiB pages that is ~6 million pages to fault in, lock, and
unlock at exit. This probe makes GIB GiB of pinned memory in 1 GiB allocations in fresh child processes, three ways:

- torch: ``fast_read.pinned_buffer`` (torch's host allocator, registering; what the placement uses);
- mmap-4k: anonymous mmap, faulted in on 8 threads, then cudaHostRegister (the same steps, by hand);
- huge: ``fast_read.huge_page_buffer`` (ARTIFEX_PIN_HUGE_PAGES): the same with madvise(MADV_HUGEPAGE) first (2 MiB
  transparent huge pages where the kernel allows).

Each child reports the seconds to make them, the host-to-device copy rate from one of them, the huge pages the
kernel gave (AnonHugePages), then leaves with os._exit as `artifex generate` does; the parent times the exit.
Usage: probe14.py OUT_DIR   (PROBE14_GIB, default 16; PROBE14_REPEATS, default 2). Writes OUT_DIR/probe14.json.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

OUT = sys.argv[1] if len(sys.argv) > 1 else "/tmp/out"
GIB = int(os.environ.get("PROBE14_GIB", "16"))
REPEATS = int(os.environ.get("PROBE14_REPEATS", "2"))
CHILD = """
import json, mmap, os, sys, threading, time
import torch
from artifex.models import fast_read
mode, gib = sys.argv[1], int(sys.argv[2])
torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
cudart = torch.cuda.cudart()
SIZE = 2**30
keep = []

def by_hand():
    mm = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    t = torch.frombuffer(mm, dtype=torch.uint8)
    step = SIZE // 8
    def touch(k):
        t[k * step:(k + 1) * step:4096].zero_()  # the first write faults each page in
    threads = [threading.Thread(target=touch, args=(k,)) for k in range(8)]
    [th.start() for th in threads]; [th.join() for th in threads]
    err = cudart.cudaHostRegister(t.data_ptr(), SIZE, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister: {err}")
    keep.append(mm)
    return t

t0 = time.perf_counter()
bufs = []
for _ in range(gib):
    bufs.append(fast_read.pinned_buffer(SIZE) if mode == "torch" else
                fast_read.huge_page_buffer(SIZE) if mode == "huge" else by_hand())
made = time.perf_counter() - t0
src = bufs[0]
src.view(64, -1).copy_(torch.randint(0, 255, (SIZE // 64,), dtype=torch.uint8).expand(64, -1))  # not zeros
dst = torch.empty(SIZE, dtype=torch.uint8, device="cuda")
rates = []
for _ in range(3):
    torch.cuda.synchronize(); t = time.perf_counter()
    dst.copy_(src, non_blocking=True); torch.cuda.synchronize()
    rates.append(SIZE / (time.perf_counter() - t) / 1e9)
same = bool(torch.equal(dst.cpu(), src))
huge = None
try:
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages:"):
            huge = round(int(line.split()[1]) / 2**20, 2)
except OSError:
    pass
print(json.dumps({"mode": mode, "gib": gib, "make_s": round(made, 3), "make_gib_per_s": round(gib / made, 2),
                  "h2d_gb_per_s": round(sorted(rates)[1], 2), "copy_equal": same, "anon_huge_gib": huge,
                  "pinned": bool(src.is_pinned()), "said_at": time.time()}), flush=True)
os._exit(0)
"""


def sysfs(name: str) -> str | None:
    try:
        return Path(f"/sys/kernel/mm/transparent_hugepage/{name}").read_text().strip()
    except OSError:
        return None


def main() -> None:
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
           "ARTIFEX_PIN_HUGE_PAGES": "off"}  # the torch mode is torch's allocator whatever the caller's setting
    res = {"command": f"probe14.py {OUT}", "gib": GIB, "repeats": REPEATS,
           "thp": {"enabled": sysfs("enabled"), "defrag": sysfs("defrag")}, "runs": []}
    for k in range(REPEATS):
        for mode in ("torch", "mmap-4k", "huge"):
            p = subprocess.run([sys.executable, "-c", CHILD, mode, str(GIB)], capture_output=True, text=True,
                               timeout=300, env=env)
            end = time.time()
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            row = json.loads(lines[-1]) if lines else {"mode": mode, "error": p.stderr[-2000:]}
            if "said_at" in row:
                row["exit_s"] = round(end - row.pop("said_at"), 3)
            row["repeat"] = k
            res["runs"].append(row)
            print(json.dumps(row), flush=True)
            with open(f"{OUT}/probe14.json", "w") as f:
                json.dump(res, f, indent=1)
    try:
        import torch
        res["gpu"] = torch.cuda.get_device_name()
    except Exception as e:  # noqa: BLE001
        res["gpu"] = repr(e)
    with open(f"{OUT}/probe14.json", "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
