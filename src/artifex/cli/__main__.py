import sys

from artifex.cli import main

sys.exit(main())
