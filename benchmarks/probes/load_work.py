"""load_work: the load's own work at TI2V-5B's real shapes, with no bytes read (the CPU machine, or a GPU).

On the GPU a fresh `artifex generate` whose weights the read-ahead had already put on the GPU still spent
0.17-0.43 s planning before the load and 0.47-0.73 s in checkpoint_read (probe13-h100-run1.json): work, not
reading. This probe measures that work on LOAD_WORK_DEVICE (default cpu; cuda: the GPU path's own), for a
diffusers-layout checkpoint at TI2V-5B's shapes whose safetensors files hold real headers and no data (sparse
files: holes), loaded by ``load_components`` as the GPU path loads it, every file handed over as the read-ahead
hands it (``read_ahead.take`` answering with tensors of the headers' shapes and dtypes, allocated and never
touched), ``plan_before_load`` beside it; REPEATS times in one process (the first pays Python's first calls),
then once under cProfile. Built on the tiny-ti2v checkpoint (its tokenizer, the bench's too, and its scheduler),
saved to a temporary folder.
Usage: PYTHONPATH=src python benchmarks/probes/load_work.py OUT_DIR   (LOAD_WORK_REPEATS, default 3). Writes
OUT_DIR/load-work-<device>.json and load-work-<device>-profile.txt.
"""
import cProfile
import io
import json
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

OUT = sys.argv[1] if len(sys.argv) > 1 else "/tmp/out"
REPEATS = int(os.environ.get("LOAD_WORK_REPEATS", "3"))
DEVICE = os.environ.get("LOAD_WORK_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sparse_safetensors(path: Path, tensors: dict) -> None:
    """``path`` as a safetensors file of ``tensors`` (name -> tensor, meta is fine): a real header, then holes."""
    from artifex.models.fast_read import DTYPES

    code = {v: k for k, v in DTYPES.items()}
    header, offset = {}, 0
    for name in sorted(tensors):
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": code[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)


def build(root: Path):
    from artifex.models.configs import meta_components
    from artifex.models.loader import resolve_checkpoint
    from artifex.models.registry import get_model

    tiny = resolve_checkpoint(get_model("tiny-ti2v"), None, root / "home")  # builds it there
    ckpt = root / "ti2v-5b"
    shutil.copytree(tiny, ckpt)
    spec = get_model("ti2v-5b")
    text_encoder, vae, (dit,) = meta_components(spec, "bf16")
    for folder, model in (("transformer", dit), ("vae", vae), ("text_encoder", text_encoder)):
        for f in (ckpt / folder).iterdir():
            if f.suffix in (".safetensors", ".json"):
                f.unlink()
        if folder == "text_encoder":
            model.config.save_pretrained(ckpt / folder)
            name = "model.safetensors"
        else:
            model.save_config(ckpt / folder)
            name = "diffusion_pytorch_model.safetensors"
        state = model.state_dict()
        if folder == "text_encoder":  # as save_pretrained writes a tied model: the shared embedding once
            state = {k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}
        sparse_safetensors(ckpt / folder / name, state)
    return spec, ckpt


def main() -> None:
    from artifex import timeline

    timeline.import_libraries()  # first, as the CLI does: the collector frozen after the imports (gc_paused)
    import torch

    from artifex.config import OptimizationConfig
    from artifex.engine.plan import plan_before_load
    from artifex.models import fast_read, read_ahead
    from artifex.models.loader import load_components

    root = Path(tempfile.mkdtemp(prefix="load-work-"))
    try:
        spec, ckpt = build(root)

        def take(path, device):  # what the read-ahead hands over: the file's tensors, read (here: untouched)
            _, entries = fast_read.read_header(Path(path))
            names = sorted(entries)
            return names, [torch.empty(entries[n]["shape"], dtype=fast_read.DTYPES[entries[n]["dtype"]],
                                       device=device) for n in names]

        read_ahead.take = take
        devices = dict.fromkeys(("transformer", "vae", "text_encoder"), DEVICE)
        res = {"command": f"LOAD_WORK_DEVICE={DEVICE} load_work.py {OUT}", "device": DEVICE, "cpus": os.cpu_count(),
               "torch": torch.__version__, "runs": []}
        for _ in range(REPEATS):
            t = time.perf_counter()
            plan_before_load(spec, OptimizationConfig())
            planned = time.perf_counter() - t
            t = time.perf_counter()
            c = load_components(spec, ckpt, "bf16", devices=devices)
            if DEVICE != "cpu":
                torch.cuda.synchronize()
            res["runs"].append({"plan_before_load_s": round(planned, 4),
                                "load_components_s": round(time.perf_counter() - t, 4), "timings_s": c.timings})
            print(json.dumps(res["runs"][-1]), flush=True)
            del c
        prof = cProfile.Profile()
        prof.enable()
        plan_before_load(spec, OptimizationConfig())
        load_components(spec, ckpt, "bf16", devices=devices)
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(45)
        Path(OUT).mkdir(parents=True, exist_ok=True)
        (Path(OUT) / f"load-work-{DEVICE}-profile.txt").write_text(s.getvalue())
        (Path(OUT) / f"load-work-{DEVICE}.json").write_text(json.dumps(res, indent=1))
        print(s.getvalue()[:6000])
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
