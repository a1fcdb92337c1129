"""Unsupervised text for the pretraining-loss mix of stage 3 (InstructGPT's "PPO-ptx").

Inputs: .txt files (one document per paragraph when the file has blank lines, else per line),
JSON / JSONL with a "text" field, or `builtin` (text of the built-in dataset's small world).
Documents are tokenised, joined with eos and cut into blocks of max_seq_len tokens.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from rlhf.data.datasets import TokenizedDataset
from rlhf.data.formats import BUILTIN, DataError

logger = logging.getLogger(__name__)


def read_texts(path: str) -> list[str]:
    if path == BUILTIN:
        from rlhf.data import builtin

        return builtin.pretrain_texts()
    if not os.path.isfile(path):
        raise DataError(f"pretraining data {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8") as f:
        raw = f.read()
    if ext == ".txt":
        parts = re.split(r"\n\s*\n", raw) if re.search(r"\n\s*\n", raw) else raw.splitlines()
        return [p.strip() for p in parts if p.strip()]
    if ext in (".json", ".jsonl"):
        try:
            rows = [json.loads(line) for line in raw.splitlines() if line.strip()] if ext == ".jsonl" else json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from e
        texts = []
        for i, row in enumerate(rows, start=1):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{path}: row {i}: expected an object with a string 'text' field")
            texts.append(row["text"])
        return texts
    raise DataError(f"{path}: unsupported pretraining file type {ext!r} (use .txt, .json, .jsonl or 'builtin')")


def build_pretrain_data(paths: list[str], tokenizer: Any, max_seq_len: int) -> TokenizedDataset:
    """{"input_ids": [max_seq_len]} blocks of all documents (the last block may be shorter)."""
    if max_seq_len < 2:
        raise ValueError("max_seq_len must be >= 2")
    stream: list[int] = []
    num_docs = 0
    for path in paths:
        texts = read_texts(path)
        num_docs += len(texts)
        for ids in tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []:
            stream.extend(ids)
            stream.append(tokenizer.eos_token_id)
    if not stream:
        raise DataError(f"pretraining data {paths} holds no text")
    blocks = [stream[i : i + max_seq_len] for i in range(0, len(stream), max_seq_len)]
    if len(blocks) > 1 and len(blocks[-1]) < max_seq_len:
        blocks.pop()  # a short tail adds padding, not signal
    logger.info("pretraining data: %d documents -> %d blocks of %d tokens", num_docs, len(blocks), max_seq_len)
    return TokenizedDataset.from_rows(["input_ids"], [{"input_ids": b} for b in blocks])
