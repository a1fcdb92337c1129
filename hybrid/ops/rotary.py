"""Rotary position embedding applied in place to query and key (Triton).

cos_sin_cache[pos] holds cos in its first rot_dim/2 entries and sin in the rest. Neox style (HF
LLaMA's rotate_half) pairs feature i with i + rot_dim/2; GPT-J style pairs 2i with 2i + 1. Features
past rot_dim (partial rotary) are left alone. One program per token rotates all its query and key
heads, reading the cache row once; query and key may be strided views of a fused qkv output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybrid.ops import pdl

from hybrid.ops.layernorm import row_num_warps


@triton.jit
def _rotate(ptr, stride_h, cos, sin, NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
            HALF: tl.constexpr, HALF_PAD: tl.constexpr, IS_NEOX: tl.constexpr):
    h = tl.arange(0, HEADS_PAD)  # [HP]
    j = tl.arange(0, HALF_PAD)  # [HH]
    if IS_NEOX:
        i1 = j
        i2 = j + HALF
    else:
        i1 = 2 * j
        i2 = 2 * j + 1
    mask = (h[:, None] < NUM_HEADS) & (j[None, :] < HALF)
    p1 = ptr + h[:, None] * stride_h + i1[None, :]  # [HP, HH]
    p2 = ptr + h[:, None] * stride_h + i2[None, :]  # [HP, HH]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(p1, o1.to(ptr.dtype.element_ty), mask=mask)
    tl.store(p2, o2.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr, q_ptr, k_ptr, cache_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr, K_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, IS_NEOX: tl.constexpr, PDL: tl.constexpr = False,
):
    if PDL:  # PDL-launched (ops/pdl.py): nothing is touched before the previous kernel ends
        pdl.prologue()
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok)
    j = tl.arange(0, HALF_PAD)
    jm = j < HALF
    cos = tl.load(cache_ptr + pos * stride_cache + j, mask=jm, other=0.0).to(tl.float32)  # [HH]
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + j, mask=jm, other=0.0).to(tl.float32)
    _rotate(q_ptr + tok * stride_qt, stride_qh, cos, sin, NUM_HEADS, Q_HEADS_PAD, HALF, HALF_PAD,
            IS_NEOX)
    _rotate(k_ptr + tok * stride_kt, stride_kh, cos, sin, NUM_KV_HEADS, K_HEADS_PAD, HALF,
            HALF_PAD, IS_NEOX)


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_size], rotated in place
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size], rotated in place
    cos_sin_cache: torch.Tensor,  # [max_position, rot_dim]
    is_neox: bool = True,
) -> None:
    num_tokens, num_heads, head_size = query.shape
    assert key.dim() == 3 and key.shape[0] == num_tokens and key.shape[2] == head_size, key.shape
    num_kv_heads = key.shape[1]
    rot_dim = cos_sin_cache.shape[1]
    assert rot_dim % 2 == 0 and rot_dim <= head_size, (rot_dim, head_size)
    assert cos_sin_cache.stride(1) == 1, "cos_sin_cache rows must be contiguous"
    assert query.stride(2) == 1 and key.stride(2) == 1, "head_size stride must be 1"
    assert positions.dtype == torch.int64 and positions.shape == (num_tokens,)
    assert positions.is_contiguous()
    if num_tokens == 0:
        return
    half = rot_dim // 2
    half_pad = triton.next_power_of_2(half)
    q_pad = triton.next_power_of_2(num_heads)
    _rotary_kernel[(num_tokens,)](
        positions, query, key, cos_sin_cache,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), cos_sin_cache.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
        Q_HEADS_PAD=q_pad, K_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HALF=half, HALF_PAD=half_pad, IS_NEOX=is_neox,
        num_warps=row_num_warps(q_pad * half_pad), **pdl.launch(query),
    )
