"""fast_read on a GPU, on a checkpoint directory in the page cache: the components it loads against the libraries'
own readers (every tensor equal, dtypes and devices included), then the time of each (medians) and the device's
peak; the same for the offload tiers' CPU homes (the libraries' read to host memory, then pinned as the placement
pins it, against fast_read's read into pinned chunks; each run starts with the pinned cache emptied, as a fresh
process does); with --sweep the reader alone over threads x chunk sizes (GB/s). Writes fast-read-<gpu>.json under
--out.

    python3 benchmarks/device/fast_read_check.py --checkpoint /tmp/ckpt --out $OUT
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch

from artifex.bench.pipeline import _sync
from artifex.bench.report import device_slug, header, md_table, write
from artifex.engine.placement import _Home
from artifex.models import fast_read
from artifex.models.loader import _DIFFUSERS_WEIGHTS, _TRANSFORMERS_WEIGHTS, PINNED, load_components, weight_files
from artifex.models.registry import get_model
from artifex.sysinfo import peak_bytes, reset_peak_memory

ROLES = ("transformer", "vae", "text_encoder")


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        fast_read.empty_pinned_cache()


def _pinning(how: str) -> None:
    """How pinned host memory is pinned from here on: ``register`` (ordinary pages registered with CUDA: Artifex's
    default, ``fast_read.pin_by_registering``) or ``alloc`` (cudaHostAlloc: torch's default)."""
    if torch.cuda.is_available():
        fast_read._set_allocator(fast_read.REGISTER_SETTINGS if how == "register"
                                 else "pinned_use_cuda_host_register:False")
        fast_read._REGISTER["state"] = how == "register"


def _load(spec, path: Path, reader: str, device: str):
    """(components, seconds): to ``device``; ``reader`` "libraries" or "fast_read", "+pinned" for the homes of an
    offload tier (fast_read reads into pinned chunks, the libraries read to host memory and ``_Home`` pins), then
    "@alloc" to pin by cudaHostAlloc (else by registering pages)."""
    reader, _, how = reader.partition("@")
    _pinning(how or "register")
    os.environ["ARTIFEX_FAST_READ"] = "on" if reader.startswith("fast_read") else "off"
    pinned = reader.endswith("+pinned")
    _sync(torch.device(device))
    t0 = time.perf_counter()
    c = load_components(spec, path, "bf16", devices={r: PINNED if pinned else device for r in ROLES})
    if pinned and torch.cuda.is_available():  # the libraries' read is to host memory: pinned here, as placement pins
        c.homes = [_Home(m, pin=True) for m in (c.experts[0], c.vae, c.text_encoder)]  # what placement does
    _sync(torch.device(device))
    return c, time.perf_counter() - t0


def _state(c) -> dict[str, torch.Tensor]:
    out = {}
    for role, m in (("transformer", c.experts[0]), ("vae", c.vae), ("text_encoder", c.text_encoder)):
        out |= {f"{role}.{k}": v for k, v in m.state_dict(keep_vars=True).items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="ti2v-5b")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cuda:0", help="cpu: a dry run of the script (a tiny --model)")
    ap.add_argument("--sweep", action="store_true", help="also the reader alone over threads x chunk sizes")
    ap.add_argument("--readers", default="libraries,fast_read,libraries+pinned,fast_read+pinned",
                    help="which loads to time (comma-separated; +pinned@alloc: pinned by cudaHostAlloc)")
    ap.add_argument("--no-check", action="store_true", help="skip the numerics (already checked on this checkpoint)")
    ap.add_argument("--name", default="fast-read", help="the result files' stem (+ -<gpu>)")
    ap.add_argument("--pin-probe", type=int, default=0, metavar="GIB", help="also time pinning GIB x 1 GiB alone")
    args = ap.parse_args()
    spec = get_model(args.model)
    dev = torch.device(args.device)
    result: dict = header(dev, prog="python3 benchmarks/device/fast_read_check.py")

    # 1. Numerics first: fast_read's models against the libraries', tensor for tensor; to the GPU and pinned.
    for target, readers in () if args.no_check else (("device", ("libraries", "fast_read")),
                                                      ("pinned", ("libraries", "fast_read+pinned"))):
        ref, _ = _load(spec, args.checkpoint, readers[0], args.device if target == "device" else "cpu")
        a = {k: v.detach().clone() for k, v in _state(ref).items()}
        del ref
        _free(args.device)
        new, _ = _load(spec, args.checkpoint, readers[1], args.device)
        b = _state(new)
        bad = [k for k in a if k not in b or a[k].dtype != b[k].dtype or a[k].device != b[k].device
               or not torch.equal(a[k], b[k])]
        check = {"tensors": len(a), "bytes_gib": round(sum(t.numel() * t.element_size() for t in a.values())
                                                       / 2**30, 3),
                 "same_names": a.keys() == b.keys(), "mismatched": bad[:20],
                 "dtypes": sorted({str(t.dtype) for t in b.values()})}
        if target == "pinned":
            check["pinned_gib"] = round(sum(t.numel() * t.element_size() for t in b.values() if t.is_pinned())
                                        / 2**30, 3)
        result["check" if target == "device" else "check_pinned"] = check
        del a, b, new
        _free(args.device)
        print(target, json.dumps(check))

    # 2. Whole components, each reader in turn (page cache warm after the check), medians.
    times: dict[str, list[float]] = {r: [] for r in args.readers.split(",")}
    for _ in range(args.repeat):
        for reader in times:
            reset_peak_memory(dev)
            c, s = _load(spec, args.checkpoint, reader,
                         "cpu" if reader.startswith("libraries+pinned") else args.device)
            times[reader].append(s)
            result.setdefault("peak_gib", {})[reader] = round((peak_bytes(dev) or (0, 0))[0] / 2**30, 3)
            del c
            _free(args.device)
    result["load_components_s"] = {k: {"median": round(statistics.median(v), 4), "runs": [round(x, 4) for x in v]}
                                   for k, v in times.items()}
    print(json.dumps(result["load_components_s"]), json.dumps(result["peak_gib"]))

    # 3. The reader alone over its two knobs (file dtypes kept: bytes as stored).
    sweep = []
    files = (weight_files(args.checkpoint / "transformer", _DIFFUSERS_WEIGHTS)
             + weight_files(args.checkpoint / "text_encoder", _TRANSFORMERS_WEIGHTS))
    nbytes = sum(f.stat().st_size for f in files)
    for threads, chunk_mib in [(t, c) for t in (1, 2, 4, 8) for c in (16, 64, 256)] if args.sweep else ():
        runs = []
        for _ in range(2):
            _sync(dev)
            t0 = time.perf_counter()
            state = fast_read.read_safetensors(files, args.device, lambda n, d: d, threads=threads,
                                               chunk=chunk_mib * 2**20, chunked=True)
            _sync(dev)
            runs.append(time.perf_counter() - t0)
            del state
            _free(args.device)
        s = statistics.median(runs)
        sweep.append({"threads": threads, "chunk_mib": chunk_mib, "s": round(s, 4),
                      "gb_per_s": round(nbytes / s / 1e9, 2)})
        print(sweep[-1])
    result["reader_sweep"] = {"files_gib": round(nbytes / 2**30, 3), "runs": sweep}
    # 4. What pinning costs by itself: 1 GiB host chunks allocated pinned (the pinned cache emptied first; by
    #    cudaHostAlloc, then by torch registering pages it faults in on fast_read.REGISTER_THREADS threads) against
    #    pageable ones touched page by page, and pageable ones registered with CUDA afterwards.
    if args.pin_probe and torch.cuda.is_available():
        probe: dict[str, float] = {}
        for how in ("pinned_alloc", "pinned_register", "pageable_touch", "pageable_touch_register"):
            _free(args.device)
            _pinning("register" if how == "pinned_register" else "alloc")
            t0 = time.perf_counter()
            chunks = [torch.empty(2**30, dtype=torch.uint8, pin_memory=how.startswith("pinned_"))
                      for _ in range(args.pin_probe)]
            if how != "pinned_alloc":
                for c in chunks:
                    c.fill_(1)
            if how == "pageable_touch_register":
                cudart = torch.cuda.cudart()
                for c in chunks:
                    cudart.cudaHostRegister(c.data_ptr(), c.numel(), 0)
            probe[f"{how}_gb_per_s"] = round(args.pin_probe * 2**30 / (time.perf_counter() - t0) / 1e9, 2)
            if how == "pageable_touch_register":
                for c in chunks:
                    cudart.cudaHostUnregister(c.data_ptr())
            del chunks
        result["pin_probe"] = {"gib": args.pin_probe, **probe}
        print(json.dumps(result["pin_probe"]))

    lt = result["load_components_s"]
    summary: dict = {}
    if "check" in result:
        summary = {"same_weights": not result["check"]["mismatched"] and result["check"]["same_names"],
                   "same_weights_pinned": (not result["check_pinned"]["mismatched"]
                                           and result["check_pinned"]["same_names"]),
                   "pinned_gib": result["check_pinned"]["pinned_gib"]}
    key = {k: k.replace("+", "_").replace("@", "_") for k in lt}
    result["summary"] = {**summary, **{f"{key[k]}_load_s": v["median"] for k, v in lt.items()},
                         **{f"{key[k]}_peak_gib": v for k, v in result["peak_gib"].items()},
                         **({"pin_probe": result["pin_probe"]} if "pin_probe" in result else {})}
    if sweep:
        best = min(sweep, key=lambda r: r["s"])
        result["summary"] |= {"default_reader_gb_per_s": next(r["gb_per_s"] for r in sweep
                                                              if r["threads"] == fast_read.THREADS
                                                              and r["chunk_mib"] * 2**20 == fast_read.CHUNK),
                              "best_reader": best}
    checked = (f"Same weights as the libraries' readers: {summary['same_weights']} ({result['check']['tensors']} "
               f"tensors, {result['check']['bytes_gib']} GiB); read to pinned host memory: "
               f"{summary['same_weights_pinned']}, {summary['pinned_gib']} GiB of it pinned.\n\n"
               if summary else "Numerics not checked in this run (--no-check).\n\n")
    md = (f"# fast_read on {result['device'].get('name', device_slug(dev))}\n\n"
          f"`{result['command']}` ({result['date']})\n\n" + checked
          + md_table([["load_components (page cache warm); +pinned: to the offload tiers' pinned homes", "median s",
                       "runs", "device peak GiB"],
                      *[[k, str(v["median"]), ", ".join(map(str, v["runs"])), str(result["peak_gib"][k])]
                        for k, v in lt.items()]])
          + (f"\nPinning alone ({args.pin_probe} x 1 GiB): {result['pin_probe']}\n" if "pin_probe" in result else "")
          + (f"\nThe reader alone, {result['reader_sweep']['files_gib']} GiB (transformer + text encoder):\n\n"
             + md_table([["threads", "chunk MiB", "s", "GB/s"],
                         *[[str(r["threads"]), str(r["chunk_mib"]), str(r["s"]), str(r["gb_per_s"])] for r in sweep]])
             if sweep else ""))
    write(args.out, f"{args.name}-{device_slug(dev)}", result, md)
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
