#!/usr/bin/env python3
"""The setup guide's test_flash_attention.py: now `artifex doctor` (GPU, versions, verified attention backends)."""

import sys

from artifex.cli import main

sys.exit(main(["doctor", *sys.argv[1:]]))
