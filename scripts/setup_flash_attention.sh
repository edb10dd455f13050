#!/usr/bin/env bash
# Installs the optional attention kernels that fit this machine's GPU, from PyPI where they exist,
# and prints how to build the rest. Run inside the Artifex environment (e.g. after `make demo`).
# Then `artifex doctor` shows what is installed and verified.
set -euo pipefail
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
sm=$("$PY" -c 'import torch; print("" if not torch.cuda.is_available() else "%d%d" % torch.cuda.get_device_capability())')
if [ -z "$sm" ]; then
  echo "No CUDA GPU visible to torch: the optional kernels are CUDA-only. Nothing to install."; exit 0
fi
echo "GPU architecture: sm$sm"
if [ "$sm" = "90" ]; then
  echo "Hopper: installing FlashAttention-3 forward kernels (fa3-fwd)"
  "$PY" -m pip install "fa3-fwd==0.0.3" || echo "fa3-fwd did not install; build FA3 from source: flash-attention/hopper (python setup.py install)"
fi
if [ "$sm" -ge 80 ]; then
  echo "Ampere or newer: FlashAttention-2 and SageAttention are optional"
  "$PY" -m pip install sageattention || echo "sageattention did not install from PyPI; see its README to build it"
  echo "FlashAttention-2 compiles against your torch: pip install flash-attn --no-build-isolation (takes a while)"
else
  echo "sm$sm: FlashAttention-2/3 need sm80/sm90; PyTorch SDPA (memory-efficient) is what runs here"
fi
echo "xFormers must match the torch build: pip install xformers (check its torch requirement first)"
"$PY" -m artifex doctor
