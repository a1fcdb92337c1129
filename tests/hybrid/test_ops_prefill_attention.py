"""Causal varlen prefill attention (Triton interpreter) against SDPA per sequence, and the SDPA
reference against a hand-written causal softmax."""
import pytest
import torch

from hybrid.ops import reference
from hybrid.ops.prefill import prefill_attention
from hybrid.ops.testing import assert_matches, poisoned_allocations


def _packed(seq_lens, num_heads, num_kv_heads, head_size, seed):
    torch.manual_seed(seed)
    total = sum(seq_lens)
    q = torch.randn(total, num_heads, head_size)  # [T, H, D]
    k = torch.randn(total, num_kv_heads, head_size)  # [T, Hkv, D]
    v = torch.randn(total, num_kv_heads, head_size)  # [T, Hkv, D]
    cu = torch.tensor([0] + torch.tensor(seq_lens).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, cu


@pytest.mark.parametrize("num_heads,num_kv_heads,head_size", [(2, 2, 64), (8, 2, 64), (8, 1, 80)])
def test_prefill_matches_reference(num_heads, num_kv_heads, head_size):
    seq_lens = [7, 1, 0, 45]
    q, k, v, cu = _packed(seq_lens, num_heads, num_kv_heads, head_size, seed=num_heads)
    scale = head_size ** -0.5
    ref = reference.prefill_attention(q, k, v, cu, max(seq_lens), scale)
    with poisoned_allocations():
        out = prefill_attention(q, k, v, cu, max(seq_lens), scale)
    assert_matches(out, ref, what="prefill_attention")


def test_prefill_reference_is_causal_softmax():
    q, k, v, cu = _packed([5, 3], 4, 2, 8, seed=1)
    out = reference.prefill_attention(q, k, v, cu, 5, 0.5)
    for start, end in [(0, 5), (5, 8)]:
        n = end - start
        kk = k[start:end].repeat_interleave(2, dim=1)  # [n, H, D]
        vv = v[start:end].repeat_interleave(2, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[start:end], kk) * 0.5
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(out[start:end],
                                   torch.einsum("hqk,khd->qhd", s.softmax(-1), vv))
