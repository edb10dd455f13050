"""Prometheus text exposition (format 0.0.4), written by hand: a few gauges, counters and histograms.

GPU figures come from NVML (the ``nvidia-ml-py`` package, module ``pynvml``) when it is
installed and finds a GPU; on a machine without one the GPU series are simply absent.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import defaultdict

log = logging.getLogger("artifex.serve")

# Stage durations span a tiny model's 0.02 s encode to a 14B model's half-hour denoise.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, math.inf)


def _labels(**kv: str) -> str:
    if not kv:
        return ""
    parts = []
    for k, v in kv.items():
        v = str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
        parts.append(f'{k}="{v}"')
    return "{" + ",".join(parts) + "}"


def _num(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    return repr(float(v)) if isinstance(v, float) else str(v)


class Metrics:
    """In-process counters and histograms (reset on restart, as Prometheus expects)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._stages: dict[tuple[str, str], list[float]] = {}  # bucket counts..., sum, count
        self.submissions: dict[str, int] = defaultdict(int)
        self.finished: dict[tuple[str, str], int] = defaultdict(int)
        self.job_seconds: dict[str, list[float]] = defaultdict(list)  # recent totals per model (for ETAs)
        self.restarts: dict[str, int] = defaultdict(int)  # engines brought up again after their process died
        self.text_cache: dict[tuple[str, str, str], int] = defaultdict(int)  # (model, text, hit|miss) -> lookups

    def observe_stage(self, model: str, stage: str, seconds: float) -> None:
        with self._lock:
            h = self._stages.setdefault((model, stage), [0.0] * (len(BUCKETS) + 2))
            for i, b in enumerate(BUCKETS):
                if seconds <= b:
                    h[i] += 1
            h[-2] += seconds
            h[-1] += 1

    def observe_job(self, model: str, state: str, timings: dict | None) -> None:
        with self._lock:
            self.finished[(model, state)] += 1
            if timings and "total" in timings:
                recent = self.job_seconds[model]
                recent.append(float(timings["total"]))
                del recent[:-20]
        for stage, seconds in (timings or {}).items():
            self.observe_stage(model, stage, float(seconds))

    def observe_text_cache(self, model: str, hits: dict | None) -> None:
        """A finished job's prompt-embedding cache lookups: {"prompt": bool, "negative_prompt": bool} (a text
        the job did not encode, or an engine without the cache, is left out)."""
        with self._lock:
            for text, hit in (hits or {}).items():
                if isinstance(hit, bool):
                    self.text_cache[(model, text, "hit" if hit else "miss")] += 1

    def count_restart(self, model: str) -> None:
        with self._lock:
            self.restarts[model] += 1

    def count_submission(self, result: str) -> None:
        with self._lock:
            self.submissions[result] += 1

    def mean_job_seconds(self, model: str) -> float | None:
        with self._lock:
            recent = self.job_seconds.get(model)
            return sum(recent) / len(recent) if recent else None

    def stage_means(self) -> dict[tuple[str, str], float]:
        with self._lock:
            return {k: h[-2] / h[-1] for k, h in self._stages.items() if h[-1]}

    def render(self, *, states: dict[str, int], queue_depth: int, max_queue: int, models: dict[str, str],
               stored_bytes: int, max_disk: int, uptime_s: float, workers: dict) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {_num(v)}" for labels, v in samples)

        metric("artifex_queue_depth", "gauge", "Jobs waiting in the queue (all models).", [("", queue_depth)])
        metric("artifex_queue_capacity", "gauge", "Most jobs the queue holds before answering 429.",
               [("", max_queue)])
        metric("artifex_jobs", "gauge", "Jobs in the store by state.",
               [(_labels(state=s), n) for s, n in states.items()])
        metric("artifex_model_ready", "gauge", "1 when the model is loaded and warmed up.",
               [(_labels(model=m, status=s), 1 if s == "ready" else 0) for m, s in models.items()])
        with self._lock:
            subs = sorted(self.submissions.items())
            fin = sorted(self.finished.items())
            stages = sorted((k, list(h)) for k, h in self._stages.items())
            text_cache = sorted(self.text_cache.items())
        metric("artifex_submissions_total", "counter", "Generation requests by outcome since start.",
               [(_labels(result=r), n) for r, n in subs])
        metric("artifex_jobs_finished_total", "counter", "Jobs finished since start, by model and final state.",
               [(_labels(model=m, state=s), n) for (m, s), n in fin])
        metric("artifex_text_cache_lookups_total", "counter", "Prompt-embedding cache lookups of finished jobs, by "
               "model, text (prompt, negative_prompt) and result (hit: the text encoder was skipped).",
               [(_labels(model=m, text=t, result=r), n) for (m, t, r), n in text_cache])
        out.append("# HELP artifex_stage_duration_seconds Duration of each generation stage (encode_text, "
                   "encode_image, denoise, decode, write, total).")
        out.append("# TYPE artifex_stage_duration_seconds histogram")
        for (model, stage), h in stages:
            for i, b in enumerate(BUCKETS):
                out.append(f"artifex_stage_duration_seconds_bucket{_labels(model=model, stage=stage, le=_num(b))}"
                           f" {int(h[i])}")
            out.append(f"artifex_stage_duration_seconds_sum{_labels(model=model, stage=stage)} {_num(h[-2])}")
            out.append(f"artifex_stage_duration_seconds_count{_labels(model=model, stage=stage)} {int(h[-1])}")
        metric("artifex_output_bytes", "gauge", "Bytes of finished videos kept in the data directory.",
               [("", stored_bytes)])
        metric("artifex_output_bytes_cap", "gauge", "Disk cap for finished videos (0: none).", [("", max_disk)])
        metric("artifex_uptime_seconds", "gauge", "Seconds since the server started.", [("", round(uptime_s, 3))])
        self._render_workers(metric, workers)
        gpus = gpu_stats()
        if gpus:
            series = [
                ("artifex_gpu_utilization_percent", "GPU busy time over the last sample period (NVML).", "util"),
                ("artifex_gpu_memory_used_bytes", "GPU memory in use (NVML).", "mem_used"),
                ("artifex_gpu_memory_total_bytes", "GPU memory in total (NVML).", "mem_total"),
                ("artifex_gpu_temperature_celsius", "GPU temperature (NVML).", "temp"),
                ("artifex_gpu_power_watts", "GPU power draw (NVML).", "power"),
            ]
            for name, help_text, key in series:
                metric(name, "gauge", help_text,
                       [(_labels(gpu=str(g["index"]), name=g["name"]), g[key]) for g in gpus if g.get(key) is not None])
        return "\n".join(out) + "\n"

    def _render_workers(self, metric, view: dict) -> None:
        """Per-worker series (one worker = one engine: in this process, or a Ray actor) and the executor."""
        ex = view["executor"]
        metric("artifex_executor_info", "gauge", "Where engines run (local or ray) and the Ray dashboard address.",
               [(_labels(kind=ex["kind"], address=ex.get("address") or "", dashboard=ex.get("dashboard") or ""), 1)])
        with self._lock:
            restarts = sorted(self.restarts.items())
        metric("artifex_worker_restarts_total", "counter", "Engines brought up again after their process died.",
               [(_labels(model=m), n) for m, n in restarts])
        rows = view["workers"]

        def ids(w: dict, **more) -> str:
            return _labels(model=w["model"], worker=str(w["index"]), node=w.get("node") or "", **more)

        metric("artifex_worker_ready", "gauge", "1 when the worker's engine is loaded, warmed up and alive.",
               [(ids(w), 1 if w["status"] == "ready" else 0) for w in rows])
        metric("artifex_worker_busy", "gauge", "1 while the worker runs a job.",
               [(ids(w), int(w["busy"])) for w in rows])
        metric("artifex_worker_jobs_finished", "gauge", "Jobs the worker finished since it started.",
               [(ids(w), w["jobs_done"]) for w in rows])
        metric("artifex_worker_rss_bytes", "gauge", "Resident memory of the worker's process.",
               [(ids(w), w["report"]["rss_bytes"]) for w in rows if w["report"].get("rss_bytes") is not None])
        metric("artifex_worker_node_load1", "gauge", "One-minute load average of the worker's node.",
               [(ids(w), w["report"]["loadavg_1m"]) for w in rows if w["report"].get("loadavg_1m") is not None])
        for key, help_text in (("used_bytes", "GPU memory in use on the worker's GPU (all processes)."),
                               ("allocated_bytes", "GPU memory held by the worker's tensors."),
                               ("reserved_bytes", "GPU memory reserved by the worker's caching allocator."),
                               ("total_bytes", "GPU memory of the worker's GPU.")):
            metric(f"artifex_worker_gpu_memory_{key}", "gauge", help_text,
                   [(ids(w, gpu=str(g["index"])), g[key]) for w in rows for g in w["report"].get("gpus", [])])


_NVML = {"state": None}  # None: not tried, True: initialised, False: unavailable
_NVML_LOCK = threading.Lock()


def gpu_stats() -> list[dict] | None:
    """Per-GPU utilisation, memory, temperature and power through NVML; None when there is no GPU/NVML."""
    with _NVML_LOCK:
        if _NVML["state"] is False:
            return None
        try:
            import pynvml
        except ImportError:
            _NVML["state"] = False
            return None
        try:
            if _NVML["state"] is None:
                pynvml.nvmlInit()
                _NVML["state"] = True
            out = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(handle)
                g: dict = {"index": i, "name": name.decode() if isinstance(name, bytes) else name}
                for key, fn in (
                    ("util", lambda h: pynvml.nvmlDeviceGetUtilizationRates(h).gpu),
                    ("mem_used", lambda h: pynvml.nvmlDeviceGetMemoryInfo(h).used),
                    ("mem_total", lambda h: pynvml.nvmlDeviceGetMemoryInfo(h).total),
                    ("temp", lambda h: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)),
                    ("power", lambda h: pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0),
                ):
                    try:
                        g[key] = fn(handle)
                    except pynvml.NVMLError:  # a figure this GPU does not report
                        g[key] = None
                out.append(g)
            return out or None
        except pynvml.NVMLError as e:
            if _NVML["state"] is None:
                log.info("no GPU figures in /metrics: NVML unavailable (%s)", e)
                _NVML["state"] = False
            return None


def parse_text(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of a Prometheus text exposition: (name, labels, value). Used by ``artifex monitor``."""
    import re

    samples = []
    pat = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$')
    lab = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = pat.match(line)
        if not m:
            continue
        labels = {k: v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
                  for k, v in lab.findall(m[3] or "")}
        value = m[4]
        samples.append((m[1], labels, math.inf if value == "+Inf" else float(value)))
    return samples
