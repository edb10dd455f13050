"""The process clock behind every sidecar's wall section (artifex.timeline)."""

from __future__ import annotations

import threading
import time

from artifex import timeline


def test_process_start_precedes_artifex_and_spans_add_up():
    assert timeline.start() <= time.perf_counter()
    assert timeline.age() > 0
    t = timeline.Timeline()
    with t.span("a"):
        time.sleep(0.01)
        with t.span("a"):  # nested span of the same name: counted once, by the outer one
            time.sleep(0.01)
    with t.span("a"):
        pass
    t.add("b", 1.5)
    t.add("b", -3)  # nothing negative is added
    d = t.to_dict()
    assert d["a"] >= 0.02 and d["b"] == 1.5  # both sleeps, counted once each


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
    assert abs(wall["process_s"] - wall["stages_sum_s"] - wall["other_s"]) < 1e-3
