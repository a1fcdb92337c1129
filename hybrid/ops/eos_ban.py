"""EOS ban before sampling (Triton): logits[i, e] = -inf for every eos id e while row i has
generated fewer than its min_new_tokens. One launch over all rows and all eos ids, in place of
one masked_fill per eos id (plus the comparison) in the decode step."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybrid.ops import pdl


@triton.jit
def _ban_eos_kernel(
    logits_ptr, gen_ptr, min_new_ptr, eos_ptr,
    num_rows, num_eos, stride_l,
    BLOCK_ROWS: tl.constexpr, BLOCK_EOS: tl.constexpr, PDL: tl.constexpr = False,
):
    if PDL:  # PDL-launched (ops/pdl.py): nothing is touched before the previous kernel ends
        pdl.prologue()
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # [R]
    in_range = rows < num_rows
    gen = tl.load(gen_ptr + rows, mask=in_range, other=0)
    min_new = tl.load(min_new_ptr + rows, mask=in_range, other=0)
    ban = in_range & (gen < min_new)  # [R]
    e = tl.arange(0, BLOCK_EOS)  # [E]
    e_valid = e < num_eos
    eos = tl.load(eos_ptr + e, mask=e_valid, other=0)  # [E] int64
    ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_l + eos[None, :]  # [R, E]
    neg_inf = tl.full([BLOCK_ROWS, BLOCK_EOS], float("-inf"), logits_ptr.dtype.element_ty)
    tl.store(ptrs, neg_inf, mask=ban[:, None] & e_valid[None, :])


def ban_eos(
    logits: torch.Tensor,  # [b, V], modified in place
    num_generated: torch.Tensor,  # [b] int64
    min_new_tokens: torch.Tensor,  # [b] int64
    eos_ids: torch.Tensor,  # [E] int64, each in [0, V)
) -> None:
    num_rows = logits.shape[0]
    assert logits.dim() == 2 and logits.stride(1) == 1
    assert num_generated.shape == (num_rows,) and min_new_tokens.shape == (num_rows,)
    assert num_generated.stride(0) == 1 and min_new_tokens.stride(0) == 1
    assert eos_ids.dtype == torch.int64 and eos_ids.dim() == 1 and eos_ids.stride(0) == 1
    if num_rows == 0 or eos_ids.shape[0] == 0:
        return
    block_rows = min(triton.next_power_of_2(num_rows), 256)
    _ban_eos_kernel[(triton.cdiv(num_rows, block_rows),)](
        logits, num_generated, min_new_tokens, eos_ids,
        num_rows, eos_ids.shape[0], logits.stride(0),
        BLOCK_ROWS=block_rows, BLOCK_EOS=triton.next_power_of_2(eos_ids.shape[0]), num_warps=1, **pdl.launch(logits),
    )
