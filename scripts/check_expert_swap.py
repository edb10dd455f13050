#!/usr/bin/env python3
"""GPU check of the A14B expert swap: the swap tiers give the resident tier's latents, and what a swap costs.

    python scripts/check_expert_swap.py [--model tiny-t2v-moe] [--size 160x96] [--frames 17] [--steps 6]

One engine per tier (resident, expert_swap, model_offload) on the same random weights and the
same request; each generation's latents are compared with the resident run's (they run the same
kernels on the same inputs, so they should be equal: any difference means a copy was read before
it was complete). Reported per tier: max abs difference, whether expert prefetch was planned,
pinned host bytes, the seconds of the whole generation and of the step at the MoE switch.
On a CPU the same runs take the plain path (nothing pinned, no side stream). Prints one JSON
object; ``--out FILE`` also writes it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

TIERS = ("resident", "expert_swap", "model_offload")


def run_tier(spec, components, tier: str, request, device: str) -> dict:
    from artifex.config import OptimizationConfig
    from artifex.engine.pipeline import Engine

    engine = Engine.from_components(spec, components, OptimizationConfig(device=device, memory_tier=tier))
    marks: list[float] = []

    def on_event(e):
        if e.stage == "denoise":
            if engine.device.type == "cuda":
                torch.cuda.synchronize(engine.device)
            marks.append(time.perf_counter())

    engine.generate(request)  # warm-up: allocator, kernels, pinning
    start = time.perf_counter()
    result = engine.generate(request, on_event=on_event)
    total = time.perf_counter() - start
    steps = [b - a for a, b in zip([start, *marks], marks)]
    switch = result.switch_step
    homes = engine.placement._homes or []
    row = {"tier": result.memory["tier"], "expert_prefetch": result.memory.get("expert_prefetch"),
           "pinned_gib": round(sum(h.pinned_bytes for h in homes) / 2**30, 3), "total_s": round(total, 3),
           "switch_step": switch, "switch_step_s": round(steps[switch], 3) if switch is not None else None,
           "median_step_s": round(sorted(steps)[len(steps) // 2], 3), "latents": result.latents}
    engine.placement.release()
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-t2v-moe")
    p.add_argument("--size", default="160x96")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    from artifex.engine.request import GenerationRequest
    from artifex.models.random_init import random_components
    from artifex.models.registry import get_model

    spec = get_model(args.model)
    if spec.experts != 2:
        print(f"error: {spec.name} has one expert; the swap tiers need a two-expert model", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    width, height = (int(v) for v in args.size.split("x"))
    components = random_components(spec, "bf16", build_device=device)
    request = GenerationRequest(model=spec.name, prompt="a red kite over the beach", negative_prompt="blurry", seed=3,
                                steps=args.steps, width=width, height=height, frames=args.frames,
                                output=str(Path("/tmp") / f"check-expert-swap-{spec.name}.mp4"))
    rows = [run_tier(spec, components, tier, request, device) for tier in TIERS]
    reference = rows[0]["latents"]
    for row in rows:
        row["max_abs_diff_vs_resident"] = float((row.pop("latents") - reference).abs().max())
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "model": spec.name,
           "size": args.size, "frames": args.frames, "steps": args.steps, "tiers": rows,
           "equal": all(r["max_abs_diff_vs_resident"] == 0.0 for r in rows)}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if out["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
