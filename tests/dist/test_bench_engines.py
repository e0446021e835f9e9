"""bench/e2e.py --compare engines in reduced form (3 rounds, 4 prompts x 8 samples): both
placements generated the same token ids (the bench refuses to report otherwise), the table has
a row for each, and the last line is the median of the per-round ratios it prints."""

from __future__ import annotations

import re
import statistics

import pytest

from bench import e2e

pytestmark = pytest.mark.slow


def test_reduced_engines_bench(tmp_path, capsys):
    argv = ["--compare", "engines", "--steps", "3", "--prompts", "4", "--work-dir", str(tmp_path)]
    assert e2e.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    rows = {line.split("|")[1].strip(): line.split("|") for line in out if line.startswith("| ")}
    alone, spread = rows["rank 0 alone (placement=rank0)"], rows["one per rank"]
    assert alone[2].strip() == spread[2].strip() == "3"
    assert alone[3].strip() == spread[3].strip() == "32 x 16"
    assert any("same completions in both (token ids of every step): yes" in x for x in out)
    match = re.fullmatch(r"engines_speedup=(\d+\.\d{3})", out[-1])
    assert match, out[-1]
    (per_round,) = [x for x in out if x.startswith("generate s per step, rank 0 alone")]
    ratios = [float(r) for r in per_round.split(": ")[1].split()]
    assert len(ratios) == 2  # 3 rounds, the first left out
    want = statistics.median(ratios)  # as printed, 2 decimals
    assert float(match.group(1)) == pytest.approx(want, abs=0.006)
