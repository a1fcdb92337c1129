"""KV-cache write by slot mapping (Triton interpreter) against the torch reference."""
import pytest
import torch

from hybrid.ops import reference
from hybrid.ops.cache_write import write_kv_cache


@pytest.mark.parametrize("num_kv_heads,head_size", [(2, 64), (3, 80)])
def test_write_kv_cache_scatters_and_skips_padding(num_kv_heads, head_size):
    torch.manual_seed(num_kv_heads)
    num_blocks, block_size, num_tokens = 512, 16, 7
    key_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_size)
    value_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_size)
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]  # [T] distinct, scattered
    slots[[2, 5]] = -1  # padding rows
    # key/value as strided views of a fused qkv row, as the models produce them
    qkv = torch.randn(num_tokens, 4 * num_kv_heads * head_size)
    key = qkv[:, : num_kv_heads * head_size].view(num_tokens, num_kv_heads, head_size)
    value = qkv[:, 2 * num_kv_heads * head_size: 3 * num_kv_heads * head_size].view(
        num_tokens, num_kv_heads, head_size)
    before = key_cache.clone()
    ref_k, ref_v = key_cache.clone(), value_cache.clone()
    reference.write_kv_cache(key, value, ref_k, ref_v, slots)
    write_kv_cache(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache, ref_k) and torch.equal(value_cache, ref_v)
    flat = key_cache.view(-1, num_kv_heads, head_size)
    assert torch.equal(flat[slots[0]], key[0]), "token 0 landed in its slot"
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    assert torch.equal(flat[~written], before.view(-1, num_kv_heads, head_size)[~written])


def test_write_kv_cache_rejects_int32_slots():
    kc = torch.randn(4, 16, 2, 64)
    k = torch.randn(3, 2, 64)
    with pytest.raises(AssertionError):
        write_kv_cache(k, k, kc, kc.clone(), torch.zeros(3, dtype=torch.int32))
