#!/usr/bin/env bash
# The SGLang venv the `sglang` test tier and `make demo-sglang` run servers from.
#
# sglang 0.5.23 pins torch==2.14.1, so it cannot share the project's venv (torch 2.13.0+cpu, or
# a cluster's torch + Transformer Engine): only the servers run here; the trainer stays in the
# project venv and talks to them over HTTP, shared memory and gloo/NCCL. The venv is ~11 GB, so
# it lives ONCE per machine in a cache directory outside every checkout, named after its pinned
# versions, and every clone and CI run reuses it (CI clones afresh each time; an 11 GB venv per
# clone would fill the disk).
#
#   tools/sglang_venv.sh            build it unless complete; install the CPU stand-in; print path
#   tools/sglang_venv.sh --path     print the path only (no lock, no build)
#   tools/sglang_venv.sh --dry-run  say what a build would do, build nothing
#
# Complete means: $VENV/.rpg-complete holds exactly the pin line below (written last, after every
# pip install succeeded). Anything else there (a half-built venv from a killed build, other pins)
# is removed and rebuilt. A lock file next to it serialises concurrent builds (flock).
# SGLANG_VENV overrides the path; PY the interpreter (python3.11); SGLANG_VENV_MIN_FREE_GB the
# free space a build insists on (14).
set -euo pipefail

PINS="torch==2.14.1 sglang==0.5.23 sglang-router==0.3.2"
PY=${PY:-python3.11}
KEY="py3.11-torch2.14.1-sglang0.5.23-router0.3.2"
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/rpg_megatron
VENV=${SGLANG_VENV:-$CACHE/sglang-$KEY}
STAMP=$VENV/.rpg-complete
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

complete() { [[ -f $STAMP && $(cat "$STAMP") == "$PINS" ]]; }

case ${1:-} in
  --path) echo "$VENV"; exit 0 ;;
  --dry-run)
    if complete; then echo "complete: $VENV ($PINS); would only refresh the CPU stand-in"
    else
      echo "would build $VENV: $PY -m venv; pip install torch==2.14.1; sglang==0.5.23;" \
        "sglang-router==0.3.2; then write $STAMP"
      [[ -e $VENV ]] && echo "(and first remove the incomplete $VENV)"
    fi
    exit 0 ;;
  "") ;;
  *) echo "usage: $0 [--path|--dry-run]" >&2; exit 2 ;;
esac

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9  # one builder at a time; the others wait here and then find it complete

if ! complete; then
  free_kb=$(df -Pk "$(dirname "$VENV")" | awk 'NR==2 {print $4}')
  if (( free_kb < ${SGLANG_VENV_MIN_FREE_GB:-14} * 1024 * 1024 )); then
    echo "tools/sglang_venv.sh: $(dirname "$VENV") has $((free_kb / 1024)) MiB free; the SGLang" \
      "venv needs ~11 GiB (+ pip's cache). Free space there or set SGLANG_VENV=<dir elsewhere>" >&2
    exit 1
  fi
  echo "building the SGLang venv in $VENV ($PINS; ~11 GB, 5-10 min cold)" >&2
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet -U pip
  # torch first and pinned: sglang's own requirement resolves to this build instead of a new one.
  "$VENV/bin/python" -m pip install --quiet torch==2.14.1
  "$VENV/bin/python" -m pip install --quiet sglang==0.5.23
  "$VENV/bin/python" -m pip install --quiet sglang-router==0.3.2
  echo "$PINS" > "$STAMP.tmp" && mv "$STAMP.tmp" "$STAMP"
fi

# The CPU stand-in for sgl-kernel (acts only with SGLANG_USE_CPU_ENGINE=1; see its docstring),
# refreshed on every call so a clone's copy wins; written under temporary names, then renamed.
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for f in _rpg_sgl_kernel_cpu.py _rpg_sgl_kernel_cpu.pth; do
  if ! cmp -s "$HERE/sglang_cpu/$f" "$SITE/$f"; then
    cp "$HERE/sglang_cpu/$f" "$SITE/.$f.tmp.$$" && mv "$SITE/.$f.tmp.$$" "$SITE/$f"
  fi
done
echo "$VENV"
