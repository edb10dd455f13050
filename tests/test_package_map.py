"""importlib.metadata's package map kept on disk while the libraries import (artifex.package_map)."""

from __future__ import annotations

import importlib.metadata
import json
import os

from artifex import package_map


def test_the_map_is_the_original_then_read_from_disk_until_a_path_entry_changes(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    original = importlib.metadata.packages_distributions
    expected = original()
    calls = []
    monkeypatch.setattr(importlib.metadata, "packages_distributions",
                        lambda: calls.append(1) or original())
    cache = tmp_path / "home" / "package-map.json"
    with package_map.cached(cache):
        first = importlib.metadata.packages_distributions()
    assert first == expected and calls == [1] and cache.is_file()
    assert json.loads(cache.read_text())["state"] == package_map.path_state()
    with package_map.cached(cache):  # another process, nothing installed since: from the file
        again = importlib.metadata.packages_distributions()
        again["torch"] = ["changed by the caller"]
        assert importlib.metadata.packages_distributions()["torch"] == expected["torch"]  # a copy each call
    assert again.keys() == expected.keys() and calls == [1]
    (site / "newpkg-1.0.dist-info").mkdir()  # an install: its directory's entries change
    os.utime(site, ns=(1, os.stat(site).st_mtime_ns + 10**9))
    with package_map.cached(cache):
        importlib.metadata.packages_distributions()
    assert calls == [1, 1]
    cache.write_text("{not json")  # unreadable: computed again, and stored
    with package_map.cached(cache):
        assert importlib.metadata.packages_distributions() == expected
    assert calls == [1, 1, 1] and json.loads(cache.read_text())["map"] == expected


def test_the_function_is_restored_and_the_switch_leaves_it_alone(tmp_path, monkeypatch):
    before = importlib.metadata.packages_distributions
    with package_map.cached(tmp_path / "m.json"):
        outer = importlib.metadata.packages_distributions
        assert outer is not before
        with package_map.cached(tmp_path / "inner.json"):  # nested (importing() in importing()): the outer answers
            assert importlib.metadata.packages_distributions is outer
            importlib.metadata.packages_distributions()
        assert importlib.metadata.packages_distributions is outer
    assert importlib.metadata.packages_distributions is before
    assert (tmp_path / "m.json").is_file() and not (tmp_path / "inner.json").exists()
    monkeypatch.setenv("ARTIFEX_LAZY_IMPORTS", "off")
    with package_map.cached(tmp_path / "off.json"):
        assert importlib.metadata.packages_distributions is before
        importlib.metadata.packages_distributions()
    assert not (tmp_path / "off.json").exists()


def test_an_unwritable_home_only_costs_the_time(tmp_path):
    expected = importlib.metadata.packages_distributions()
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the home directory should be
    with package_map.cached(blocked / "package-map.json"):
        assert importlib.metadata.packages_distributions() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written, no temporary file left
