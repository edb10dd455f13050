#!/usr/bin/env python3
"""The setup guide's benchmark command, as a thin wrapper over ``artifex bench pipeline``.

    python scripts/benchmark_wan22.py --model ti2v-5B --flash-attention [artifex bench pipeline flags...]

--model takes the guide's spellings (ti2v-5B, t2v-A14B, i2v-A14B) or Artifex's names.
--flash-attention is accepted for the guide's sake: Artifex's attention backend is chosen per
shape among the verified kernels, FlashAttention-3 first when it is installed and fastest;
`artifex doctor` shows which ones are. Everything else goes to `artifex bench pipeline`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from artifex.cli import main  # noqa: E402


def translate(argv: list[str]) -> list[str]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", default="ti2v-5b")
    parser.add_argument("--flash-attention", action="store_true")
    known, rest = parser.parse_known_args(argv)
    if known.flash_attention:
        print("note: --flash-attention: Artifex uses FlashAttention-3 wherever it is installed and verified fastest "
              "(see `artifex doctor`)", file=sys.stderr)
    return ["bench", "pipeline", "--model", known.model.lower(), *rest]


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        raise SystemExit(main(["bench", "pipeline", "--help"]))
    raise SystemExit(main(translate(sys.argv[1:])))
