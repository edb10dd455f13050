"""The process clock behind every sidecar's wall section (artifex.timeline)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from artifex import timeline


def test_process_start_precedes_artifex_and_spans_add_up(monkeypatch):
    assert timeline.start() <= time.perf_counter()
    assert timeline.age() > 0
    ticks = iter(range(100))
    monkeypatch.setattr(timeline.time, "perf_counter", lambda: float(next(ticks)))  # one second per reading
    t = timeline.Timeline()
    with t.span("a"):  # reads 0 ... 1
        with t.span("a"):  # nested, same name: no readings, counted by the outer span only
            pass
    with t.span("a"):  # reads 2 ... 3
        pass
    t.add("b", 1.5)
    t.add("b", -3)  # nothing negative is added
    assert t.to_dict() == {"a": 2.0, "b": 1.5}


def test_nested_span_on_another_thread_counts_on_its_own():
    t = timeline.Timeline()
    inner = threading.Event()

    def other():
        with t.span("x"):
            time.sleep(0.01)
        inner.set()

    with t.span("x"):
        th = threading.Thread(target=other)
        th.start()
        th.join()
    assert inner.is_set()
    assert t.to_dict()["x"] >= 0.02  # the outer span (>= 0.01) plus the other thread's own (>= 0.01)


def test_wall_section_accounts_for_the_rest_as_other():
    wall = timeline.wall_section({"checkpoint_read": 0.5}, {"denoise": 0.25, "total": 9.0})
    s = wall["stages_s"]
    assert s["load.checkpoint_read"] == 0.5 and s["request.denoise"] == 0.25 and "request.total" not in s
    assert "process.startup" in s
    assert wall["host_peak_rss_gib"] > 0
    rss = wall["host_rss_gib"]  # by kind, at this moment
    assert set(rss) == {"anon", "file", "shmem"} and rss["anon"] > 0
    assert rss["anon"] + rss["file"] + rss["shmem"] <= wall["host_peak_rss_gib"] + 0.01
    assert abs(wall["process_s"] - wall["stages_sum_s"] - wall["other_s"]) < 1e-3


GC_CHECK = """
import gc, json, sys
from artifex import timeline
seen = {}
if sys.argv[1] == "torch-first":
    import torch  # noqa: F401  (a process that imported torch before its first pause: nothing is paused)
if sys.argv[1] == "collector-off":
    gc.disable()
with timeline.gc_paused():
    seen["inside"] = gc.isenabled()
    with timeline.gc_paused():  # nested: the collector comes back after the outer one only
        import decimal  # noqa: F401
    seen["after_inner"] = gc.isenabled()
seen["after"], seen["frozen"] = gc.isenabled(), gc.get_freeze_count()
timeline._IMPORTS_DONE.set()  # once the libraries are imported, a pause (a later load) pauses nothing
with timeline.gc_paused():
    seen["later"] = gc.isenabled()
print(json.dumps(seen))
"""


@pytest.mark.slow
@pytest.mark.parametrize("case, expected", [
    ("first", {"inside": False, "after_inner": False, "after": True, "later": True}),
    ("torch-first", {"inside": True, "after_inner": True, "after": True, "later": True, "frozen": 0}),
    ("collector-off", {"inside": False, "after_inner": False, "after": False, "later": False, "frozen": 0}),
])
def test_gc_is_paused_and_what_lives_frozen_only_before_torch_is_imported(case, expected):
    p = subprocess.run([sys.executable, "-c", GC_CHECK, case], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    seen = json.loads(p.stdout)
    assert seen.items() >= expected.items(), seen
    if case == "first":
        assert seen["frozen"] > 0
