"""KV-cache write by slot mapping (Triton): scatter this step's keys and values into the pool.

One program per token copies the token's [num_kv_heads, head_size] key and value rows to
slot = block * block_size + offset of the paged pool; a negative slot (batch padding) is skipped,
so padded CUDA-graph buckets need no host-side trimming.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybrid.ops import pdl


@triton.jit
def _write_kv_cache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    NUM_KV_HEADS: tl.constexpr, HEAD_SIZE: tl.constexpr,
    HEADS_PAD: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False,
):
    if PDL:  # PDL-launched (ops/pdl.py): nothing is touched before the previous kernel ends
        pdl.prologue()
    tok = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + tok)  # int64
    if slot < 0:
        return  # padding token
    h = tl.arange(0, HEADS_PAD)  # [HP]
    d = tl.arange(0, BLOCK_D)  # [BD]
    mask = (h[:, None] < NUM_KV_HEADS) & (d[None, :] < HEAD_SIZE)
    k = tl.load(key_ptr + tok * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(value_ptr + tok * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    # the cache is contiguous: a slot's [num_kv_heads, head_size] rows are one contiguous run
    dst = slot * (NUM_KV_HEADS * HEAD_SIZE) + h[:, None] * HEAD_SIZE + d[None, :]  # [HP, BD]
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; < 0 skips the token
) -> None:
    num_tokens, num_kv_heads, head_size = key.shape
    assert value.shape == key.shape, (key.shape, value.shape)
    assert key_cache.shape[2:] == (num_kv_heads, head_size), (key_cache.shape, key.shape)
    assert value_cache.shape == key_cache.shape
    assert key_cache.is_contiguous() and value_cache.is_contiguous(), "cache must be contiguous"
    assert key.stride(2) == 1 and value.stride(2) == 1, "head_size stride must be 1"
    assert slot_mapping.dtype == torch.int64 and slot_mapping.shape == (num_tokens,)
    assert slot_mapping.is_contiguous()
    assert key.dtype == value.dtype and key_cache.dtype == value_cache.dtype
    if num_tokens == 0:
        return
    heads_pad = triton.next_power_of_2(num_kv_heads)
    block_d = triton.next_power_of_2(head_size)
    elems = heads_pad * block_d
    _write_kv_cache_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEAD_SIZE=head_size, HEADS_PAD=heads_pad, BLOCK_D=block_d,
        num_warps=max(1, min(16, elems // 512)), **pdl.launch(key),
    )
