"""The package's layering, checked by importing (in a fresh interpreter), not by reading source:
rollout/ (engines, placement, dispatch, collect) loads no megatron/ module and no Megatron-Core,
and the contracts (config.py, batch.py) load without torch."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import rpg_megatron.rollout

ROOT = Path(__file__).resolve().parents[2]


def _loaded_after(modules: list[str]) -> list[str]:
    """sys.modules of a fresh interpreter after importing `modules`."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_rollout_imports_no_megatron_module():
    rollout = [
        f"rpg_megatron.rollout.{m.name}"
        for m in pkgutil.iter_modules(rpg_megatron.rollout.__path__)
    ]
    assert {"rpg_megatron.rollout.collect", "rpg_megatron.rollout.dispatch"} <= set(rollout)
    loaded = _loaded_after(rollout)
    assert "rpg_megatron.rollout.collect" in loaded  # the check ran on what it names
    bad = [m for m in loaded if m.startswith(("rpg_megatron.megatron", "megatron"))]
    assert not bad, f"rollout/ pulls in {bad}"


def test_contracts_import_without_torch():
    loaded = _loaded_after(["rpg_megatron.config", "rpg_megatron.batch"])
    assert "rpg_megatron.batch" in loaded
    assert "torch" not in loaded
