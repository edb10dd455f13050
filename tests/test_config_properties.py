"""The TOML door: the optimization fields and the ``[serve]`` table, checked for type, finiteness and range.

TOML writes ``nan`` and ``inf`` as plain floats, so a config file can hold them; every such value is
refused with the field named. Property-based tests (hypothesis) write generated tables to a TOML file
and read them the way ``artifex generate`` and ``artifex serve`` do: each either loads or raises
``InvalidRequestError`` (never another exception), and a config that loads prints as TOML that reads
back to the same config, with strict JSON behind its hash.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import fields

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from artifex.config import OptimizationConfig
from artifex.errors import InvalidRequestError
from artifex.serve.settings import ServeSettings, load_config_file

PROPERTY = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def toml_document(optimization: dict, serve: dict) -> str:
    lines = [f"{k} = {toml_value(v)}" for k, v in optimization.items()]
    if serve:
        lines.append("[serve]")
        lines += [f"{k} = {toml_value(v)}" for k, v in serve.items()]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, field", [
    ("flash_attention_scale = nan", "flash_attention_scale"),
    ("flash_attention_scale = inf", "flash_attention_scale"),
    ("flash_attention_scale = -0.5", "flash_attention_scale"),
    ("flash_attention_dropout = nan", "flash_attention_dropout"),
    ("max_batch_size = 1000000000000000000000", "max_batch_size"),
    ("vae_tile_size = 99999999999999999999999", "vae_tile_size"),
    ("attention_slicing = -1", "attention_slicing"),
    (f'vram_budget = "{"9" * 400}GB"', "vram_budget"),
])
def test_non_finite_and_out_of_range_config_values_are_refused(tmp_path, text, field):
    f = tmp_path / "c.toml"
    f.write_text(text + "\n")
    with pytest.raises(InvalidRequestError) as e:
        OptimizationConfig.from_toml(f)
    assert e.value.field == field, str(e.value)


@pytest.mark.parametrize("text, field", [
    ("port = nan", "port"), ("port = 80.5", "port"), ("port = \"8000\"", "port"),
    ("max_queue = inf", "max_queue"), ("max_steps = 0", "max_steps"),
    (f'max_disk = "{"9" * 400}G"', "max_disk"), ("max_disk = -1", "max_disk"), ("max_disk = 1.5", "max_disk"),
    ("warmup = \"yes\"", "warmup"), ("warmup_shapes = [[64, 64]]", "warmup_shapes"),
    ("warmup_shapes = [[64, 64, nan]]", "warmup_shapes"), ("host = 5", "host"),
])
def test_bad_serve_table_values_are_refused_at_start_up(tmp_path, text, field):
    f = tmp_path / "s.toml"
    f.write_text("[serve]\n" + text + "\n")
    config, serve = load_config_file(f, OptimizationConfig(), {})
    with pytest.raises(InvalidRequestError) as e:
        ServeSettings(models=("tiny-ti2v",), data_dir=tmp_path).merged(serve)
    assert e.value.field == field, str(e.value)


ANY = st.one_of(st.none(), st.booleans(), st.integers(-(10**25), 10**25), st.floats(allow_nan=True,
                allow_infinity=True), st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=3))


def _kind_values(f) -> st.SearchStrategy:
    """Values of the field's own kind (its choices when it has them), with the edges."""
    choices = f.metadata.get("choices")
    kind = str(f.type)
    if choices:
        own = st.sampled_from(choices)
    elif kind.startswith("bool"):
        own = st.booleans()
    elif kind == "int":
        own = st.one_of(st.integers(-3, 70), st.sampled_from([0, 64, 96, 128, 1024, 16384, 10**20]))
    elif kind.startswith("float"):
        own = st.one_of(st.floats(0, 1, exclude_max=True), st.sampled_from([math.nan, math.inf, -math.inf, -1.0]))
    elif f.name == "vram_budget":
        own = st.sampled_from(["24GB", "0.5TB", "16000MB", "0GB", "-1GB", "lots", "9" * 400 + "GB", "1e3GB"])
    else:
        own = st.text(max_size=10)
    return st.one_of(own, own, own, ANY)


OPTIMIZATION = st.fixed_dictionaries({}, optional={f.name: _kind_values(f) for f in fields(OptimizationConfig)})
SERVE = st.fixed_dictionaries({}, optional={
    "port": st.one_of(st.integers(-5, 70000), ANY), "host": st.one_of(st.just("127.0.0.1"), ANY),
    "max_queue": st.one_of(st.integers(-2, 100), ANY), "max_steps": st.one_of(st.integers(-2, 2000), ANY),
    "max_frames": st.one_of(st.integers(-2, 200), ANY), "max_width": st.one_of(st.integers(-2, 5000), ANY),
    "max_disk": st.one_of(st.sampled_from(["50G", "200MB", "0", "-5G", "9" * 400, "x"]), st.integers(-5, 10**15),
                          ANY),
    "max_upload_bytes": st.one_of(st.sampled_from(["20M", "1k"]), st.integers(-5, 10**9), ANY),
    "warmup": st.one_of(st.booleans(), ANY),
    "warmup_shapes": st.one_of(st.lists(st.lists(st.integers(-2, 300), min_size=2, max_size=4), max_size=2), ANY),
    "debug": st.one_of(st.booleans(), ANY),
})


@PROPERTY
@given(optimization=OPTIMIZATION, serve=SERVE)
def test_property_any_toml_config_loads_or_is_refused_naming_a_field(tmp_path, optimization, serve):
    optimization = {k: v for k, v in optimization.items() if v is not None}  # TOML has no null
    serve = {k: v for k, v in serve.items() if v is not None}
    f = tmp_path / "generated.toml"
    f.write_text(toml_document(optimization, serve))
    try:
        config, table = load_config_file(f, OptimizationConfig(), {})
        ServeSettings(models=("tiny-ti2v",), data_dir=tmp_path).merged(table)
    except InvalidRequestError as e:
        assert e.field and str(e)
        return
    for v in config.to_dict().values():
        assert not isinstance(v, float) or math.isfinite(v)
    f.write_text(config.to_toml())
    assert OptimizationConfig.from_toml(f) == config
    json.loads(json.dumps(config.to_dict(), allow_nan=False))
    assert len(config.hash()) == 16
    tomllib.loads(config.to_toml())
