"""Content-hash cache of tokenised stage data.

The key hashes what determines the tokens: the bytes of every input file (or the generated built-in
records), the data settings, the stage, and the tokenizer's identity (class, vocabulary size, special
ids and the encoding of a probe string, so two tokenizers with one name but different vocabularies
do not collide). A second run with the same key loads the tensors and skips tokenisation.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Iterable

import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = "stage-data-v1"
"""Bump when the tokenised layout changes, so stale caches are not reused."""
_PROBE = " Human: Héllo, wörld! 123 <tag> Assistant: ok\n"


def tokenizer_identity(tokenizer: Any) -> str:
    probe = tokenizer(_PROBE, add_special_tokens=True)["input_ids"]
    ident = {
        "class": type(tokenizer).__name__,
        "len": len(tokenizer),
        "pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
        "probe": list(probe),
    }
    return json.dumps(ident, sort_keys=True)


def _hash_path(h: "hashlib._Hash", path: str) -> None:
    if path == "builtin":
        from rlhf.data import builtin

        h.update(b"builtin\0")
        for r in builtin.records():
            h.update(f"{r.prompt}\0{r.chosen}\0{r.rejected}\0".encode())
        return
    if os.path.isdir(path):
        files = sorted(
            os.path.relpath(os.path.join(root, f), path) for root, _, fs in os.walk(path) for f in fs
        )
    else:
        files = [""]
    for rel in files:
        full = os.path.join(path, rel) if rel else path
        h.update(f"file:{rel}\0".encode())
        with open(full, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)


def content_hash(paths: Iterable[str], settings: dict, tokenizer: Any) -> str:
    h = hashlib.sha256()
    h.update(FORMAT_VERSION.encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(tokenizer_identity(tokenizer).encode())
    for p in paths:
        h.update(f"\0path:{os.path.basename(p)}\0".encode())
        _hash_path(h, p)
    return h.hexdigest()


def load(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # a truncated or foreign file: rebuild it
        logger.warning("ignoring unreadable data cache %s (%s); re-tokenising", path, e)
        return None


def save(path: str, state: dict) -> None:
    """Atomic write (temp file + rename), safe when several ranks write the same key."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
