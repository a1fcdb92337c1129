"""Decode-step attention metadata from the runner's static buffers (Triton), in one launch.

Replaces the eager chain active = rem > 0; block-table gather at pos // block_size (clamped to the
table width); slot = block * block_size + pos % block_size, -1 for inactive rows; seq_len = pos + 1
(0 for inactive rows) as int32 — about eight small kernels per decode step, each a graph node of a
few microseconds. Rows are independent; one program covers up to 1024 rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybrid.ops import pdl

_MAX_ROWS_PER_PROGRAM = 1024


@triton.jit
def _decode_prepare_kernel(
    pos_ptr, rem_ptr, bt_ptr, slots_ptr, seq_lens_ptr,
    num_rows, max_blocks, stride_bt,
    BLOCK_SIZE: tl.constexpr, BLOCK_ROWS: tl.constexpr, PDL: tl.constexpr = False,
):
    if PDL:  # PDL-launched (ops/pdl.py): nothing is touched before the previous kernel ends
        pdl.prologue()
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # [R]
    in_range = rows < num_rows
    pos = tl.load(pos_ptr + rows, mask=in_range, other=0)  # int64
    rem = tl.load(rem_ptr + rows, mask=in_range, other=0)  # int64
    active = rem > 0
    # positions are >= 0, so truncating division/remainder equal torch's floor semantics
    blk_idx = tl.minimum(pos // BLOCK_SIZE, max_blocks - 1)
    # inactive rows' tables may be stale: their slot is -1 whatever the table says, so skip the read
    blk = tl.load(bt_ptr + rows.to(tl.int64) * stride_bt + blk_idx, mask=in_range & active, other=0)
    slot = blk.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
    tl.store(slots_ptr + rows, tl.where(active, slot, -1), mask=in_range)
    tl.store(seq_lens_ptr + rows, tl.where(active, pos + 1, 0).to(tl.int32), mask=in_range)


def decode_prepare(
    positions: torch.Tensor,  # [b] int64: position of each row's input token
    remaining: torch.Tensor,  # [b] int64: steps left; <= 0 marks an inactive (padding / finished) row
    block_tables: torch.Tensor,  # [b, max_blocks] int32
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # slot_mapping [b] int64, seq_lens [b] int32
    num_rows = positions.shape[0]
    assert positions.dtype == torch.int64 and remaining.dtype == torch.int64
    assert remaining.shape == (num_rows,) and block_tables.shape[0] == num_rows
    assert block_tables.dtype == torch.int32 and block_tables.stride(1) == 1
    assert positions.stride(0) == 1 and remaining.stride(0) == 1
    slots = torch.empty(num_rows, dtype=torch.int64, device=positions.device)
    seq_lens = torch.empty(num_rows, dtype=torch.int32, device=positions.device)
    if num_rows == 0:
        return slots, seq_lens
    block_rows = min(triton.next_power_of_2(num_rows), _MAX_ROWS_PER_PROGRAM)
    _decode_prepare_kernel[(triton.cdiv(num_rows, block_rows),)](
        positions, remaining, block_tables, slots, seq_lens,
        num_rows, block_tables.shape[1], block_tables.stride(0),
        BLOCK_SIZE=block_size, BLOCK_ROWS=block_rows, num_warps=1 if block_rows <= 128 else 4, **pdl.launch(positions),
    )
    return slots, seq_lens
