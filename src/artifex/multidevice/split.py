"""The setup guide's two-device memory mode, in one process: a model too big for one GPU over two.

Device 0 holds the text encoder, each expert's embeddings and first half of its blocks;
device 1 the second half of the blocks, the output head and the VAE. Applied from outside
with hooks: a pre-hook on each second-half block moves its inputs to device 1 (the text,
timestep and rotary tensors once per forward, memoised), a forward hook on the expert
brings the prediction back to device 0 where the latents and the scheduler live; the VAE
gets its input on device 1 (``post_quant_conv`` for decode, ``encoder`` for encode) and
hands encoded latents back on device 0 (``quant_conv``). Nothing crosses devices inside a
block. On a CPU both devices are the CPU: the hooks run, nothing moves.
"""

from __future__ import annotations

import torch

from artifex.engine.pipeline import Engine
from artifex.errors import InvalidRequestError


def move_tensors(value, device: torch.device, memo: dict | None = None):
    """``value`` on ``device``: a tensor, or the tensors inside a list/tuple (anything else as it is). ``memo``
    moves each source tensor once (keyed by identity)."""
    if isinstance(value, torch.Tensor):
        if value.device == device:
            return value
        if memo is None:
            return value.to(device)
        key = id(value)
        if key not in memo:
            memo[key] = (value, value.to(device))  # keep the source alive so its id stays unique
        return memo[key][1]
    if isinstance(value, tuple | list):
        return type(value)(move_tensors(v, device, memo) for v in value)
    return value


class TwoDeviceSplit:
    def __init__(self, engine: Engine, first: str | torch.device, second: str | torch.device):
        self.engine = engine
        self.first, self.second = torch.device(first), torch.device(second)
        if engine.plan.placement != "resident":
            raise InvalidRequestError("offload_to_cpu/experts", f"the two-device split places every model itself; "
                                      f"placement {engine.plan.placement!r} moves them too", ["resident"])
        if self.first != engine.device:
            raise InvalidRequestError("device", f"device 0 of the split must be the engine's device {engine.device}, "
                                      f"got {self.first}", [str(engine.device)])
        self.handles: list = []
        self.moves = 0  # hook calls that carried tensors across (counted even when both devices are the same)
        self._memo: dict = {}
        c = engine.c
        c.text_encoder.to(self.first)
        for model in c.experts:
            half = len(model.blocks) // 2
            model.to(self.first)
            for block in model.blocks[half:]:
                block.to(self.second)
                self.handles.append(block.register_forward_pre_hook(self._to_second))
            model.norm_out.to(self.second)
            model.proj_out.to(self.second)
            self.handles += [model.register_forward_pre_hook(self._new_forward),
                             model.register_forward_hook(self._back_to_first)]
        c.vae.to(self.second)
        self.handles += [c.vae.post_quant_conv.register_forward_pre_hook(self._to_second),
                         c.vae.encoder.register_forward_pre_hook(self._to_second),
                         c.vae.quant_conv.register_forward_hook(self._back_to_first)]

    def _new_forward(self, module, args):
        self._memo.clear()  # the text/timestep/rotary tensors of a new forward

    def _to_second(self, module, args):
        self.moves += 1
        return move_tensors(args, self.second, self._memo)

    def _back_to_first(self, module, args, output):
        self.moves += 1
        return move_tensors(output, self.first)

    def remove(self) -> None:
        """Hooks off, everything back on the engine's device."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._memo.clear()
        for m in (self.engine.c.text_encoder, self.engine.c.vae, *self.engine.c.experts):
            m.to(self.engine.device)


def split_across_devices(engine: Engine, devices: tuple[str, str] | None = None) -> TwoDeviceSplit:
    """Spread ``engine`` over two devices (default cuda:0 and cuda:1; on a CPU-only machine cpu and cpu)."""
    if devices is None:
        if engine.device.type == "cuda":
            if torch.cuda.device_count() < 2:
                raise InvalidRequestError("devices", f"the two-device split needs 2 GPUs, this machine has "
                                          f"{torch.cuda.device_count()}", ["cuda:0,cuda:1"])
            devices = (str(engine.device), "cuda:1" if engine.device.index in (0, None) else "cuda:0")
        else:
            devices = ("cpu", "cpu")
    return TwoDeviceSplit(engine, *devices)
