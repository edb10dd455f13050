"""fast_read: safetensors files read straight to their device, through buffers on threads (a GPU's path, forced
here on the CPU with tiny chunks so that tensors straddle chunks) or tensor by tensor, give the tensors
safetensors' own reader gives; bad files are errors naming them; the loader's models built from them equal
from_pretrained's."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from artifex.errors import CheckpointError, InvalidRequestError
from artifex.models import fast_read
from artifex.models.loader import load_components, read_diffusers_model
from artifex.models.registry import get_model

KEEP = {}.get  # dtype_of that keeps each tensor's file dtype


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(33, 17, generator=g),
        "b.bf16": torch.randn(5, 3, 7, generator=g).to(torch.bfloat16),
        "c.half": torch.randn(1, generator=g).to(torch.float16),
        "d.scalar": torch.tensor(3.5),
        "e.empty": torch.empty(0, 4),
        "f.index": torch.arange(-50, 51, dtype=torch.int64),
        "g.mask": torch.rand(13, generator=g) > 0.5,
        "h.bytes": torch.randint(0, 255, (29,), dtype=torch.uint8, generator=g),
        "i.fp8": torch.randn(9, 4, generator=g).to(torch.float8_e4m3fn),
    }


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.float8_e4m3fn else a[k],
                        b[k].view(torch.uint8) if b[k].dtype == torch.float8_e4m3fn else b[k]) for k in a)


@pytest.mark.parametrize("chunked, chunk, threads", [(False, 0, 1), (False, 0, 3), (True, 7, 3), (True, 64, 2),
                                                     (True, 1 << 20, 4)])
def test_tensors_equal_safetensors_own_reader(tmp_path, chunked, chunk, threads):
    files = [tmp_path / "one.safetensors", tmp_path / "two.safetensors"]
    tensors = _mixed()
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[:5]}, files[0])
    save_file({k: tensors[k] for k in names[5:]}, files[1])
    expected = load_file(files[0]) | load_file(files[1])
    got = fast_read.read_safetensors(files, "cpu", lambda name, d: d, threads=threads, chunk=chunk or 1,
                                     chunked=chunked)
    assert _same(got, expected)


def test_each_tensor_is_cast_as_dtype_of_says(tmp_path):
    path = tmp_path / "w.safetensors"
    tensors = _mixed()
    save_file(tensors, path)

    def rule(name: str, d: torch.dtype) -> torch.dtype:
        return torch.bfloat16 if d.is_floating_point and not name.startswith("a.") else d

    got = fast_read.read_safetensors([path], "cpu", rule, chunked=True, chunk=10)
    assert got["a.weight"].dtype == torch.float32 and torch.equal(got["a.weight"], tensors["a.weight"])
    assert got["c.half"].dtype == torch.bfloat16 and torch.equal(got["c.half"], tensors["c.half"].to(torch.bfloat16))
    assert got["i.fp8"].dtype == torch.bfloat16 and got["f.index"].dtype == torch.int64
    assert got["g.mask"].dtype == torch.bool and torch.equal(got["g.mask"], tensors["g.mask"])


def _header_file(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def test_bad_files_are_errors_that_name_them(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"x": torch.ones(4)}, good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match="cut.safetensors.*truncated"):
        fast_read.read_safetensors([cut], "cpu", KEEP)
    odd = tmp_path / "odd.safetensors"
    _header_file(odd, {"x": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0")
    with pytest.raises(CheckpointError, match="odd.safetensors.*dtype 'F4'.*BF16"):
        fast_read.read_safetensors([odd], "cpu", KEEP)
    short = tmp_path / "short.safetensors"
    _header_file(short, {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, bytes(8))
    with pytest.raises(CheckpointError, match="short.safetensors.*8 bytes for shape \\[4\\]"):
        fast_read.read_safetensors([short], "cpu", KEEP)
    with pytest.raises(CheckpointError, match="good.safetensors.*'x'.*earlier shard"):
        fast_read.read_safetensors([good, good], "cpu", KEEP)
    (tmp_path / "text.safetensors").write_text("not weights at all")
    with pytest.raises(CheckpointError, match="text.safetensors.*corrupt"):
        fast_read.read_safetensors([tmp_path / "text.safetensors"], "cpu", KEEP)


def test_the_switch_takes_on_or_off(monkeypatch):
    monkeypatch.setenv("ARTIFEX_FAST_READ", "off")
    assert not fast_read.enabled()
    monkeypatch.setenv("ARTIFEX_FAST_READ", "fastest")
    with pytest.raises(InvalidRequestError, match="ARTIFEX_FAST_READ.*'fastest'.*on, off"):
        fast_read.enabled()


def test_names_the_model_does_not_have_go_to_from_pretrained(checkpoint_copy):
    """A transformer file with a tensor the model lacks: not read by fast_read; from_pretrained loads it (and
    drops that tensor), to the file's other weights in their load dtypes."""
    from diffusers import WanTransformer3DModel

    spec = get_model("tiny-ti2v")
    path = checkpoint_copy("tiny-ti2v")
    file = path / "transformer" / "diffusion_pytorch_model.safetensors"
    clean = load_file(file)
    save_file(clean | {"extra.weight": torch.ones(3)}, file)
    assert read_diffusers_model(WanTransformer3DModel, path, "transformer", torch.bfloat16, "cpu") is None
    loaded = load_components(spec, path, "bf16", devices={"transformer": "cpu"}).experts[0]
    state = loaded.state_dict()
    assert "extra.weight" not in state and set(state) == set(clean)
    assert all(torch.equal(state[k], clean[k].to(state[k].dtype)) for k in clean)
