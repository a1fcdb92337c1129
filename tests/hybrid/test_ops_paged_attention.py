"""Paged decode attention (Triton, through the interpreter on CPU) against the torch reference.

fp32, small odd shapes: MHA and GQA ratios 1/4/8, random disjoint non-contiguous block tables drawn
from a large pool, seq_lens varying per row (0, 1, a block boundary, several blocks), with and
without split-K, outputs poisoned before the run.
"""
import pytest
import torch

from hybrid.ops import reference
from hybrid.ops.paged_attention import paged_decode_attention
from hybrid.ops.testing import (assert_matches, poisoned_allocations, random_block_tables,
                                random_kv_cache)


def _case(num_heads, num_kv_heads, head_size, block_size, seq_lens, num_blocks, max_blocks, seed):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    key_cache, value_cache = random_kv_cache(num_blocks, block_size, num_kv_heads, head_size,
                                             torch.float32)
    block_tables = random_block_tables(seq_lens, block_size, num_blocks, max_blocks, g)
    query = torch.randn(len(seq_lens), num_heads, head_size)  # [B, H, D]
    return query, key_cache, value_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32)


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_size,block_size,partition",
    [
        (4, 4, 64, 16, 0),  # MHA, one pass
        (4, 4, 64, 16, 32),  # MHA, split-K (partition of 2 blocks)
        (8, 2, 64, 16, 64),  # GQA 4, split-K
        (8, 1, 64, 8, 0),  # GQA 8 (MQA), block_size 8
        (3, 3, 80, 16, 32),  # odd head count, non-power-of-two head_size
        (2, 2, 64, 16, -1),  # MHA through the broadcast-and-sum variant (use_dot=False)
    ],
)
def test_paged_decode_matches_reference(num_heads, num_kv_heads, head_size, block_size, partition):
    seq_lens = [37, 0, 1, 2 * block_size, 91]
    max_blocks = 12
    q, kc, vc, bt, sl = _case(num_heads, num_kv_heads, head_size, block_size, seq_lens,
                              num_blocks=4096, max_blocks=max_blocks, seed=num_heads * 7 + partition + 1)
    scale = head_size ** -0.5
    ref = reference.paged_decode_attention(q, kc, vc, bt, sl, scale)
    with poisoned_allocations():
        out = paged_decode_attention(q, kc, vc, bt, sl, scale, partition_size=max(partition, 0),
                                     block_n=32, use_dot=partition >= 0)
    assert_matches(out, ref, what="paged_decode_attention")
    assert torch.equal(out[1], torch.zeros_like(out[1])), "seq_len 0 must give zeros"


def test_paged_decode_reference_matches_dense_attention():
    """The reference itself: gather by block table == plain softmax attention over the tokens."""
    q, kc, vc, bt, sl = _case(8, 2, 16, 4, [5, 13], num_blocks=64, max_blocks=4, seed=3)
    out = reference.paged_decode_attention(q, kc, vc, bt, sl, 0.3)
    for row, n in enumerate(sl.tolist()):
        slots = [int(bt[row, t // 4]) * 4 + t % 4 for t in range(n)]
        k = kc.view(-1, 2, 16)[slots].repeat_interleave(4, dim=1)  # [n, H, D]
        v = vc.view(-1, 2, 16)[slots].repeat_interleave(4, dim=1)  # [n, H, D]
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[row], k) * 0.3, dim=-1)
        torch.testing.assert_close(out[row], torch.einsum("hn,nhd->hd", p, v))


def test_paged_decode_rejects_bad_inputs():
    q, kc, vc, bt, sl = _case(4, 4, 64, 16, [5], num_blocks=8, max_blocks=2, seed=0)
    with pytest.raises(AssertionError):
        paged_decode_attention(q, kc, vc, bt.long(), sl, 1.0)  # block tables must be int32
    with pytest.raises(AssertionError):
        paged_decode_attention(q[:, :3], kc, vc, bt, sl, 1.0)  # 3 heads over 4 kv heads
