"""Training metrics: JSONL rows (always), TensorBoard scalars (when installed), a summary line.

Only rank 0 writes; the other ranks get a logger whose calls do nothing, so stage code calls it
unconditionally. Rows carry the stage name, the optimizer step and the wall time since start, so
reports can be built from the rows alone.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _plain(v: Any) -> Any:
    """JSON-safe scalar: tensors become floats, NaN/inf become strings."""
    if hasattr(v, "item") and callable(v.item):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsLogger:
    """Metric rows for one stage in `<output_dir>/metrics.jsonl` (+ TensorBoard).

    The file is started afresh when the logger is created: a rerun into the same directory does
    not mix its rows with the previous run's.
    """

    def __init__(self, output_dir: str | None, stage: str, *, enabled: bool = True, tensorboard: bool = True) -> None:
        self.stage = stage
        self.enabled = enabled and output_dir is not None
        self.path = os.path.join(output_dir, METRICS_FILE) if output_dir else None
        self.start = time.perf_counter()
        self._tb = None
        if self.enabled:
            os.makedirs(output_dir, exist_ok=True)
            open(self.path, "w").close()
            if tensorboard:
                self._tb = _open_tensorboard(os.path.join(output_dir, "tensorboard"))

    def log(self, step: int, split: str = "train", **metrics: Any) -> dict:
        """Write one row {stage, split, step, time_s, **metrics}; returns it (on every rank)."""
        row = {"stage": self.stage, "split": split, "step": int(step),
               "time_s": round(time.perf_counter() - self.start, 3)}
        row.update({k: _plain(v) for k, v in metrics.items()})
        if not self.enabled:
            return row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "time_s") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{self.stage}/{split}/{k}", v, int(step))
        return row

    def summary(self, metrics: dict, *, step: int = 0, output_dir: str | None = None) -> str:
        """Write a `split="summary"` row and print the one-line stage summary (rank 0)."""
        wall = time.perf_counter() - self.start
        row = self.log(step, split="summary", wall_time_s=round(wall, 2), **metrics)
        parts = [f"{k}={_fmt(v)}" for k, v in row.items() if k not in ("stage", "split", "step", "time_s", "wall_time_s")]
        line = f"[{self.stage}] done in {wall:.1f}s: " + ", ".join(parts)
        if output_dir:
            line += f" -> {output_dir}"
        if self.enabled:
            print(line, flush=True)
        self.close()
        return line

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _open_tensorboard(logdir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        logger.debug("tensorboard not installed: metrics go to %s only", METRICS_FILE)
        return None
    return SummaryWriter(log_dir=logdir)


def read_metrics(output_dir: str, *, split: str | None = None) -> list[dict]:
    """All rows of `<output_dir>/metrics.jsonl` (optionally one split), in write order."""
    with open(os.path.join(output_dir, METRICS_FILE)) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if split is None or r.get("split") == split]
