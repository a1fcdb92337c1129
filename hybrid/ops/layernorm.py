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
    eps,
    HIDDEN: tl.constexpr, BLOCK_C: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL_TRIGGER: tl.constexpr = False,
):
    if PDL_TRIGGER:  # a PDL-launched GEMM after this may start streaming its weights (ops/pdl.py)
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    mask = c < HIDDEN
    h = tl.load(x_ptr + row * stride_x + c, mask=mask, other=0.0).to(tl.float32)  # [BC]
    if HAS_RESIDUAL:
        h += tl.load(res_ptr + row * stride_r + c, mask=mask, other=0.0).to(tl.float32)
    h_rounded = h.to(res_out_ptr.dtype.element_ty)
    tl.store(res_out_ptr + row * stride_ro + c, h_rounded, mask=mask)
    h = h_rounded.to(tl.float32)
    mean = tl.sum(h, axis=0) / HIDDEN
    diff = tl.where(mask, h - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / HIDDEN + eps)
    w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
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
    out = torch.empty_like(x, memory_format=torch.contiguous_format)  # [T, C]
    res_out = torch.empty_like(out)  # [T, C]
    if num_tokens == 0:
        return out, res_out
    block = triton.next_power_of_2(hidden)
    res = residual if residual is not None else x
    _add_layernorm_kernel[(num_tokens,)](
        out, res_out, x, res, weight, bias,
        out.stride(0), res_out.stride(0), x.stride(0), res.stride(0),
        eps,
        HIDDEN=hidden, BLOCK_C=block, HAS_RESIDUAL=residual is not None, PDL_TRIGGER=pdl.trigger(x),
        num_warps=row_num_warps(block),
    )
    return out, res_out
