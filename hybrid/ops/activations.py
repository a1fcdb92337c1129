"""Fused activations (Triton): ReLU (OPT's MLP) and SiLU-and-multiply (LLaMA's SwiGLU).

silu_and_mul reads the fused gate|up projection [T, 2 * inter] once and writes [T, inter], so the
MLP's middle activation crosses memory once instead of three times. Math in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybrid.ops import pdl

_BLOCK = 1024


@triton.jit
def _relu_kernel(out_ptr, x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    # in fp32 (exact for every input dtype): the Triton interpreter's maximum on bf16 compares the
    # raw 16-bit patterns and let negatives through
    tl.store(out_ptr + offs, tl.maximum(x.to(tl.float32), 0.0).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul_kernel(out_ptr, x_ptr, stride_x, stride_o, inter, BLOCK: tl.constexpr,
                         PDL: tl.constexpr = False):
    if PDL:  # PDL-launched (ops/pdl.py): nothing is touched before the previous kernel ends
        pdl.prologue()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def relu(x: torch.Tensor) -> torch.Tensor:
    assert x.is_contiguous(), "relu expects a contiguous tensor"
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        _relu_kernel[(triton.cdiv(n, _BLOCK),)](out, x, n, BLOCK=_BLOCK, num_warps=4)
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # x: [num_tokens, 2 * inter] -> [T, inter]
    assert x.dim() == 2 and x.stride(1) == 1 and x.shape[1] % 2 == 0, (x.shape, x.stride())
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(num_tokens, inter, device=x.device, dtype=x.dtype)  # [T, I]
    if num_tokens:
        grid = (num_tokens, triton.cdiv(inter, _BLOCK))
        _silu_and_mul_kernel[grid](out, x, x.stride(0), out.stride(0), inter, BLOCK=_BLOCK,
                                   num_warps=4, **pdl.launch(x))
    return out
