from artifex.cli import entry

entry()
