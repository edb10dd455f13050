"""The prompt-embedding cache (artifex.engine.text_cache) on a real tiny engine."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from artifex.engine.request import GenerationRequest
from artifex.engine.text_cache import TextCache, encoder_fingerprint, tokenizer_fingerprint


def _count_encodes(module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_repeated_prompt_skips_the_encoder_and_gives_identical_latents(engine, tmp_path):
    eng = engine("tiny-ti2v", text_cache_size=8)  # an engine of its own: the counts are this test's
    calls = _count_encodes(eng.c.text_encoder)

    def run(name):
        req = GenerationRequest(model="tiny-ti2v", prompt="a  red kite &amp; a gull", seed=3, steps=2, frames=5,
                                guidance=4.0, output=str(tmp_path / name))
        return eng.generate(req)

    a = run("a.mp4")
    assert calls[0] == 1  # the prompt and the negative prompt in one batch
    b = run("b.mp4")
    assert calls[0] == 1  # both from the cache
    assert torch.equal(a.latents, b.latents)
    side_a, side_b = (json.loads(r.sidecar_path.read_text())["text_cache"] for r in (a, b))
    assert side_a["hit"] == {"prompt": False, "negative_prompt": False}
    assert side_b["hit"] == {"prompt": True, "negative_prompt": True}
    assert side_b["hits"] == 2 and side_b["misses"] == 2 and side_b["entries"] == 2
    # The same text after cleaning (whitespace, HTML escapes) is the same entry; a new text is encoded alone.
    eng.encode_text(["a red kite & a gull", "something else"])
    assert calls[0] == 2 and eng.text_cache.stats.hits == 3


def test_another_tokenizer_or_encoder_misses(engine):
    eng = engine("tiny-ti2v", text_cache_size=9)  # not the engine of the test above
    calls = _count_encodes(eng.c.text_encoder)
    before = eng.encode_text(["a lighthouse at night"])
    tok, enc = eng.c.tokenizer, eng.c.text_encoder
    tok_fp, enc_fp = tokenizer_fingerprint(tok), encoder_fingerprint(enc)
    try:
        # Other weights, same class and config: a miss, and a different embedding.
        other = copy.deepcopy(enc)
        with torch.no_grad():
            next(other.parameters()).add_(0.5)
        other_fp = encoder_fingerprint(other)
        assert other_fp != enc_fp
        eng.c.text_encoder = other
        changed = eng.encode_text(["a lighthouse at night"])
        assert not torch.equal(before, changed)
        # Weights changed in place, or cast: the same module is fingerprinted again.
        with torch.no_grad():
            next(other.parameters()).sub_(0.25)
        changed_fp = encoder_fingerprint(other)
        assert changed_fp not in (enc_fp, other_fp)
        other.to(torch.float32)  # a cast moves no version counter: the storage tells
        assert encoder_fingerprint(other) not in (enc_fp, other_fp, changed_fp)
        eng.c.text_encoder = enc
        hits = eng.text_cache.stats.hits
        assert torch.equal(eng.encode_text(["a lighthouse at night"]), before)  # back: the first entry hits
        assert eng.text_cache.stats.hits == hits + 1
        # Another tokenizer (an added token changes what it does): a miss.
        other_tok = copy.deepcopy(tok)
        other_tok.add_tokens(["<lighthouse>"])
        assert tokenizer_fingerprint(other_tok) != tok_fp
        eng.c.tokenizer = other_tok
        misses = eng.text_cache.stats.misses
        eng.encode_text(["a lighthouse at night"])
        assert eng.text_cache.stats.misses == misses + 1
    finally:
        eng.c.tokenizer, eng.c.text_encoder = tok, enc
    # The original encoder ran for the first call and for the new tokenizer's; the copy (it copied the counting
    # hook too) for its own miss.
    assert calls[0] == 3


def test_bounds_evict_least_recently_used():
    cache = TextCache(max_entries=2, max_bytes=10_000)
    t = torch.zeros(100, dtype=torch.float32)  # 400 bytes
    cache.put(("a",), t)
    cache.put(("b",), t + 1)
    assert cache.get(("a",)) is not None  # a is now the most recently used
    cache.put(("c",), t + 2)
    assert cache.get(("b",)) is None and cache.get(("a",)) is not None and len(cache) == 2
    assert cache.stats.evictions == 1
    small = TextCache(max_entries=10, max_bytes=1000)
    for i in range(3):
        small.put((i,), t)
    assert len(small) == 2 and small.to_dict()["bytes"] == 800 and small.stats.evictions == 1
    small.put(("big",), torch.zeros(1000))  # larger than the whole bound: not stored, nothing evicted for it
    assert small.get(("big",)) is None and len(small) == 2
    with pytest.raises(ValueError, match="must be >= 0"):
        TextCache(max_entries=-1)


def test_cache_off_encodes_every_time(engine):
    eng = engine("tiny-ti2v", text_cache_size=0)
    calls = _count_encodes(eng.c.text_encoder)
    a = eng.encode_text(["a quiet harbour"])
    b = eng.encode_text(["a quiet harbour"])
    assert calls[0] == 2 and torch.equal(a, b) and len(eng.text_cache) == 0 and not eng.text_cache.enabled


def test_server_metrics_count_the_lookups():
    from artifex.serve.metrics import Metrics, parse_text

    m = Metrics()
    m.observe_text_cache("tiny-ti2v", {"prompt": False, "negative_prompt": False})
    m.observe_text_cache("tiny-ti2v", {"prompt": True, "negative_prompt": True})
    m.observe_text_cache("tiny-ti2v", {"prompt": True, "negative_prompt": None})  # no CFG: not encoded
    m.observe_text_cache("tiny-ti2v", None)  # an engine that reports nothing
    text = m.render(states={}, queue_depth=0, max_queue=1, models={}, stored_bytes=0, max_disk=0, uptime_s=1.0,
                    workers={"executor": {"kind": "local"}, "workers": []})
    got = {(labels["text"], labels["result"]): v for name, labels, v in parse_text(text)
           if name == "artifex_text_cache_lookups_total"}
    assert got == {("prompt", "hit"): 2, ("prompt", "miss"): 1, ("negative_prompt", "hit"): 1,
                   ("negative_prompt", "miss"): 1}
