#!/usr/bin/env bash
# The GPU checks the issues name, for a session that is lent a GPU (device tool).
#
#   here, once:   bash ../shared/gpu/prepare.sh          # megatron-core + TE for the box
#   device 1-5:   carry [".gpuN"], command: mkdir -p /root/parts && cp .gpuN/part.* /root/parts/
#   device 6:     carry [".gpu6"], command: bash .gpu6/install.sh && bash bench/gpu.sh tests
#   device 7:     command: bash bench/gpu.sh bench       # while the box is still warm (~30 s)
#
# `tests` runs every test marked gpu that one GPU can run (the CP=2 one skips: two GPUs);
# `bench` runs bench/train_step.py at 4B/8K (bf16 with every lever, FP8 delayed) and
# 1.7B/8K with --record. Each check has its own time limit and a failing one does not stop
# the rest. Logs, nvidia-smi and the updated docs/benchmarks.md land in $OUT (the device
# tool brings them back): copy benchmarks.md over ours and commit it.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
failed=()

check() { # NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date +%T), limit ${limit}s): $*"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 30 "$out/$name.log"
  echo "=== $name: exit $rc"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

if ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "bench/gpu.sh: no CUDA GPU here; it is for a lent GPU box (see the top of this file)" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/nvidia-smi.csv" 2>&1
for stage in "${@:-tests bench}"; do
  for s in $stage; do
    case $s in
      tests)
        check pytest-gpu 240 python3 -m pytest -q -m gpu -p no:cacheprovider -rs \
          tests/unit/test_engine_contract.py tests/dist/test_packing.py tests/dist/test_step.py
        ;;
      bench)
        check train-step-4b-bf16 200 python3 bench/train_step.py --preset qwen3-4b-8k --levers --record
        check train-step-4b-fp8 120 python3 bench/train_step.py --preset qwen3-4b-8k --fp8 delayed --record
        check train-step-1.7b-bf16 90 python3 bench/train_step.py --preset qwen3-1.7b-8k --record
        cp docs/benchmarks.md "$out/benchmarks.md"
        ;;
      *)
        echo "bench/gpu.sh: unknown stage '$s' (stages: tests, bench)" >&2
        exit 2
        ;;
    esac
  done
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
echo "all GPU checks passed"
