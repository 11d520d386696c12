"""Helper process for merge_speed.py: merge a YAML config into memory (no output file) and exit."""

import sys

from lightning_mergeguard.merging import merge

state = merge(sys.argv[1])
assert state
