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


@pytest.fixture
def fake_pinning(monkeypatch):
    """A CUDA machine's pinned allocator, played by ordinary host memory (this machine has no CUDA): the chunks
    handed out, in order."""
    chunks: list[torch.Tensor] = []

    def pinned_buffer(nbytes: int) -> torch.Tensor:
        chunks.append(torch.full((nbytes,), 0xAB, dtype=torch.uint8))  # not zeros: every byte must be read over
        return chunks[-1]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fast_read, "pinned_buffer", pinned_buffer)
    return chunks


def test_pinned_reads_pack_each_files_tensors_into_chunks(tmp_path, fake_pinning, monkeypatch):
    """pin=True: every tensor is a view into a few chunks (at most PIN_CHUNK bytes each, but for a tensor larger
    than one), its bytes read in pieces over the threads, values and dtypes those of safetensors' reader."""
    monkeypatch.setattr(fast_read, "PIN_CHUNK", 4096)
    monkeypatch.setattr(fast_read, "PIECE", 96)  # the 4800-byte tensor below is read in 50 pieces
    path = tmp_path / "w.safetensors"
    tensors = _mixed() | {"z.large": torch.randn(1200)}
    save_file(tensors, path)
    got = fast_read.read_safetensors([path], "cpu", KEEP, threads=3, pin=True)
    assert _same(got, load_file(path))
    storages = {c.untyped_storage().data_ptr() for c in fake_pinning}
    assert all(t.untyped_storage().data_ptr() in storages for t in got.values())
    sizes = sorted(c.numel() for c in fake_pinning)
    assert sizes[-1] == 5120 and sizes[:-1] and all(n <= 4096 for n in sizes[:-1])  # z.large alone, aligned to 512
    # a cast tensor is a new one (pinned later, by the placement); the rest stay in their chunks
    fake_pinning.clear()
    cast = fast_read.read_safetensors([path], "cpu", lambda n, d: torch.bfloat16 if n == "a.weight" else d, pin=True)
    assert cast["a.weight"].dtype == torch.bfloat16 and torch.equal(cast["a.weight"],
                                                                     tensors["a.weight"].to(torch.bfloat16))
    storages = {c.untyped_storage().data_ptr() for c in fake_pinning}
    assert cast["a.weight"].untyped_storage().data_ptr() not in storages
    assert all(cast[k].untyped_storage().data_ptr() in storages for k in cast if k != "a.weight")


def test_pinned_reads_pack_all_shards_together(tmp_path, fake_pinning, monkeypatch):
    """The shards of one component share chunks: two small files fill one chunk, not one each (each chunk is
    rounded up to a power of two by the pinned allocator: a chunk per shard's tail wastes up to half of it)."""
    monkeypatch.setattr(fast_read, "PIN_CHUNK", 8192)
    tensors = _mixed()
    names = sorted(tensors)
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    save_file({k: tensors[k] for k in names[:4]}, files[0])
    save_file({k: tensors[k] for k in names[4:]}, files[1])
    got = fast_read.read_safetensors(files, "cpu", KEEP, pin=True)
    assert _same(got, {**load_file(files[0]), **load_file(files[1])})
    assert len(fake_pinning) == 1
    assert all(t.untyped_storage().data_ptr() == fake_pinning[0].untyped_storage().data_ptr() for t in got.values())


def test_pinning_that_fails_reads_to_ordinary_memory(tmp_path, monkeypatch, caplog):
    def refuse(nbytes):
        raise RuntimeError("CUDA error: out of memory (host memory locked out)")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fast_read, "pinned_buffer", refuse)
    path = tmp_path / "w.safetensors"
    save_file(_mixed(), path)
    assert _same(fast_read.read_safetensors([path], "cpu", KEEP, pin=True), load_file(path))
    assert "pinned host memory for the weights failed" in caplog.text and "locked out" in caplog.text


def test_pack_lays_out_largest_first_first_fit():
    sizes = [100, 600, 0, 513, 2000, 300]
    layout = fast_read.pack(sizes, chunk=1024)
    # 2000 alone (rounded up to 2048); each of the others takes 512 or 1024 bytes of a chunk of at most 1024
    placed = {k: (c, offset) for c, (_, members) in enumerate(layout) for k, offset in members}
    assert sorted(placed) == [0, 1, 2, 3, 4, 5]
    assert all(offset % fast_read.PIN_ALIGN == 0 for _, offset in placed.values())
    used = [u for u, _ in layout]
    assert used[0] == 2048 and all(u <= 1024 for u in used[1:])
    for u, members in layout:  # no two tensors of a chunk overlap, and each chunk is as long as what it holds
        spans = sorted((o, o + -(-sizes[k] // 512) * 512) for k, o in members)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) and (not spans or spans[-1][1] == u)


@pytest.fixture
def allocator(monkeypatch):
    """A CUDA machine's allocator settings and pinned allocations, recorded (this machine has no CUDA): the
    settings strings set, and the pinned allocations asked for, each with the registering state then in force."""
    seen = {"settings": [], "pinned": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fast_read, "_REGISTER", {"state": None})
    monkeypatch.setattr(fast_read, "_set_allocator", seen["settings"].append)
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "ARTIFEX_PIN_REGISTER"):
        monkeypatch.delenv(name, raising=False)
    real_empty = torch.empty

    def empty(*shape, pin_memory=False, **kw):
        if pin_memory:
            registering = any("pinned_use_cuda_host_register:True" in s for s in seen["settings"][-1:])
            seen["pinned"].append(registering)
            if registering and seen.get("refuse_registering"):
                raise RuntimeError("CUDA error: invalid argument (cudaHostRegister)")
        return real_empty(*shape, **kw)

    monkeypatch.setattr(torch, "empty", empty)
    return seen


def test_pinned_memory_is_registered_pages_once_decided(allocator):
    """The first pinned buffer turns on torch's cudaHostRegister pinning with fast_read's fault-in threads, once
    per process; the buffers are then allocated that way."""
    a, b = fast_read.pinned_buffer(100), fast_read.pinned_buffer(300)
    assert a.numel() == 100 and b.numel() == 300
    assert allocator["settings"] == [f"pinned_use_cuda_host_register:True,"
                                     f"pinned_num_register_threads:{fast_read.REGISTER_THREADS}"]
    assert allocator["pinned"] == [True, True]


@pytest.mark.parametrize("env", [("ARTIFEX_PIN_REGISTER", "off"),
                                 ("PYTORCH_CUDA_ALLOC_CONF", "pinned_use_cuda_host_register:False"),
                                 ("PYTORCH_ALLOC_CONF", "expandable_segments:True,pinned_use_cuda_host_register:True")])
def test_pinning_is_left_to_torch_when_told(allocator, monkeypatch, env):
    """ARTIFEX_PIN_REGISTER=off, or the allocator's own variable naming the setting: Artifex sets nothing."""
    monkeypatch.setenv(*env)
    assert not fast_read.pin_by_registering()
    fast_read.pinned_buffer(64)
    assert allocator["settings"] == [] and allocator["pinned"] == [False]


def test_registering_that_fails_falls_back_to_cuda_host_alloc(allocator, caplog):
    """A registration refused (a locked-memory limit): that buffer and every later one come from cudaHostAlloc."""
    allocator["refuse_registering"] = True
    assert fast_read.pinned_buffer(64).numel() == 64
    assert fast_read.pinned_buffer(32).numel() == 32
    assert allocator["settings"][-1] == "pinned_use_cuda_host_register:False"
    assert allocator["pinned"] == [True, False, False]
    assert "pinning by cudaHostRegister failed" in caplog.text and not fast_read.pin_by_registering()


def test_pinned_registering_without_cuda_stays_off(monkeypatch):
    monkeypatch.setattr(fast_read, "_REGISTER", {"state": None})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(fast_read, "_set_allocator", lambda s: pytest.fail(f"set {s} without CUDA"))
    assert not fast_read.pin_by_registering()


def test_allocator_settings_keep_the_environments_own(monkeypatch):
    """torch resets every allocator key a settings call does not name: Artifex's call repeats the user's first."""
    seen = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", seen.append, raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512,")
    fast_read._set_allocator("pinned_use_cuda_host_register:True")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # the newer name wins, as in torch
    fast_read._set_allocator("pinned_use_cuda_host_register:False")
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    fast_read._set_allocator("pinned_num_register_threads:8")
    assert seen == ["max_split_size_mb:512,pinned_use_cuda_host_register:True",
                    "expandable_segments:True,pinned_use_cuda_host_register:False", "pinned_num_register_threads:8"]


def _mapping(ptr: int) -> set[str] | None:
    """The VmFlags of the mapping of this process that holds ``ptr`` (/proc/self/smaps), or None where none does.
    A huge-page buffer's mapping carries ``hg`` (madvised for huge pages), which no mapping made in its place
    later has: so a freed buffer's address is told apart from a new mapping that reuses it."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:  # a mapping's header: lo-hi perms offset dev inode [path]
                lo, hi = (int(v, 16) for v in head[0].split("-"))
                inside = lo <= ptr < hi
            elif inside and head[0] == "VmFlags:":
                return set(head[1:])
    return None


def _gone(ptr: int, flags: set[str]) -> bool:
    """Whether the mapping that had ``flags`` at ``ptr`` is gone (a later one there, without ``hg``, may be)."""
    now = _mapping(ptr)
    return now is None or ("hg" in flags and "hg" not in now)


def test_huge_page_buffer_is_unregistered_while_still_mapped_once_no_tensor_views_it():
    import gc

    calls = []
    mib = 2**20
    buf = fast_read.huge_page_buffer(3 * mib + 5, lambda ptr, size: calls.append(("register", ptr, size)),
                                     lambda ptr: calls.append(("unregister", ptr, _mapping(ptr))))
    ptr = buf.data_ptr()
    flags = _mapping(ptr)
    assert flags is not None
    assert (buf.numel(), buf.dtype) == (3 * mib + 5, torch.uint8)
    assert calls == [("register", ptr, 4 * mib)]  # whole 2 MiB pages
    buf.fill_(3)
    part = buf[2 * mib:2 * mib + 64].view(torch.int16)  # a view of it keeps the memory
    del buf
    gc.collect()
    assert len(calls) == 1 and _mapping(ptr) == flags
    assert part.tolist() == [3 * 256 + 3] * 32
    del part
    gc.collect()
    assert calls[1] == ("unregister", ptr, flags)  # unlocked while the mapping was still there
    assert _gone(ptr, flags)


def test_huge_page_buffer_whose_registration_fails_raises_and_unmaps_it():
    seen = []

    def refuse(ptr, size):
        seen.append((ptr, _mapping(ptr)))
        raise RuntimeError("cudaHostRegister of 2097152 bytes failed: out of memory")

    with pytest.raises(RuntimeError, match="cudaHostRegister"):
        fast_read.huge_page_buffer(100, refuse, lambda ptr: pytest.fail("nothing registered to undo"))
    (ptr, flags), = seen
    assert flags is not None and _gone(ptr, flags)
