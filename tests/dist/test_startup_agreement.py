"""Start-up decisions that fail on one rank only are reduced across ranks: on 2 gloo ranks,
a data file missing on rank 1 (before the model is built), or a data cursor that does not fit
rank 1's data (on --resume, after the checkpoint loads), stops both ranks; rank 1 reports it,
rank 0 stays quiet, and nothing is written into the run directory (the earlier run's files
stay byte-identical; a fresh run leaves only the empty lock file).

Independent truth: which rank saw which file is decided by the test; the hashes are of files
written before the failing start.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from rpg_megatron import tiny
from tests.distributed import spawn

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _cfg(root: Path, data: str, *, steps: int = 2):
    from rpg_megatron.config_io import load_config

    return load_config(
        str(REPO / "examples" / "tiny_cpu.yaml"),
        [
            f"model.hf_path={root / 'model'}",
            f"data.train_files=[{data}]",
            f"log.run_dir={root / 'run'}",
            f"checkpoint.dir={root / 'run' / 'ck'}",
            f"optim.steps={steps}",
            "checkpoint.every=1",
            "rollout.prompts_per_step=4",
            "optim.micro_batch_size=8",
        ],
    )


def _start(rank: int, world: int, root: str, data_by_rank: list[str], resume: bool):
    """train() with this rank's data file; (exception class, message, quiet) or None."""
    from rpg_megatron import train

    try:
        train.train(_cfg(Path(root), data_by_rank[rank]), resume=resume)
    except Exception as e:
        return type(e).__name__, str(e), bool(getattr(e, "quiet", False))
    return None


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_a_file_missing_on_one_rank_stops_every_rank_before_anything_is_written(tmp_path):
    tiny.write_tiny_model_dir(tmp_path / "model")
    good = tiny.write_parquet(tiny.arithmetic_rows(16, 0), tmp_path / "train.parquet")
    missing = tmp_path / "only_on_rank0.parquet"
    r0, r1 = spawn(2, _start, str(tmp_path), [str(good), str(missing)], False)
    assert r1 == ("DataError", f"{missing}: no such file (data.train_files)", False)
    assert r0[0] == "PeerFailed" and r0[2] is True and str(missing) in r0[1]
    # Rank 0 took the lock (and gave it back); nothing else was written.
    assert _hashes(tmp_path / "run") == {"run.lock": hashlib.sha256(b"").hexdigest()}


def test_a_data_cursor_that_fails_on_one_rank_stops_both_before_rank0_writes(tmp_path):
    tiny.write_tiny_model_dir(tmp_path / "model")
    good = tiny.write_parquet(tiny.arithmetic_rows(16, 0), tmp_path / "train.parquet")
    other = tiny.write_parquet(tiny.arithmetic_rows(40, 5), tmp_path / "other.parquet")
    assert spawn(2, _start, str(tmp_path), [str(good), str(good)], False) == [None, None]
    before = _hashes(tmp_path / "run")
    assert "config.yaml" in before and "metrics.jsonl" in before
    # --resume: both ranks load the checkpoint, rank 1's data has 40 prompts, not 16.
    r0, r1 = spawn(2, _start, str(tmp_path), [str(good), str(other)], True)
    assert r1[0] == "DataError" and r1[2] is False
    assert "data cursor was saved for 16 prompts" in r1[1] and "this run has 40" in r1[1]
    assert r0[0] == "PeerFailed" and r0[2] is True
    # Rank 0 did not print the resume line's work: config.yaml, metrics and TensorBoard as before.
    assert _hashes(tmp_path / "run") == before
