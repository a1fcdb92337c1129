"""Fused residual add + LayerNorm (Triton), OPT's pre-LN block boundary.

residual_out = x + residual (rounded to the model dtype, exactly as HF adds in that dtype), then
normed = LayerNorm(residual_out) with fp32 statistics and fp32 weight/bias. One program per token
row holds the whole row in registers: one read of x and residual, two writes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybrid.ops import pdl
from hybrid.ops.pdl import gdc_launch_dependents


@triton.jit
def _add_layernorm_kernel(
    out_ptr, res_out_ptr, x_ptr, res_ptr, w_ptr, b_ptr,
    stride_o, stride_ro, stride_x, stride_r,
    eps, x_idx_ptr, r_idx_ptr, r_offset,
    HIDDEN: tl.constexpr, BLOCK_C: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL_TRIGGER: tl.constexpr = False,
    GATHER: tl.constexpr = False, PDL: tl.constexpr = False,
):
    c = tl.arange(0, BLOCK_C)
    mask = c < HIDDEN
    # the norm's parameters first: no decode step writes them, so a PDL-launched program may read
    # them before the wait (their cold DRAM round trip overlaps the kernel before this one)
    w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
    if PDL:  # PDL-launched (ops/pdl.py): nothing the previous kernels write is read before this
        pdl.prologue()
    if PDL_TRIGGER:  # a PDL-launched GEMM after this may start streaming its weights (ops/pdl.py)
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    if GATHER:  # embedding lookups: x row = x_idx[row], residual row = r_idx[row] + r_offset
        x_row = tl.load(x_idx_ptr + row).to(tl.int64)
        r_row = row
        if HAS_RESIDUAL:
            r_row = tl.load(r_idx_ptr + row).to(tl.int64) + r_offset
    else:
        x_row = row
        r_row = row
    h = tl.load(x_ptr + x_row * stride_x + c, mask=mask, other=0.0).to(tl.float32)  # [BC]
    if HAS_RESIDUAL:
        h += tl.load(res_ptr + r_row * stride_r + c, mask=mask, other=0.0).to(tl.float32)
    h_rounded = h.to(res_out_ptr.dtype.element_ty)
    tl.store(res_out_ptr + row * stride_ro + c, h_rounded, mask=mask)
    h = h_rounded.to(tl.float32)
    mean = tl.sum(h, axis=0) / HIDDEN
    diff = tl.where(mask, h - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / HIDDEN + eps)
    y = diff * rstd * w + b
    tl.store(out_ptr + row * stride_o + c, y.to(out_ptr.dtype.element_ty), mask=mask)


def row_num_warps(block: int) -> int:
    """Warps for a one-row-per-program kernel: ~8 elements per thread, 1..16 warps."""
    return max(1, min(16, block // 256))


def add_layernorm(
    x: torch.Tensor,  # [num_tokens, hidden]
    residual: torch.Tensor | None,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    bias: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # normed [T, C], residual_out [T, C]
    assert x.dim() == 2 and x.stride(1) == 1, (x.shape, x.stride())
    num_tokens, hidden = x.shape
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(1) == 1 and residual.dtype == x.dtype
    assert weight.shape == (hidden,) and bias.shape == (hidden,), (weight.shape, bias.shape)
    assert weight.is_contiguous() and bias.is_contiguous()
    res = residual if residual is not None else x
    return _launch(num_tokens, x, res, weight, bias, eps, residual is not None)


def _launch(num_tokens, x, res, weight, bias, eps, has_residual, gather=None):
    """One program per output row; gather = (x row ids, residual row ids, residual row offset)
    reads rows of x / res by index (embedding lookups) instead of row by row."""
    hidden = x.shape[1]
    out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)  # [T, C]
    res_out = torch.empty_like(out)  # [T, C]
    if num_tokens == 0:
        return out, res_out
    block = triton.next_power_of_2(hidden)
    _add_layernorm_kernel[(num_tokens,)](
        out, res_out, x, res, weight, bias,
        out.stride(0), res_out.stride(0), x.stride(0), res.stride(0),
        eps, *(gather or (out, out, 0)),
        HIDDEN=hidden, BLOCK_C=block, HAS_RESIDUAL=has_residual, PDL_TRIGGER=pdl.trigger(x),
        GATHER=gather is not None, num_warps=row_num_warps(block), **pdl.launch(x),
    )
    return out, res_out


def embed_layernorm(
    ids: torch.Tensor,  # [T] int64 token ids
    table: torch.Tensor,  # [V, C] token embeddings
    pos_ids: torch.Tensor,  # [T] int64 positions
    pos_table: torch.Tensor,  # [P, C] position embeddings
    pos_offset: int,  # row of position p is pos_table[p + pos_offset] (OPT: 2)
    weight: torch.Tensor,  # [C]
    bias: torch.Tensor,  # [C]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # normed [T, C], residual_out [T, C]
    """add_layernorm(table[ids], pos_table[pos_ids + pos_offset]) in one launch: the two lookups,
    the add (rounded to the model dtype) and the first LayerNorm."""
    num_tokens, hidden = ids.shape[0], table.shape[1]
    assert ids.dim() == 1 and pos_ids.shape == ids.shape and ids.is_contiguous() and pos_ids.is_contiguous()
    assert table.stride(1) == 1 and pos_table.stride(1) == 1 and pos_table.shape[1] == hidden
    assert table.dtype == pos_table.dtype and weight.shape == (hidden,) and bias.shape == (hidden,)
    return _launch(num_tokens, table, pos_table, weight, bias, eps, True, (ids, pos_ids, pos_offset))
