"""bench/packing.py in reduced form: both layouts run, give the same loss (the bench exits 1
otherwise), and the table and the `speedup=` line are printed."""

from __future__ import annotations

import re

import pytest

from bench import packing

pytestmark = pytest.mark.slow


def test_packing_bench_reduced(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--n", "6", "--max-len", "96", "--mean-response", "12", "--steps", "1"]
    assert packing.main([*argv, "--max-tokens", "128", "--micro-batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\| padded \| 3 \| 576 \|", out, re.M)  # 6 rows x 96 positions
    real = int(re.search(r"([\d,]+) real tokens", out).group(1).replace(",", ""))
    assert re.search(rf"^\| packed \| \d+ \| {real:,} \|", out, re.M)
    assert real < 576
    assert re.search(r"^speedup=\d+\.\d{3}$", out.splitlines()[-1])
