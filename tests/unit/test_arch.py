"""`rpg_megatron.megatron.arch` stays torch-free: reading a checkpoint's architecture, and
`rpg-megatron plan` on top of it, must not pay for importing torch or megatron-core (seconds).

The `read_hf_config` and `padded_vocab_size` cases live in test_model.py beside the Megatron
models they are checked against.
"""

from __future__ import annotations

import json
import subprocess
import sys


def test_arch_and_plan_import_neither_torch_nor_megatron() -> None:
    # A fresh interpreter: this pytest process has imported torch long ago.
    code = (
        "import json, sys\n"
        "import rpg_megatron.megatron.arch, rpg_megatron.plan\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron'))\n"
        "print(json.dumps(heavy))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(run.stdout) == []
