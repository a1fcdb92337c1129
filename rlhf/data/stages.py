"""Tokenised train / eval data of one stage, cached by content hash.

  stage 1: {"input_ids": [L]}                      prompt + chosen + eos, cut to max_seq_len
  stage 2: {"chosen_input_ids": [L], "rejected_input_ids": [L]}   (pairs equal after cutting dropped)
  stage 3: {"prompt_input_ids": [Lp]}              prompt, cut from the LEFT to max_prompt_seq_len
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from rlhf.config import DataConfig
from rlhf.data import cache
from rlhf.data.blending import blend_stage_records
from rlhf.data.datasets import TokenizedDataset
from rlhf.data.formats import DataError, Record

logger = logging.getLogger(__name__)

STAGE_FIELDS = {1: ["input_ids"], 2: ["chosen_input_ids", "rejected_input_ids"], 3: ["prompt_input_ids"]}


@dataclass
class StageData:
    train: TokenizedDataset
    eval: TokenizedDataset
    num_dropped: int = 0
    """Rows not used: malformed rows skipped (skip_bad_rows) + stage-2 pairs without a usable rejected answer."""
    dropped: dict = field(default_factory=dict)
    """Reason -> count for num_dropped."""
    from_cache: bool = False
    """True when the tokenised tensors came from data_output_path (tokenisation skipped)."""
    cache_path: str = ""


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]


def _with_eos(ids: list[int], eos: int, max_len: int) -> list[int]:
    if not ids or ids[-1] != eos:
        ids = ids + [eos]
    return ids[:max_len]


def tokenize_records(
    records: list[Record], tokenizer: Any, stage: int, max_seq_len: int, max_prompt_seq_len: int
) -> tuple[TokenizedDataset, dict[str, int]]:
    """(dataset, dropped reason -> count) for one list of records."""
    eos = tokenizer.eos_token_id
    dropped: dict[str, int] = {}
    if stage == 1:
        ids = _encode(tokenizer, [r.prompt + r.chosen for r in records])
        rows = [{"input_ids": _with_eos(x, eos, max_seq_len)} for x in ids]
    elif stage == 2:
        usable = [r for r in records if r.rejected is not None]
        if len(usable) < len(records):
            dropped["no rejected answer"] = len(records) - len(usable)
        same = sum(r.chosen == r.rejected for r in usable)
        usable = [r for r in usable if r.chosen != r.rejected]
        if same:
            dropped["chosen == rejected"] = same
        chosen = _encode(tokenizer, [r.prompt + r.chosen for r in usable])
        rejected = _encode(tokenizer, [r.prompt + r.rejected for r in usable])
        rows = []
        for c, j in zip(chosen, rejected):
            c, j = _with_eos(c, eos, max_seq_len), _with_eos(j, eos, max_seq_len)
            if c == j:
                dropped["equal after truncation to max_seq_len"] = dropped.get("equal after truncation to max_seq_len", 0) + 1
                continue
            rows.append({"chosen_input_ids": c, "rejected_input_ids": j})
    elif stage == 3:
        ids = _encode(tokenizer, [r.prompt for r in records])
        rows = [{"prompt_input_ids": x[-max_prompt_seq_len:]} for x in ids]
    else:
        raise ValueError(f"stage must be 1, 2 or 3, got {stage}")
    return TokenizedDataset.from_rows(STAGE_FIELDS[stage], rows), dropped


def _settings(cfg: DataConfig, stage: int) -> dict:
    return {
        "stage": stage, "data_split": cfg.data_split, "eval_fraction": cfg.eval_fraction, "seed": cfg.seed,
        "max_seq_len": cfg.max_seq_len, "max_prompt_seq_len": cfg.max_prompt_seq_len,
        "skip_bad_rows": cfg.skip_bad_rows, "data_path": [os.path.basename(p) for p in cfg.data_path],
        "sft_only_data_path": [os.path.basename(p) for p in cfg.sft_only_data_path] if stage == 1 else [],
    }


def build_stage_data(cfg: DataConfig, tokenizer: Any, stage: int, use_cache: bool = True) -> StageData:
    """Blend, split, tokenise (or load from the cache) the data of `stage`; DataError if a split is empty."""
    if stage not in STAGE_FIELDS:
        raise ValueError(f"stage must be 1, 2 or 3, got {stage}")
    paths = list(cfg.data_path) + (list(cfg.sft_only_data_path) if stage == 1 else [])
    if not paths:
        raise DataError(f"stage {stage}: no data (--data_path is empty)")
    key = cache.content_hash(paths, _settings(cfg, stage), tokenizer)
    path = os.path.join(cfg.data_output_path, f"stage{stage}-{key[:24]}.pt")
    state = cache.load(path) if use_cache else None
    if state is not None:
        data = StageData(
            train=TokenizedDataset.from_state(state["train"]), eval=TokenizedDataset.from_state(state["eval"]),
            num_dropped=int(state["num_dropped"]), dropped=dict(state["dropped"]), from_cache=True, cache_path=path,
        )
        logger.info("stage %d data: %d train / %d eval from cache %s (tokenisation skipped)",
                    stage, len(data.train), len(data.eval), path)
        return data

    recs = blend_stage_records(
        cfg.data_path, cfg.data_split, stage, cfg.sft_only_data_path, cfg.eval_fraction, cfg.seed, cfg.skip_bad_rows
    )
    train, dropped_train = tokenize_records(recs.train, tokenizer, stage, cfg.max_seq_len, cfg.max_prompt_seq_len)
    ev, dropped_eval = tokenize_records(recs.eval, tokenizer, stage, cfg.max_seq_len, cfg.max_prompt_seq_len)
    dropped = {k: dropped_train.get(k, 0) + dropped_eval.get(k, 0) for k in {**dropped_train, **dropped_eval}}
    if recs.num_bad_rows:
        dropped["malformed rows skipped"] = recs.num_bad_rows
    data = StageData(train, ev, sum(dropped.values()), dropped, False, path)
    for reason, n in sorted(dropped.items()):
        logger.warning("stage %d data: dropped %d row(s): %s", stage, n, reason)
    if len(train) == 0:
        raise DataError(
            f"stage {stage}: the training split is empty (data_path={cfg.data_path}, data_split={cfg.data_split!r}, "
            f"dropped={dropped}); give this stage a non-zero share or more data"
        )
    if cfg.eval_fraction > 0 and len(ev) == 0:
        raise DataError(f"stage {stage}: the eval split is empty (eval_fraction={cfg.eval_fraction}); add data")
    logger.info("stage %d data: tokenised %d train / %d eval rows (%d tokens)",
                stage, len(train), len(ev), train.num_tokens() + ev.num_tokens())
    if use_cache:
        cache.save(path, {"train": train.state(), "eval": ev.state(), "num_dropped": data.num_dropped, "dropped": dropped})
    return data
