"""Probe: what the attention choice costs a process: with no selection cache (the first run on a machine) and with
the cache another process wrote. TI2V-5B 720p's self-attention shape, bf16, ``auto``."""

import json
import sys
import time

import torch

from artifex.attention import runtime_from_config
from artifex.config import OptimizationConfig
from artifex.env import read_env

dev = torch.device("cuda")
torch.ones(1, device=dev)  # CUDA context outside the timing
t = time.perf_counter()
rt = runtime_from_config(OptimizationConfig(), read_env().home)
choice = rt.prepare((1, 27280, 24, 128), torch.bfloat16, dev)
torch.cuda.synchronize()
print(json.dumps({"label": sys.argv[1], "prepare_s": round(time.perf_counter() - t, 3), "chosen": choice.chosen,
                  "cache_file": choice.cache_file, "timings_ms": choice.timings_ms,
                  "rejected": {k: v[:80] for k, v in choice.rejected.items()}}))
