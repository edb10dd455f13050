"""``artifex monitor``: the server's /metrics and running jobs, redrawn in the terminal."""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict

from artifex.serve.client import Client, ClientError
from artifex.serve.metrics import parse_text


class MonitorError(Exception):
    pass


def snapshot(base: str, token: str | None) -> dict:
    """Everything one screen shows, read from the server."""
    client = Client(base, token, timeout=5.0)

    def get(path: str) -> tuple[int, bytes]:
        return client.request("GET", path)[:2]

    status, body = get("/metrics")
    if status == 401:
        raise MonitorError("401 from /metrics: give the API token (ARTIFEX_API_TOKEN, --token-file or --data-dir)")
    if status != 200:
        raise MonitorError(f"/metrics answered {status}: {body[:200]!r}")
    samples = parse_text(body.decode())
    _, ready_body = get("/readyz")
    running = json.loads(get("/api/jobs?state=running&limit=10")[1]).get("jobs", [])
    queued = json.loads(get("/api/jobs?state=queued&limit=5")[1])
    return {"samples": samples, "ready": json.loads(ready_body), "running": running,
            "queued": queued.get("jobs", []), "queued_total": queued.get("total", 0)}


def _bar(percent: float | None, width: int = 24) -> str:
    p = max(0.0, min(100.0, percent or 0.0))
    filled = int(round(width * p / 100))
    return "[" + "#" * filled + "." * (width - filled) + f"] {p:5.1f}%"


def render(base: str, snap: dict) -> str:
    one: dict[str, float] = {}
    by_label: dict[str, list[tuple[dict, float]]] = defaultdict(list)
    for name, labels, value in snap["samples"]:
        by_label[name].append((labels, value))
        if not labels:
            one[name] = value
    lines = [f"artifex monitor  {base}  {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    models = snap["ready"].get("models", {})
    lines.append("models: " + ", ".join(f"{m} {v.get('status')}" for m, v in models.items()))
    states = {lab["state"]: int(v) for lab, v in by_label["artifex_jobs"]}
    lines.append(f"queue: {int(one.get('artifex_queue_depth', 0))} / {int(one.get('artifex_queue_capacity', 0))}"
                 "   jobs: " + "  ".join(f"{s} {n}" for s, n in states.items()))
    subs = {lab["result"]: int(v) for lab, v in by_label["artifex_submissions_total"]}
    if subs:
        lines.append("submissions since start: " + "  ".join(f"{k} {v}" for k, v in sorted(subs.items())))
    lines.append(f"stored videos: {one.get('artifex_output_bytes', 0) / 2**20:.1f} MiB"
                 + (f" of {one['artifex_output_bytes_cap'] / 2**30:.1f} GiB cap"
                    if one.get("artifex_output_bytes_cap") else ""))
    lines.append("running:" if snap["running"] else "running: none")
    for j in snap["running"]:
        p = j.get("progress") or {}
        # step/total counts denoising steps; other stages report 0/1 .. 1/1 of themselves, which beside the
        # job's overall percent (decode starts at 92%) only reads as a contradiction
        step = f"step {p.get('step')}/{p.get('total')}" if p.get("stage") == "denoise" and p.get("total") else ""
        eta = f"eta {j['eta_s']:.1f}s" if j.get("eta_s") is not None else ""
        lines.append(f"  {j['id']}  {j['model']}  {p.get('stage', ''):<12} {_bar(p.get('percent'))} {step} {eta}")
    if snap["queued"]:
        lines.append(f"queued ({snap['queued_total']}): " + ", ".join(j["id"] for j in snap["queued"]))
    sums = {(lab["model"], lab["stage"]): v for lab, v in by_label["artifex_stage_duration_seconds_sum"]}
    counts = {(lab["model"], lab["stage"]): v for lab, v in by_label["artifex_stage_duration_seconds_count"]}
    if counts:
        lines.append("stage durations (mean s):")
        for model in sorted({m for m, _ in counts}):
            parts = [f"{s} {sums[(m, s)] / c:.2f}" for (m, s), c in sorted(counts.items()) if m == model and c]
            lines.append(f"  {model}: " + "  ".join(parts))
    lines.extend(_workers(by_label))
    gpus: dict[str, dict] = defaultdict(dict)
    for name in ("artifex_gpu_utilization_percent", "artifex_gpu_memory_used_bytes", "artifex_gpu_memory_total_bytes",
                 "artifex_gpu_temperature_celsius", "artifex_gpu_power_watts"):
        for lab, v in by_label[name]:
            gpus[lab.get("gpu", "?")]["name"] = lab.get("name", "")
            gpus[lab.get("gpu", "?")][name] = v
    if not gpus:
        lines.append("GPU: none reported (no NVML or no GPU)")
    for idx, g in sorted(gpus.items()):
        lines.append(
            f"GPU {idx} {g['name']}: util {g.get('artifex_gpu_utilization_percent', 0):.0f}%  "
            f"mem {g.get('artifex_gpu_memory_used_bytes', 0) / 2**30:.1f}/"
            f"{g.get('artifex_gpu_memory_total_bytes', 0) / 2**30:.1f} GiB  "
            f"temp {g.get('artifex_gpu_temperature_celsius', 0):.0f} C  "
            f"power {g.get('artifex_gpu_power_watts', 0):.0f} W")
    return "\n".join(lines)


def _workers(by_label: dict[str, list[tuple[dict, float]]]) -> list[str]:
    """Where engines run (this process or Ray actors, the Ray dashboard) and one line per worker."""
    lines = []
    for lab, _ in by_label["artifex_executor_info"][:1]:
        if lab.get("kind") == "ray":
            dashboard = lab.get("dashboard") or "off"
            lines.append(f"engines: Ray actors (cluster {lab.get('address')}, dashboard {dashboard})")
        else:
            lines.append("engines: in the server's process")

    def key(lab: dict) -> tuple[str, str]:
        return lab.get("model", ""), lab.get("worker", "")

    values: dict[str, dict[tuple[str, str], float]] = defaultdict(dict)
    for name in ("artifex_worker_busy", "artifex_worker_jobs_finished", "artifex_worker_rss_bytes",
                 "artifex_worker_gpu_memory_used_bytes", "artifex_worker_gpu_memory_total_bytes"):
        for lab, v in by_label[name]:
            values[name][key(lab)] = values[name].get(key(lab), 0) + v  # GPUs of one worker add up
    for lab, ready in by_label["artifex_worker_ready"]:
        k = key(lab)
        parts = [f"  worker {k[0]}/{k[1]} on {lab.get('node', '?')}: {'ready' if ready else 'not ready'}",
                 "busy" if values["artifex_worker_busy"].get(k) else "idle",
                 f"jobs {int(values['artifex_worker_jobs_finished'].get(k, 0))}"]
        if k in values["artifex_worker_gpu_memory_used_bytes"]:
            parts.append(f"GPU mem {values['artifex_worker_gpu_memory_used_bytes'][k] / 2**30:.1f}/"
                         f"{values['artifex_worker_gpu_memory_total_bytes'].get(k, 0) / 2**30:.1f} GiB")
        if k in values["artifex_worker_rss_bytes"]:
            parts.append(f"RSS {values['artifex_worker_rss_bytes'][k] / 2**30:.1f} GiB")
        lines.append("  ".join(parts))
    return lines


def run(base: str, token: str | None, interval: float, once: bool, out=sys.stdout) -> int:
    while True:
        try:
            text = render(base, snapshot(base, token))
            code = 0
        except (MonitorError, ClientError) as e:
            text, code = f"artifex monitor: {e}", 1
        if once:
            print(text, file=out if code == 0 else sys.stderr)
            return code
        if out.isatty():
            out.write("\x1b[H\x1b[2J")
        out.write(text + f"\n\n(every {interval:g}s; Ctrl-C to quit)\n")
        out.flush()
        time.sleep(interval)
