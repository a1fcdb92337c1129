"""Paged decode attention (Triton): one query token per row against its paged KV cache.

One program owns (row, kv head, split): it loads the query heads of that kv head's group once and
streams the row's KV blocks through an online softmax, so GQA reads each KV block once per group.
The group's query heads are padded to 16 rows and multiplied with tl.dot even for MHA (group 1):
the wasted MMA work is free in this memory-bound kernel, and dot operands are what Triton's
software pipeliner streams through shared memory with cp.async (num_stages deep), which the
broadcast-and-sum variant (use_dot=False) does not get (checked in the sm_90 PTX). Tokens are
gathered per tile of BLOCK_N positions through the block table, so block tables may be arbitrary
and tiles may span several cache blocks.

Split-K (flash-decoding): when batch * num_kv_heads is too small to fill the GPU, each row's context
is cut into partitions of `partition_size` tokens, every partition writes a partial (normalised
output, running max, sum of exponentials) and a second kernel merges them. The number of splits is
derived from host-known shapes only (block_tables.shape[1]), never from seq_lens, so the launch is
CUDA-graph safe; partitions past a row's length exit at once.

Append variant (paged_decode_attention_append, APPEND=True): the decode step's KV-cache write fused
into the attention launch. seq_lens count the current token; the cache is read for positions
0..seq_len-2 only and the current token's score and value come from key/value (the step's k/v
rows) directly, so nothing in the launch reads what it writes. The program that owns the row's
last position (the only program for no split; with split-K the split holding position seq_len-1,
split 0 for seq_len 0) folds the current token into its softmax and writes key/value for its kv
head into the cache at slot_mapping[row] (< 0 skips): each (row, kv head) is written exactly once.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _paged_decode_kernel(
    out_ptr, part_out_ptr, part_m_ptr, part_l_ptr,
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    k_new_ptr, v_new_ptr, slots_ptr,  # APPEND: the step's [B, Hkv, D] key/value rows, [B] int64 slots
    qk_scale_log2,  # softmax scale * log2(e): scores live in the log2 domain
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_knb, stride_knh, stride_vnb, stride_vnh,  # APPEND: key/value strides (head_size stride 1)
    stride_cb, stride_ct, stride_ch,  # cache strides (block, slot, kv head); head_size stride 1
    stride_btb,
    num_splits, tokens_per_split,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_DOT: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr, APPEND: tl.constexpr,
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + row)
    start = split * tokens_per_split
    if APPEND:
        # the cache holds positions 0..seq_len-2; the program owning position seq_len-1 (split 0
        # for an empty row, so that a slot >= 0 is written whatever seq_len says) adds the rest
        last = tl.maximum(seq_len - 1, 0)
        owner = (last >= start) & (last < start + tokens_per_split)
        end = tl.minimum(seq_len - 1, start + tokens_per_split)
    else:
        end = tl.minimum(seq_len, start + tokens_per_split)
    if SPLIT:
        if APPEND:
            if start > last:
                return  # the merge kernel only reads partitions below seq_len
        else:
            if start >= seq_len:
                return  # the merge kernel only reads partitions below seq_len

    g = tl.arange(0, GROUP_PAD)  # [GP] query heads of this kv head
    d = tl.arange(0, BLOCK_D)  # [BD]
    g_mask = g < GROUP
    d_mask = d < HEAD_SIZE
    heads = kv_head * GROUP + g  # [GP]
    q = tl.load(
        q_ptr + row * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :], other=0.0,
    )  # [GP, BD]
    if not USE_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([GROUP_PAD], tl.float32)  # running sum of exp2
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + row * stride_btb
    head_off = kv_head * stride_ch
    for tok0 in range(start, end, BLOCK_N):
        tok = tok0 + tl.arange(0, BLOCK_N)  # [BN]
        t_mask = tok < end
        blk = tl.load(bt_row + tok // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)  # [BN]
        off = blk * stride_cb + (tok % BLOCK_SIZE) * stride_ct + head_off  # [BN]
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
        v = tl.load(v_cache_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
        if USE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=tl.float32)  # [GP, BN]
        else:
            s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)  # [GP, BN]
        s = tl.where(t_mask[None, :], s * qk_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [GP], finite: the tile has a live token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # [GP, BN]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if USE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION,
                        out_dtype=tl.float32)  # [GP, BD]
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)  # [GP, BD]
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if APPEND:
        if owner:
            kn = tl.load(k_new_ptr + row * stride_knb + kv_head * stride_knh + d, mask=d_mask,
                         other=0.0)  # [BD]
            vn = tl.load(v_new_ptr + row * stride_vnb + kv_head * stride_vnh + d, mask=d_mask,
                         other=0.0)  # [BD]
            slot = tl.load(slots_ptr + row)  # int64
            if slot >= 0:
                dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct + head_off
                tl.store(k_cache_ptr + dst + d, kn.to(k_cache_ptr.dtype.element_ty), mask=d_mask)
                tl.store(v_cache_ptr + dst + d, vn.to(v_cache_ptr.dtype.element_ty), mask=d_mask)
            if seq_len > 0:  # the current token: one more online-softmax step, from registers
                s_cur = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], axis=1) * qk_scale_log2
                m_new = tl.maximum(m_i, s_cur)  # [GP], finite
                alpha = tl.exp2(m_i - m_new)
                p_cur = tl.exp2(s_cur - m_new)  # [GP]
                l_i = l_i * alpha + p_cur
                acc = acc * alpha[:, None] + p_cur[:, None] * vn.to(tl.float32)[None, :]
                m_i = m_new

    o = tl.where(l_i[:, None] > 0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)  # [GP, BD]
    o_mask = g_mask[:, None] & d_mask[None, :]
    if SPLIT:
        part = (row * (GROUP * tl.num_programs(1)) + heads) * num_splits + split  # [GP]
        tl.store(part_out_ptr + part[:, None] * BLOCK_D + d[None, :], o, mask=o_mask)
        tl.store(part_m_ptr + part, m_i, mask=g_mask)
        tl.store(part_l_ptr + part, l_i, mask=g_mask)
    else:
        tl.store(
            out_ptr + row * stride_ob + heads[:, None] * stride_oh + d[None, :],
            o.to(out_ptr.dtype.element_ty), mask=o_mask,
        )


@triton.jit
def _merge_splits_kernel(
    out_ptr, part_out_ptr, part_m_ptr, part_l_ptr, seq_lens_ptr,
    stride_ob, stride_oh,
    num_heads, num_splits, tokens_per_split,
    HEAD_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_PAD: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + row)
    live = (seq_len + tokens_per_split - 1) // tokens_per_split  # partitions holding tokens
    sp = tl.arange(0, SPLIT_PAD)  # [SP]
    d = tl.arange(0, BLOCK_D)  # [BD]
    s_mask = sp < live
    part = (row * num_heads + head) * num_splits + sp  # [SP]
    m = tl.load(part_m_ptr + part, mask=s_mask, other=float("-inf"))  # [SP]
    l = tl.load(part_l_ptr + part, mask=s_mask, other=0.0)  # [SP]
    m_max = tl.maximum(tl.max(m, axis=0), -1e30)  # finite even with no live partition
    w = tl.where(s_mask, tl.exp2(m - m_max) * l, 0.0)  # [SP]
    o = tl.load(part_out_ptr + part[:, None] * BLOCK_D + d[None, :],
                mask=s_mask[:, None], other=0.0)  # [SP, BD]
    total = tl.sum(w, axis=0)
    res = tl.sum(w[:, None] * o, axis=0) / tl.maximum(total, 1e-30)  # [BD]
    res = tl.where(total > 0, res, 0.0)
    tl.store(out_ptr + row * stride_ob + head * stride_oh + d, res.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_SIZE)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _auto_partition(query: torch.Tensor, num_kv_heads: int, max_len: int, block_n: int) -> int:
    """Split-K only when batch * kv heads leaves the GPU short of programs (host shapes only).

    The partition is a fixed token count rather than max_len / splits: block tables are sized for
    max_model_len, usually far beyond the live context, and a fixed partition spreads whatever
    context the rows really have (partitions past seq_len exit at once)."""
    env = os.environ.get("HYBRID_DECODE_PARTITION")
    if env is not None:
        return int(env)
    if query.device.type != "cuda":
        return 0
    programs = query.shape[0] * num_kv_heads
    if programs >= 2 * _num_sms(query.device.index or 0):
        return 0
    part = max(256, block_n)
    return part if part < max_len else 0


def paged_decode_attention(
    query: torch.Tensor,  # [batch, num_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    block_tables: torch.Tensor,  # [batch, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [batch] int32
    scale: float,
    *,
    partition_size: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    use_dot: bool = True,
) -> torch.Tensor:  # [batch, num_heads, head_size]
    """partition_size: tokens per split (multiple of block_n), 0 = no split, None = by shapes.
    block_n / num_warps / num_stages / use_dot: tuning knobs (bench/kernels/sweep_paged_attention).
    """
    return _paged_decode(query, key_cache, value_cache, block_tables, seq_lens, scale, None,
                         partition_size, block_n, num_warps, num_stages, use_dot)


def paged_decode_attention_append(
    query: torch.Tensor,  # [batch, num_heads, head_size]
    key: torch.Tensor,  # [batch, num_kv_heads, head_size]: the step's keys (position seq_len - 1)
    value: torch.Tensor,  # [batch, num_kv_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size], written in place
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size], written in place
    slot_mapping: torch.Tensor,  # [batch] int64; < 0 skips the write
    block_tables: torch.Tensor,  # [batch, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [batch] int32, counting the current token
    scale: float,
    *,
    partition_size: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    use_dot: bool = True,
) -> torch.Tensor:  # [batch, num_heads, head_size]
    """write_kv_cache(key, value, caches, slot_mapping) then paged_decode_attention(...) in one
    launch (plus the split merge), for slot_mapping[b] = the slot of position seq_lens[b] - 1 in
    row b's block table (as decode_prepare makes them). Same knobs as paged_decode_attention."""
    batch, num_kv_heads, head_size = key.shape
    assert value.shape == key.shape and key.shape[0] == query.shape[0], (query.shape, key.shape)
    assert key_cache.shape[2:] == (num_kv_heads, head_size), (key_cache.shape, key.shape)
    assert key.stride(2) == 1 and value.stride(2) == 1, "key/value head_size stride must be 1"
    assert key.dtype == value.dtype == key_cache.dtype, (key.dtype, key_cache.dtype)
    assert slot_mapping.dtype == torch.int64 and slot_mapping.shape == (batch,)
    assert slot_mapping.is_contiguous()
    return _paged_decode(query, key_cache, value_cache, block_tables, seq_lens, scale,
                         (key, value, slot_mapping), partition_size, block_n, num_warps,
                         num_stages, use_dot)


def _paged_decode(query, key_cache, value_cache, block_tables, seq_lens, scale, new,
                  partition_size, block_n, num_warps, num_stages, use_dot) -> torch.Tensor:
    """Shared launcher; new = (key, value, slot_mapping) selects the append variant."""
    batch, num_heads, head_size = query.shape
    num_blocks, block_size, num_kv_heads, cache_head_size = key_cache.shape
    assert cache_head_size == head_size, (key_cache.shape, query.shape)
    assert value_cache.shape == key_cache.shape and value_cache.stride() == key_cache.stride()
    assert key_cache.is_contiguous(), "key/value cache must be contiguous"
    assert key_cache.dtype == value_cache.dtype == query.dtype, (query.dtype, key_cache.dtype)
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert query.stride(2) == 1, "query head_size stride must be 1"
    assert block_tables.dtype == torch.int32 and block_tables.dim() == 2
    assert block_tables.shape[0] == batch and block_tables.stride(1) == 1
    assert seq_lens.dtype == torch.int32 and seq_lens.shape == (batch,) and seq_lens.is_contiguous()
    assert block_size & (block_size - 1) == 0, "block_size must be a power of two"
    group = num_heads // num_kv_heads
    use_dot = use_dot or group > 1
    group_pad = max(16, triton.next_power_of_2(group)) if use_dot else 1
    block_d = max(16, triton.next_power_of_2(head_size))
    if block_n is None:
        block_n = 64 if block_d <= 64 else 32
    max_len = block_tables.shape[1] * block_size
    if partition_size is None:
        partition_size = _auto_partition(query, num_kv_heads, max_len, block_n)
    if num_warps is None:
        num_warps = 4
    kwargs = {} if num_stages is None else {"num_stages": num_stages}
    out = torch.empty_like(query)  # [B, H, D]
    if batch == 0:
        return out
    split = 0 < partition_size < max_len
    num_splits = triton.cdiv(max_len, partition_size) if split else 1
    tokens_per_split = partition_size if split else max(max_len, 1)
    assert not split or partition_size % block_n == 0, (partition_size, block_n)
    if split:
        part_out = torch.empty(batch, num_heads, num_splits, block_d, device=query.device,
                               dtype=torch.float32)  # [B, H, S, BD]
        part_m = torch.empty(batch, num_heads, num_splits, device=query.device,
                             dtype=torch.float32)  # [B, H, S]
        part_l = torch.empty_like(part_m)  # [B, H, S]
    else:
        part_out = part_m = part_l = out
    if new is None:
        k_new = v_new = query  # unused (APPEND=False)
        slots = seq_lens
    else:
        k_new, v_new, slots = new
    _paged_decode_kernel[(batch, num_kv_heads, num_splits)](
        out, part_out, part_m, part_l,
        query, key_cache, value_cache, block_tables, seq_lens,
        k_new, v_new, slots,
        scale * _LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_tables.stride(0),
        num_splits, tokens_per_split,
        GROUP=group, GROUP_PAD=group_pad, HEAD_SIZE=head_size, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, USE_DOT=use_dot, SPLIT=split,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32", APPEND=new is not None,
        num_warps=num_warps, **kwargs,
    )
    if split:
        _merge_splits_kernel[(batch, num_heads)](
            out, part_out, part_m, part_l, seq_lens,
            out.stride(0), out.stride(1),
            num_heads, num_splits, tokens_per_split,
            HEAD_SIZE=head_size, BLOCK_D=block_d,
            SPLIT_PAD=max(2, triton.next_power_of_2(num_splits)),
            num_warps=4 if block_d >= 128 else 2,
        )
    return out
