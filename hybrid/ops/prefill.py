"""Causal variable-length prefill attention (Triton flash attention over packed sequences).

Sequences are packed along the token axis and delimited by cu_seqlens; one program owns a tile of
BLOCK_M queries of one (sequence, head) and streams the causal prefix of its keys through an online
softmax. GQA maps query head h to kv head h // (num_heads / num_kv_heads). fp32 inputs multiply in
IEEE fp32 (no tf32) so the fp32 tests compare tightly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    out_ptr, q_ptr, k_ptr, v_ptr, cu_seqlens_ptr,
    qk_scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    m_block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    seq_start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    seq_len = (tl.load(cu_seqlens_ptr + seq + 1) - seq_start).to(tl.int32)
    m_start = m_block * BLOCK_M
    if m_start >= seq_len:
        return
    kv_head = head // GROUP
    m = m_start + tl.arange(0, BLOCK_M)  # [BM] positions in the sequence
    d = tl.arange(0, BLOCK_D)  # [BD]
    m_mask = m < seq_len
    d_mask = d < HEAD_SIZE
    q = tl.load(q_ptr + (seq_start + m[:, None]) * stride_qt + head * stride_qh + d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [BM, BD]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = tl.minimum(seq_len, m_start + BLOCK_M)  # causal: keys up to the tile's last query
    for n0 in range(0, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)  # [BN]
        n_mask = n < end
        kv_mask = n_mask[:, None] & d_mask[None, :]
        rows = seq_start + n[:, None]
        k = tl.load(k_ptr + rows * stride_kt + kv_head * stride_kh + d[None, :], mask=kv_mask,
                    other=0.0)  # [BN, BD]
        v = tl.load(v_ptr + rows * stride_vt + kv_head * stride_vh + d[None, :], mask=kv_mask,
                    other=0.0)  # [BN, BD]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=tl.float32)  # [BM, BN]
        causal = (n[None, :] <= m[:, None]) & n_mask[None, :]
        s = tl.where(causal, s * qk_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: key 0 is visible to every query
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION,
                                             out_dtype=tl.float32)
        m_i = m_new
    o = acc / l_i[:, None]
    tl.store(out_ptr + (seq_start + m[:, None]) * stride_ot + head * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    cu_seqlens: torch.Tensor,  # [batch + 1] int32
    max_seqlen: int,
    scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_size]
    num_tokens, num_heads, head_size = query.shape
    assert key.shape == value.shape and key.shape[0] == num_tokens and key.shape[2] == head_size
    num_kv_heads = key.shape[1]
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert query.stride(2) == 1 and key.stride(2) == 1 and value.stride(2) == 1
    assert query.dtype == key.dtype == value.dtype, (query.dtype, key.dtype, value.dtype)
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.dim() == 1 and cu_seqlens.is_contiguous()
    out = torch.empty(query.shape, device=query.device, dtype=query.dtype)  # [T, H, D]
    batch = cu_seqlens.shape[0] - 1
    if num_tokens == 0 or batch == 0 or max_seqlen == 0:
        return out
    block_d = max(16, triton.next_power_of_2(head_size))
    block_m = block_m or (128 if block_d <= 64 and query.is_cuda else 64)
    block_n = block_n or 64
    if query.device.type != "cuda":
        block_m, block_n = min(block_m, 32), min(block_n, 32)  # interpreter: small tiles
    kwargs = {} if num_stages is None else {"num_stages": num_stages}
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(max_seqlen, block_m), batch, num_heads)
    _prefill_kernel[grid](
        out, query, key, value, cu_seqlens,
        scale * _LOG2E,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        value.stride(0), value.stride(1), out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads, HEAD_SIZE=head_size, BLOCK_D=block_d,
        BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=precision,
        num_warps=num_warps or (8 if block_m * block_d >= 128 * 128 else 4), **kwargs,
    )
    return out
