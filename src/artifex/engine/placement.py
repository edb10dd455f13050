"""Where each model lives while a video is generated: the memory tiers, fastest to leanest.

- resident: text encoder, DiT experts (both A14B experts) and VAE on the device.
- text_offload: the text encoder comes to the device only to encode (the prompt
  embeddings are kept); the rest resident.
- expert_swap: as text_offload, and only the active A14B expert on the device,
  swapped once at the MoE switch.
- model_offload: as expert_swap, and the VAE comes to the device only to decode
  (the experts leave first).
- block_offload: expert weights stay in CPU memory; one transformer block at a time
  is on the device, the next prefetched on a side stream (diffusers group offload).
- leaf_offload: as block_offload, one layer at a time.

``fp8_weights`` stores the experts' linear weights in float8 (e4m3) and computes in the
model precision (diffusers' layerwise casting), halving their memory in any tier. The
models stay plain diffusers modules; tiers are applied from outside with ``.to`` and
diffusers' group-offload hooks, and ``release`` undoes them so a tier can be changed.

Expert swapping (expert_swap, model_offload). Each expert keeps a home copy of its weights
in CPU memory (``_Home``): every parameter and buffer once (a tied one once, rebound in
every module that holds it), taken when the tier is applied, after fp8 storage, so the home
holds what the device would. Inference never changes weights, so the home stays valid:
taking an expert off the device points its parameters (``.data``) and buffers back at the
home tensors, with no device->host copy and no new host memory; bringing one on copies the
home to fresh device tensors. With CUDA the homes are page-locked (pinned) once, in 1 GiB
chunks (PyTorch's pinned allocator rounds each allocation up to a power of two, so one
pinning per tensor would waste up to half; ``fast_read.pack``): read into them at load
(``load_devices`` names the homes ``PINNED``), else copied into them when the tier is
applied; and the copies are non_blocking on a side
stream whose event the compute stream waits on before the expert runs. The cost is host
RAM: both experts' weights stay in (pinned) host memory for the engine's life, also the
active one's (A14B: ~2 x 27 GiB in bf16, ~2 x 14 GiB with fp8_weights) where ``.to`` kept
only the inactive one; that is no more than the models took when loaded. The group-offload
tiers (block_offload, leaf_offload) take the same homes before diffusers' hooks go on:
with a stream, group offload pins a copy of each tensor on its own (rounded up to a power
of two) beside the pageable original (A14B's runs that way were killed, exit 137, on a
128 GiB host; with the homes they peak at 69 GiB of RSS: benchmarks/results/LOG.md,
memory-h200.json); given pinned tensors it keeps them as they are. The other tiers drop
the homes (parameters still in them keep them alive, and a later tier reuses pinned
tensors as they are). Without CUDA (a CPU, CI) nothing is pinned and there is no stream: the
copies are plain ``.to``, and on a CPU device an expert's home is its own weights, so a
swap moves nothing.

Prefetch: ``prefetch_expert`` starts the next expert's copy on the side stream before the
last step of the current one (``Engine.denoise``), so the copy overlaps that step, with both
experts on the device for it. It runs only where ``prefetch_room`` is set: per request, by
the engine, when the planner's denoise estimate for the tier plus one more expert fits the
budget (``memory.prefetch_fits``; the predicted peak then counts it); an OOM step-down
turns it off for the rest of the request. expert_swap is often chosen for the decode, not
the denoise: A14B at 1280x720x81 on an 80 GB H100 is predicted ~51 GiB decoding beside one
expert and ~67 GiB denoising with both, so there the copy hides behind the last high-noise
step. Where the denoise itself needs the swap (a smaller budget, model_offload), nothing is
prefetched and the win is the pinned, non_blocking copy in and the free copy out. Streaming
the next expert in layer by layer while the last step frees the current one's layers was
left out: with CFG in two passes a layer is last used only in the second pass, which hooks
would have to track, and an error mid-step would leave an expert half on the device.

On-demand text encoder and VAE (the tiers that bring them to the device only to encode or
decode) use the same homes: taken when the tier is applied, pinned with CUDA, so each use copies
the weights in from page-locked memory (non_blocking) and sending them back rebinds the
homes, with no device->host copy and no new host memory. ``.to`` both ways took 16.3 s of
the TI2V-5B request's text stage under a 24 GB budget on the H200 (umt5-xxl, 10.6 GiB,
pageable in, a fresh host copy out). A home whose module was changed since (its tensors are
no longer the home's: cast, reloaded) is taken again, never bound stale.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import torch

from artifex.models import fast_read
from artifex.models.loader import PINNED

log = logging.getLogger("artifex")

TIERS = ("resident", "text_offload", "expert_swap", "model_offload", "block_offload", "leaf_offload")
_ON_DEMAND_TEXT = set(TIERS[1:])
_ON_DEMAND_VAE = {"model_offload", "block_offload", "leaf_offload"}
_GROUP_OFFLOAD = {"block_offload": "block_level", "leaf_offload": "leaf_level"}
_SWAP = {"expert_swap", "model_offload"}  # one expert on the device at a time, swapped with activate_expert
_HOMED = _SWAP | set(_GROUP_OFFLOAD)  # tiers whose experts live in their CPU homes (``_Home``)
PIN_CHUNK = fast_read.PIN_CHUNK  # bytes of one pinned host allocation (``fast_read.pack``)
# A pinned chunk a home's tensors fill less than this much of is packed anew: the rest of it held tensors that were
# replaced after the read (q/k/v fused, a cast, a layout change), dead but still locked while any of it lives.
REPACK_BELOW = 0.9


def on_demand(tier: str) -> tuple[bool, bool]:
    """(text encoder, VAE): whether ``tier`` brings each to the device only while it runs."""
    return tier in _ON_DEMAND_TEXT, tier in _ON_DEMAND_VAE


def _audio(components):
    """S2V's audio encoder, or None (other models, and components built without one)."""
    return getattr(components, "audio_encoder", None)


def load_devices(tier: str, device: torch.device, fp8_weights: bool = False) -> dict[str, str]:
    """Where ``Engine.load`` reads each component to: its place in ``tier``, so that nothing is copied twice. On
    the device (a GPU) what the tier keeps there, never copied whole into host memory first; an on-demand text
    encoder into ``PINNED`` host memory, its CPU home as read (nothing replaces its tensors after the read, so
    the placement has nothing left to pin). The rest of what a tier keeps in host memory is read to the CPU (left
    out here) and pinned by the placement: the experts of a homed tier and an on-demand VAE have tensors replaced
    after the read (q/k/v fused, the VAE's cast and memory layout), which would leave most of pinned chunks read
    for them dead. Experts whose weights are stored in fp8 (``fp8_weights``) are cast in host memory before they
    move, so the device never holds their bf16 copy: read to the CPU too; on a CPU everything is."""
    if device.type == "cpu":
        return {}
    out = {"text_encoder": PINNED if tier in _ON_DEMAND_TEXT else str(device)}
    if tier not in _ON_DEMAND_VAE:
        out["vae"] = str(device)
    if not fp8_weights and tier not in _HOMED:
        out["transformer"] = out["transformer_2"] = str(device)
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _pinned_buffer(nbytes: int) -> torch.Tensor:
    return fast_read.pinned_buffer(nbytes)


class _Home:
    """One expert's weights in CPU memory: each parameter and buffer once, with the (module, name, is_parameter)
    places it is bound to. ``bind`` points every place at the given tensors (the homes, or copies on a device)."""

    def __init__(self, expert: torch.nn.Module, pin: bool):
        index: dict[int, int] = {}
        self.places: list[list[tuple[torch.nn.Module, str, bool]]] = []
        self.tensors: list[torch.Tensor] = []
        for module in expert.modules():
            for table, is_param in ((module._parameters, True), (module._buffers, False)):
                for name, t in table.items():
                    if t is None:
                        continue
                    k = index.setdefault(id(t), len(self.tensors))  # a tied tensor: one home, several places
                    if k == len(self.tensors):
                        self.tensors.append(t.detach())
                        self.places.append([])
                    self.places[k].append((module, name, is_param))
        if any(t.device.type != "cpu" for t in self.tensors):
            raise ValueError("an expert's home is taken in CPU memory; move it there first")
        self.pinned_bytes = self._pin() if pin else 0

    def bind(self, tensors: list[torch.Tensor]) -> None:
        for k, t in enumerate(tensors):
            self._point(k, t)

    def holds(self, module: torch.nn.Module) -> bool:
        """Whether ``module`` still points at these home tensors, every one, and has no others (nobody cast,
        reloaded or replaced its weights since the home was taken)."""
        count = 0
        for m in module.modules():
            for table in (m._parameters, m._buffers):
                count += sum(1 for t in table.values() if t is not None)
        if count != sum(len(p) for p in self.places):
            return False
        for k, places in enumerate(self.places):
            module_k, name, is_param = places[0]
            t = module_k._parameters.get(name) if is_param else module_k._buffers.get(name)
            home = self.tensors[k]
            if t is None or t.data_ptr() != home.data_ptr() or t.dtype != home.dtype or t.shape != home.shape:
                return False
        return True

    def _point(self, k: int, t: torch.Tensor) -> None:
        for module, name, is_param in self.places[k]:
            if is_param:
                module._parameters[name].data = t  # the same Parameter object: hooks and references stay valid
            else:
                module._buffers[name] = t

    def _stays(self) -> list[bool]:
        """Per tensor: already pinned, in a chunk (storage) that this home's tensors fill ``REPACK_BELOW`` of (each
        counted with its alignment padding, as ``fast_read.pack`` lays chunks out: a chunk as packed is full)."""
        pinned = [t.is_pinned() for t in self.tensors]
        chunk = [t.untyped_storage() for t in self.tensors]
        live: dict[int, int] = {}
        align = fast_read.PIN_ALIGN
        for t, c, p in zip(self.tensors, chunk, pinned, strict=True):
            if p:
                live[c.data_ptr()] = live.get(c.data_ptr(), 0) + -(-_nbytes(t) // align) * align
        return [p and live[c.data_ptr()] >= REPACK_BELOW * c.nbytes() for c, p in zip(chunk, pinned, strict=True)]

    def _pin(self) -> int:
        """Copy the homes into pinned chunks (largest first, first fit), binding each chunk's tensors as it is
        filled so the pageable originals can go; already pinned tensors stay as they are, but for those of a chunk
        left mostly dead (``REPACK_BELOW``): they are packed with the rest (``Placement.apply`` then empties the
        pinned cache, so the old chunks go back to the system). Returns pinned bytes. If pinning fails (host memory
        locked out), the rest stays pageable: still correct, copies then block."""
        todo = [k for k, keep in enumerate(self._stays()) if not keep]
        repacked = sum(self.tensors[k].is_pinned() for k in todo)
        if repacked:
            log.info("%d pinned tensors moved out of chunks left mostly dead by tensors replaced since the read",
                     repacked)
        chunks = fast_read.pack([_nbytes(self.tensors[k]) for k in todo], PIN_CHUNK)
        pinned = 0
        try:
            for used, members in chunks:
                buf = _pinned_buffer(used)
                for j, offset in members:
                    k = todo[j]
                    t = self.tensors[k]
                    view = buf[offset:offset + _nbytes(t)].view(t.dtype).view(t.shape)
                    view.copy_(t)
                    self.tensors[k] = view
                    self._point(k, view)
                pinned += used
        except RuntimeError as e:
            log.warning("pinning expert weights failed after %.1f GiB (%s); the rest stays pageable, its copies to "
                        "the device block", pinned / 2**30, str(e).splitlines()[0])
        return pinned


def group_offload(expert: torch.nn.Module, tier: str, device: torch.device) -> None:
    """diffusers' group-offload hooks on ``expert`` (in CPU memory) as ``tier`` (block_offload: one block per
    group; leaf_offload: one layer), with a prefetching side stream on CUDA."""
    stream = device.type == "cuda"
    expert.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                offload_type=_GROUP_OFFLOAD[tier],
                                num_blocks_per_group=1 if tier == "block_offload" else None,
                                use_stream=stream, non_blocking=stream, record_stream=stream)


class Placement:
    """Applies one tier to a set of components and moves models as the stages need them."""

    def __init__(self, components, tier: str, device: torch.device, fp8_weights: bool = False,
                 compute_dtype: torch.dtype = torch.bfloat16):
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}; tiers: {', '.join(TIERS)}")
        self.c, self.tier, self.device = components, tier, device
        self.fp8_weights, self.compute_dtype = fp8_weights, compute_dtype
        self._fp8_applied = False
        self.active_expert: int | None = None
        # The VAE keeps per-call state on its modules (diffusers' causal-conv feature caches): one caller at a time,
        # should two threads share it (artifex.multidevice.experts: an I2V image encode beside a decode).
        self._vae_lock = threading.RLock()
        # Expert swapping (the module docstring): each expert's CPU home in a swap tier, the side stream of the
        # copies to a CUDA device, the prefetched copies (expert -> (device tensors, event to wait on)), and
        # whether a prefetch may hold a second expert on the device (set per request by the engine).
        self._homes: list[_Home] | None = None
        self._stream = None
        self._prefetched: dict[int, tuple[list[torch.Tensor], object]] = {}
        self.prefetch_room = False
        # The on-demand text encoder's and VAE's CPU homes (the module docstring), by module.
        self._module_homes: dict[int, _Home] = {}

    def apply(self) -> None:
        self._apply()
        if self.device.type == "cuda":  # pinned blocks nobody holds any more (chunks whose tensors were all replaced
            # or packed anew, the read's staging buffers) go back to the system instead of staying locked in the cache
            fast_read.empty_pinned_cache()

    def _apply(self) -> None:
        c, tier, dev = self.c, self.tier, self.device
        if self.fp8_weights and not self._fp8_applied:
            for expert in c.experts:
                expert.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=self.compute_dtype)
            self._fp8_applied = True
        # The on-demand ones get their (pinned) homes now, so loading pays for pinning, not the first request; the
        # others drop theirs (the pinned memory goes once they are on the device).
        for module, on in ((c.text_encoder, tier in _ON_DEMAND_TEXT), (c.vae, tier in _ON_DEMAND_VAE),
                           (_audio(c), tier in _ON_DEMAND_TEXT)):
            if module is None:
                continue
            if on:
                self._module_home(module)
            else:
                self._module_homes.pop(id(module), None)
                module.to(dev)
        if tier not in _HOMED:
            self._homes = None  # tensors still bound to them keep them alive; the rest of the memory goes
        if tier in _GROUP_OFFLOAD:
            self._take_homes()  # pinned in chunks: group offload then reuses them instead of pinning copies
            for expert in c.experts:
                group_offload(expert, tier, dev)
            return
        if tier in ("resident", "text_offload"):  # text_offload: as the planner counts it, both experts resident
            for expert in c.experts:
                expert.to(dev)
        else:  # one expert at a time; activate_expert brings the first in
            self._take_homes()
            if dev.type == "cuda" and self._stream is None:
                self._stream = torch.cuda.Stream(dev)
            self.active_expert = None

    def _take_homes(self) -> None:
        """Every expert bound to its CPU home, made (and pinned, with CUDA) the first time."""
        for expert in self.c.experts:
            expert.to("cpu")  # nothing moves where they are bound to their homes already
        if self._homes is not None:
            for home in self._homes:
                home.bind(home.tensors)
            return
        self._homes = [_Home(expert, self.device.type == "cuda") for expert in self.c.experts]
        pinned = sum(h.pinned_bytes for h in self._homes)
        if pinned:
            log.info("%s: %.1f GiB of expert weights pinned in host memory, kept for the engine's life", self.tier,
                     pinned / 2**30)

    def release(self) -> None:
        """Undo the tier: hooks removed, every model back in CPU memory (experts of a homed tier in their homes,
        which stay for the next such tier: the module docstring)."""
        from diffusers.hooks import HookRegistry

        self._drop_prefetched()
        self.prefetch_room = False
        for home in self._homes or ():
            home.bind(home.tensors)
        for expert in self.c.experts:
            registry = HookRegistry.check_if_exists_or_initialize(expert)
            for name in ("group_offloading", "lazy_prefetch_group_offloading", "layer_execution_tracker"):
                registry.remove_hook(name, recurse=True)
            expert.to("cpu")
        self.c.text_encoder.to("cpu")
        self.c.vae.to("cpu")
        if _audio(self.c) is not None:
            _audio(self.c).to("cpu")
        self.active_expert = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def move_to(self, tier: str) -> None:
        """Change tier in place: undo the current one, apply ``tier`` (fp8 storage stays as it is)."""
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}; tiers: {', '.join(TIERS)}")
        self.release()
        self.tier = tier
        self.apply()

    def activate_expert(self, index: int) -> None:
        """Expert ``index`` on the device for the next step; in a swap tier the other one leaves first (back to its
        home: nothing is copied), unless it was prefetched beside it."""
        if self.tier not in _SWAP or index == self.active_expert:
            self.active_expert = index
            return
        for i, home in enumerate(self._homes):
            if i != index:
                self._drop_prefetched(i)
                home.bind(home.tensors)
        self.active_expert = None  # until the copy is in (an OOM there leaves no expert marked as on the device)
        tensors, ready = self._prefetched.pop(index, None) or self._copies(index)
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
        self._homes[index].bind(tensors)
        self.active_expert = index

    def prefetch_expert(self, index: int) -> bool:
        """Start copying expert ``index`` to the device (on the side stream with CUDA) beside the active one, for
        ``activate_expert`` to take; only in a swap tier with ``prefetch_room``. Returns whether a copy started."""
        if self.tier not in _SWAP or not self.prefetch_room or index == self.active_expert or index in self._prefetched:
            return False
        try:
            self._prefetched[index] = self._copies(index)
        except torch.OutOfMemoryError:
            log.warning("no room to prefetch expert %d; it is copied at the switch", index)
            self.prefetch_room = False
            return False
        return True

    def set_prefetch_room(self, room: bool) -> None:
        """Whether a prefetch may hold a second expert on the device (the planner's call for this request);
        copies prefetched for an earlier request are dropped."""
        self._drop_prefetched()
        self.prefetch_room = room

    def park_experts(self) -> None:
        """Before the VAE decode in the offload tiers: the experts leave the device."""
        if self.tier == "model_offload":
            self._drop_prefetched()
            for home in self._homes:
                home.bind(home.tensors)
            self.active_expert = None

    def _copies(self, index: int) -> tuple[list[torch.Tensor], object]:
        """Expert ``index``'s homes copied to the device: (tensors, the event the copies end with, or None)."""
        homes = self._homes[index].tensors
        if self._stream is None:
            return [self._to_device(t) for t in homes], None
        current = torch.cuda.current_stream(self.device)
        # Allocated on the compute stream, which frees them too; the side stream waits for the work already queued
        # there, which may still read memory these blocks are reused from (an expert just sent home).
        out = [torch.empty_like(t, device=self.device) for t in homes]
        self._stream.wait_stream(current)
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            for dst, src in zip(out, homes, strict=True):
                dst.copy_(src, non_blocking=True)
        return out, self._stream.record_event()

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A home tensor on the device without a CUDA stream (on a CPU device: the home itself)."""
        return t.to(self.device)

    def _copy_in(self, t: torch.Tensor) -> torch.Tensor:
        """An on-demand module's home tensor on the device, on the compute stream (non_blocking from a pinned home:
        the work that reads it is queued after the copy; on a CPU device: the home itself)."""
        return t.to(self.device, non_blocking=t.is_pinned())

    def _drop_prefetched(self, index: int | None = None) -> None:
        """Forget prefetched copies; the compute stream first waits for their copy, so their memory is not reused
        while the side stream still writes it."""
        for i in [index] if index is not None else list(self._prefetched):
            _, ready = self._prefetched.pop(i, (None, None))
            if ready is not None:
                torch.cuda.current_stream(self.device).wait_event(ready)

    @contextlib.contextmanager
    def text_encoder(self):
        yield from self._while_used(self.c.text_encoder, self.tier in _ON_DEMAND_TEXT)

    @contextlib.contextmanager
    def audio_encoder(self):
        """S2V's wav2vec2, on the device while it runs: placed like the text encoder (on demand in the same
        tiers)."""
        yield from self._while_used(self.c.audio_encoder, self.tier in _ON_DEMAND_TEXT)

    @contextlib.contextmanager
    def vae(self):
        with self._vae_lock:
            yield from self._while_used(self.c.vae, self.tier in _ON_DEMAND_VAE)

    def _while_used(self, module: torch.nn.Module, on_demand: bool):
        if not on_demand:
            yield module
            return
        home = self._module_home(module)
        home.bind([self._copy_in(t) for t in home.tensors])
        try:
            yield module
        finally:
            home.bind(home.tensors)  # back to the home: nothing copied, the device copies are freed

    def _module_home(self, module: torch.nn.Module) -> _Home:
        """The CPU home of an on-demand module, taken (pinned with CUDA) when the tier is applied, or again when
        the module no longer points at it."""
        home = self._module_homes.get(id(module))
        if home is None or not home.holds(module):
            module.to("cpu")
            home = self._module_homes[id(module)] = _Home(module, self.device.type == "cuda")
            if home.pinned_bytes:
                log.info("%s: %s's %.1f GiB pinned in host memory: copied in for each use, never copied back",
                         self.tier, type(module).__name__, home.pinned_bytes / 2**30)
        return home
