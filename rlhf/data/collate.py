"""Batch collators for the three stages (DeepSpeed-Chat's layouts).

  collate_sft      -> input_ids / attention_mask / labels [B, L], right-padded, labels -100 on pad
  collate_pairs    -> input_ids / attention_mask [2B, L]: the B chosen rows, then the B rejected rows
  collate_prompts  -> input_ids / attention_mask [B, Lp], LEFT-padded so generation appends on the right
"""
from __future__ import annotations

from typing import Sequence

import torch

IGNORE_INDEX = -100


def pad_rows(rows: Sequence[torch.Tensor], pad_token_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D LongTensors into (ids [B, L], attention_mask [B, L]) padded on `side`."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not rows:
        raise ValueError("empty batch")
    width = max(int(r.numel()) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # [B, L]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, L]
    for i, r in enumerate(rows):
        n = int(r.numel())
        if n == 0:
            continue
        sl = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, sl] = r
        mask[i, sl] = 1
    return ids, mask


def collate_sft(batch: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    ids, mask = pad_rows([b["input_ids"] for b in batch], pad_token_id, "right")  # [B, L]
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)  # [B, L]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_pairs(batch: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    rows = [b["chosen_input_ids"] for b in batch] + [b["rejected_input_ids"] for b in batch]
    ids, mask = pad_rows(rows, pad_token_id, "right")  # [2B, L]
    return {"input_ids": ids, "attention_mask": mask}


def collate_prompts(batch: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    ids, mask = pad_rows([b["prompt_input_ids"] for b in batch], pad_token_id, "left")  # [B, Lp]
    return {"input_ids": ids, "attention_mask": mask}
