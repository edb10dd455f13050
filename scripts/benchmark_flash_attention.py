#!/usr/bin/env python3
"""The setup guide's benchmark_flash_attention.py: now `artifex bench attention` (all backends, Wan shapes)."""

import sys

from artifex.cli import main

sys.exit(main(["bench", "attention", *sys.argv[1:]]))
