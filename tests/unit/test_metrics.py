"""metrics.jsonl survives kills and resumes without duplicate steps; progress line; plot."""

from __future__ import annotations

import json

from rpg_megatron.config import LogConfig
from rpg_megatron.metrics import MetricsSink, plot, read_metrics


def test_jsonl_records_progress_and_resume(tmp_path, capsys):
    cfg = LogConfig(run_dir=str(tmp_path))
    sink = MetricsSink(cfg, total_steps=4)
    for s in range(3):
        sink.log(s, {"reward/mean": 0.1 * s, "kl": float("nan"), "time/step_s": 0.5})
    sink.close()
    out = capsys.readouterr().out
    assert "3/4" in out and "eta" in out and "reward/mean=0.2" in out
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3] and recs[0]["kl"] is None
    # A killed run may leave a torn line; resuming from step 2 drops step 3 and the torn line.
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "rew')
    sink = MetricsSink(cfg, total_steps=4, start_step=2)
    sink.log(2, {"reward/mean": 0.9})
    sink.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert (
        json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["reward/mean"] == 0.9
    )
    png = plot(tmp_path / "metrics.jsonl", tmp_path / "reward.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_disabled_sink_writes_nothing(tmp_path):
    sink = MetricsSink(LogConfig(run_dir=str(tmp_path / "r")), total_steps=1, enabled=False)
    sink.log(0, {"x": 1.0})
    sink.close()
    assert not (tmp_path / "r").exists()
