"""Blend several datasets and split each one across the three stages (DeepSpeed-Chat's scheme).

Every `--data_path` entry is permuted with the seed and cut by `--data_split` (e.g. "2,4,4") into
disjoint parts for stages 1, 2 and 3; each part is then cut into train / eval by `eval_fraction`.
The stage's parts of all datasets are concatenated (train shuffled with the seed).
`--sft_only_data_path` entries go whole to stage 1.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from rlhf.data.formats import DataError, Record, load_records_with_stats

logger = logging.getLogger(__name__)


def parse_split(data_split: str) -> list[float]:
    """"2,4,4" -> [0.2, 0.4, 0.4]; three non-negative shares with a positive sum."""
    try:
        shares = [float(x) for x in str(data_split).split(",")]
    except ValueError:
        raise DataError(f"--data_split {data_split!r}: expected three numbers like '2,4,4'") from None
    if len(shares) != 3 or any(s < 0 for s in shares) or sum(shares) <= 0:
        raise DataError(f"--data_split {data_split!r}: expected three non-negative numbers with a positive sum")
    total = sum(shares)
    return [s / total for s in shares]


def split_indices(n: int, shares: list[float], seed: int) -> list[np.ndarray]:
    """Disjoint index sets covering range(n), one per share, from a seeded permutation."""
    perm = np.random.default_rng(seed).permutation(n)
    bounds = np.round(np.cumsum([0.0] + shares) * n).astype(int)
    bounds[-1] = n
    return [np.sort(perm[bounds[i] : bounds[i + 1]]) for i in range(len(shares))]


def train_eval_split(rows: list[Record], eval_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Seeded cut of one part into (train, eval); both non-empty when eval_fraction > 0 and len >= 2."""
    n = len(rows)
    n_eval = int(round(n * eval_fraction))
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    perm = np.random.default_rng(seed + 1).permutation(n)
    eval_idx = set(perm[:n_eval].tolist())
    train = [r for i, r in enumerate(rows) if i not in eval_idx]
    ev = [r for i, r in enumerate(rows) if i in eval_idx]
    return train, ev


@dataclass
class StageRecords:
    train: list[Record] = field(default_factory=list)
    eval: list[Record] = field(default_factory=list)
    num_bad_rows: int = 0
    """Malformed rows skipped while reading (only with skip_bad_rows)."""


def blend_stage_records(
    data_path: list[str],
    data_split: str,
    stage: int,
    sft_only_data_path: list[str] | None = None,
    eval_fraction: float = 0.1,
    seed: int = 1234,
    skip_bad_rows: bool = False,
) -> StageRecords:
    """The blended train / eval records of `stage` (1, 2 or 3)."""
    if stage not in (1, 2, 3):
        raise ValueError(f"stage must be 1, 2 or 3, got {stage}")
    shares = parse_split(data_split)
    out = StageRecords()
    sources: list[tuple[str, list[Record]]] = []
    for path in data_path:
        rows, bad = load_records_with_stats(path, skip_bad_rows)
        out.num_bad_rows += bad
        if not rows:
            raise DataError(f"{path}: no usable records")
        part = split_indices(len(rows), shares, seed)[stage - 1]
        sources.append((path, [rows[i] for i in part]))
    if stage == 1:
        for path in sft_only_data_path or []:
            rows, bad = load_records_with_stats(path, skip_bad_rows)
            out.num_bad_rows += bad
            if not rows:
                raise DataError(f"{path}: no usable records")
            sources.append((path, rows))
    for path, rows in sources:
        train, ev = train_eval_split(rows, eval_fraction, seed)
        logger.info("stage %d: %s gives %d train + %d eval records", stage, path, len(train), len(ev))
        out.train.extend(train)
        out.eval.extend(ev)
    order = np.random.default_rng(seed + 2).permutation(len(out.train))
    out.train = [out.train[i] for i in order]
    return out
