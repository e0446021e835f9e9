"""Where a step's numbers go: a progress line with ETA, metrics.jsonl, TensorBoard, W&B.

Only global rank 0 writes. Every record is one JSON object per line, flushed at once, so a run
killed at any point leaves a valid file up to its last finished step; on resume, lines of
steps >= the resumed step are dropped first, so the file never holds a step twice.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from rpg_megatron.config import LogConfig


class MetricsSink:
    """Rank 0's metric writer; a no-op object on other ranks (`enabled=False`)."""

    def __init__(
        self, cfg: LogConfig, *, total_steps: int, start_step: int = 0, enabled: bool = True
    ):
        self.cfg = cfg
        self.enabled = enabled
        self.total_steps = total_steps
        self.start_step = start_step
        self.t0 = time.monotonic()
        self.path = Path(cfg.run_dir) / "metrics.jsonl"
        self._file: TextIO | None = None
        self._tb: Any = None
        self._wandb: Any = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_from(self.path, start_step)
        self._file = self.path.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(cfg.run_dir) / "tensorboard"))
        except ImportError:  # tensorboard is a dependency; this only guards a stripped install
            print("metrics: tensorboard not installed, skipping it", file=sys.stderr)
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ImportError(
                    f"log.wandb_project={cfg.wandb_project!r} needs `pip install wandb`"
                ) from e
            self._wandb = wandb.init(project=cfg.wandb_project, dir=cfg.run_dir, resume="allow")

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Record one step (0-based `step`; the record's "step" is step + 1, steps done)."""
        if not self.enabled:
            return
        record = {"step": step + 1, **{k: _plain(v) for k, v in values.items()}}
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step + 1)
        if self._wandb is not None:
            self._wandb.log(record, step=step + 1)
        if (step + 1) % self.cfg.every == 0 or step + 1 == self.total_steps:
            print(self._progress(step + 1, record), flush=True)

    def _progress(self, done: int, record: Mapping[str, Any]) -> str:
        elapsed = time.monotonic() - self.t0
        rate = (done - self.start_step) / elapsed if elapsed > 0 else 0.0
        eta = (self.total_steps - done) / rate if rate > 0 else math.inf
        width = 20
        filled = int(width * done / max(1, self.total_steps))
        bar = "#" * filled + "." * (width - filled)
        shown = ("reward/mean", "kl", "entropy", "clip_frac", "response_len/mean", "time/step_s")
        parts = [f"{k}={record[k]:.4g}" for k in shown if isinstance(record.get(k), int | float)]
        return f"[{bar}] {done}/{self.total_steps} eta {_fmt(eta)} " + " ".join(parts)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf; null says "not measured"
    return v


def _fmt(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _truncate_from(path: Path, start_step: int) -> None:
    """Drop records of steps > start_step (written after the checkpoint being resumed)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= start_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            continue  # a torn last line of a killed run
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    tmp.replace(path)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot(path: str | Path, out: str | Path, keys: tuple[str, ...] = ("reward/mean",)) -> Path:
    """A PNG of `keys` against step (matplotlib, Agg backend), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(path)
    fig, axes = plt.subplots(len(keys), 1, figsize=(6, 2.6 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
