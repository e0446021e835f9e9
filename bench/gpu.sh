#!/usr/bin/env bash
# Every GPU check on a lent GPU box: see bench/gpu.py's header for the device-tool calls
# (one call of ~10 minutes after `python3 bench/gpu_pack.py` here). Arguments go to gpu.py.
exec python3 "$(dirname "$0")/gpu.py" "$@"
