"""Readers: every supported input becomes a list of `Record`s in DeepSpeed-Chat's prompt format.

Supported inputs (`load_records(path)`):
  - JSON (a list of objects, or {"data"|"train"|"rows": [...]}) and JSONL with DeepSpeed-Chat fields
    `prompt`, `chosen` (or `response`), optional `rejected`;
  - HH-RLHF records: `chosen` / `rejected` full dialogues with "\\n\\nHuman:" / "\\n\\nAssistant:" turns
    and no `prompt`; the prompt is everything up to and including the last "Assistant:";
  - parquet files (or a directory of them) with prompt/response/chosen/rejected columns;
  - directories written by `datasets.Dataset(Dict).save_to_disk` (all splits, train first);
  - the name `builtin` (rlhf/data/builtin.py).
Prompts are normalised to " Human: {prompt} Assistant:" (multi-turn: " Human: a Assistant: b Human: c
Assistant:"), answers to " {answer}". A malformed row raises `DataError` naming file and row (1-based);
with skip_bad_rows it is counted, skipped, and the count logged. Nothing is dropped silently.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable

logger = logging.getLogger(__name__)

BUILTIN = "builtin"
_TURN_RE = re.compile(r"(Human|Assistant):")


class DataError(ValueError):
    """Bad or unusable input data (the message names the file and, for a row, its number)."""


@dataclass(frozen=True)
class Record:
    prompt: str
    """" Human: {prompt} Assistant:" (DeepSpeed-Chat's format)."""
    chosen: str
    """The preferred answer, with a leading space."""
    rejected: str | None = None
    """The dispreferred answer (None for SFT-only data)."""


def _turns(dialogue: str) -> list[tuple[str, str]]:
    """[(speaker, text), ...] of a "Human: ... Assistant: ..." dialogue (text stripped)."""
    parts = _TURN_RE.split(dialogue)
    if len(parts) < 3 or parts[0].strip():
        return []
    return [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]


def format_prompt(prompt: str) -> str:
    """Normalise a raw question or a Human/Assistant dialogue prompt to " Human: ... Assistant:"."""
    text = prompt.strip()
    if not text:
        raise ValueError("empty prompt")
    turns = _turns(text)
    if turns and turns[0][0] == "Human":
        if turns[-1] != ("Assistant", ""):
            turns.append(("Assistant", ""))
        return " " + " ".join(f"{who}: {t}" if t else f"{who}:" for who, t in turns)
    return f" Human: {text} Assistant:"


def format_answer(answer: str) -> str:
    text = answer.strip()
    if not text:
        raise ValueError("empty answer")
    return " " + text


def split_dialogue(dialogue: str) -> tuple[str, str]:
    """HH-RLHF: (prompt up to and including the last "Assistant:", the answer after it)."""
    cut = dialogue.rfind("Assistant:")
    if cut < 0 or "Human:" not in dialogue[:cut]:
        raise ValueError("dialogue has no 'Human: ... Assistant:' turns")
    end = cut + len("Assistant:")
    return dialogue[:end], dialogue[end:]


def _str_field(row: dict, key: str) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def record_from_row(row: Any) -> Record:
    """One row (dict) in any supported schema -> Record; ValueError says what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    prompt = _str_field(row, "prompt")
    chosen = _str_field(row, "chosen")
    if chosen is None:
        chosen = _str_field(row, "response")
    rejected = _str_field(row, "rejected")
    if chosen is None:
        raise ValueError("missing field 'chosen' (or 'response')")
    if prompt is None or not prompt.strip():
        if prompt is not None:
            raise ValueError("empty prompt")
        # HH-RLHF: full dialogues, the prompt is their common head.
        prompt, chosen = split_dialogue(chosen)
        if rejected is not None:
            _, rejected = split_dialogue(rejected)
    return Record(
        prompt=format_prompt(prompt),
        chosen=format_answer(chosen),
        rejected=format_answer(rejected) if rejected is not None else None,
    )


# ------------------------------------------------------------------------------------------ rows
def _json_rows(path: str) -> Iterable[tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from e
    if isinstance(data, dict):
        for key in ("data", "train", "rows"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
    return enumerate(data, start=1)


def _jsonl_rows(path: str) -> Iterable[tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, _BadRow(f"invalid JSON: {e.msg}")


class _BadRow:
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _table_rows(table: Any) -> Iterable[tuple[int, Any]]:
    """Rows of a pandas DataFrame (NaN / None cells become None)."""
    columns = list(table.columns)
    for i, values in enumerate(table.itertuples(index=False, name=None), start=1):
        yield i, {c: (None if v is None or (isinstance(v, float) and v != v) else v) for c, v in zip(columns, values)}


def _parquet_rows(path: str) -> Iterable[tuple[int, Any]]:
    import pandas as pd

    return _table_rows(pd.read_parquet(path))


def _arrow_dir_rows(path: str) -> Iterable[tuple[int, Any]]:
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        names = sorted(ds, key=lambda s: (s != "train", s))
        ds = datasets.concatenate_datasets([ds[s] for s in names]) if names else None
        if ds is None:
            return iter(())
    return enumerate(ds, start=1)


def _is_saved_dataset(path: str) -> bool:
    names = set(os.listdir(path))
    return bool(names & {"dataset_info.json", "state.json", "dataset_dict.json"})


def _rows(path: str) -> tuple[str, Iterable[tuple[int, Any]]]:
    """(description of the source, iterable of (row number, row))."""
    if os.path.isdir(path):
        if _is_saved_dataset(path):
            return path, _arrow_dir_rows(path)
        files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
        if files:
            return path, (row for f in files for row in _tag(f, _parquet_rows(f)))
        raise DataError(f"{path}: directory is neither a datasets.save_to_disk dir nor holds parquet files")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        return path, _jsonl_rows(path)
    if ext == ".json":
        return path, _json_rows(path)
    if ext == ".parquet":
        return path, _parquet_rows(path)
    raise DataError(f"{path}: unsupported file type {ext!r} (use .json, .jsonl, .parquet or a save_to_disk dir)")


def _tag(file: str, rows: Iterable[tuple[int, Any]]) -> Iterable[tuple[str, Any]]:
    for i, row in rows:
        yield f"{os.path.basename(file)} row {i}", row


def load_records_with_stats(path: str, skip_bad_rows: bool = False) -> tuple[list[Record], int]:
    """(records, number of malformed rows skipped)."""
    if path == BUILTIN:
        from rlhf.data import builtin

        return builtin.records(), 0
    if not os.path.exists(path):
        raise DataError(f"data path {path!r} does not exist (nothing is downloaded; pass a local file or 'builtin')")
    source, rows = _rows(path)
    out: list[Record] = []
    bad = 0
    for where, row in rows:
        try:
            if isinstance(row, _BadRow):
                raise ValueError(row.reason)
            out.append(record_from_row(row))
        except ValueError as e:
            label = where if isinstance(where, str) else f"row {where}"
            if not skip_bad_rows:
                raise DataError(f"{source}: {label}: {e} (pass --skip_bad_rows to skip malformed rows)") from None
            bad += 1
    if bad:
        logger.warning("%s: skipped %d malformed row(s) of %d (--skip_bad_rows)", source, bad, bad + len(out))
    logger.info("%s: read %d record(s)", source, len(out))
    return out, bad


def load_records(path: str, skip_bad_rows: bool = False) -> list[Record]:
    """All records of one data path (see module docstring for the formats)."""
    return load_records_with_stats(path, skip_bad_rows)[0]
