"""Tokenised stage datasets: variable-length LongTensor fields stored flat with offsets.

Flat storage makes the cache one small `torch.save` of a few tensors (fast to write and load) instead
of thousands of pickled tensors.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset


class TokenizedDataset(Dataset):
    """Items are {field: LongTensor[L_i]}; all fields have the same number of rows."""

    def __init__(self, flat: dict[str, torch.Tensor], offsets: dict[str, torch.Tensor]) -> None:
        lengths = {len(o) - 1 for o in offsets.values()}
        if len(lengths) > 1:
            raise ValueError(f"fields have different row counts: { {k: len(o) - 1 for k, o in offsets.items()} }")
        self.flat = flat  # field -> [total_tokens]
        self.offsets = offsets  # field -> [num_rows + 1]
        self.fields = list(flat)

    @classmethod
    def from_rows(cls, fields: Sequence[str], rows: Sequence[dict[str, list[int]]]) -> "TokenizedDataset":
        flat, offsets = {}, {}
        for f in fields:
            lens = torch.tensor([len(r[f]) for r in rows], dtype=torch.long)  # [num_rows]
            offsets[f] = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])  # [num_rows + 1]
            flat[f] = torch.tensor([t for r in rows for t in r[f]], dtype=torch.long)  # [total_tokens]
        return cls(flat, offsets)

    def __len__(self) -> int:
        return len(next(iter(self.offsets.values()))) - 1 if self.offsets else 0

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        out = {}
        for f in self.fields:
            start, end = self.offsets[f][i].item(), self.offsets[f][i + 1].item()
            out[f] = self.flat[f][start:end]  # [L_i]
        return out

    def state(self) -> dict:
        return {"flat": self.flat, "offsets": self.offsets}

    @classmethod
    def from_state(cls, state: dict) -> "TokenizedDataset":
        return cls(state["flat"], state["offsets"])

    def num_tokens(self) -> int:
        return sum(int(t.numel()) for t in self.flat.values())
