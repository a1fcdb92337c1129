"""Rotary embedding in place (Triton interpreter) against the reference, and the reference against
HF LLaMA's rotate_half formula."""
import pytest
import torch

from hybrid.ops import reference
from hybrid.ops.rotary import rotary_embedding


def _cos_sin_cache(max_pos, rot_dim, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2).float() / rot_dim)  # [rot/2]
    freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)  # [max_pos, rot/2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [max_pos, rot_dim]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_size,rot_dim,is_neox",
                         [(4, 4, 64, 64, True), (8, 2, 64, 64, True), (8, 1, 80, 32, False)])
def test_rotary_matches_reference(num_heads, num_kv_heads, head_size, rot_dim, is_neox):
    torch.manual_seed(num_heads + rot_dim)
    T = 7
    qkv = torch.randn(T, (num_heads + 2 * num_kv_heads) * head_size)  # fused projection output
    q = qkv[:, : num_heads * head_size].view(T, num_heads, head_size)
    k = qkv[:, num_heads * head_size: (num_heads + num_kv_heads) * head_size].view(
        T, num_kv_heads, head_size)
    positions = torch.randint(0, 100, (T,))
    cache = _cos_sin_cache(128, rot_dim)
    ref_q, ref_k = q.clone(), k.clone()
    reference.rotary_embedding(positions, ref_q, ref_k, cache, is_neox)
    v_before = qkv[:, (num_heads + num_kv_heads) * head_size:].clone()
    rotary_embedding(positions, q, k, cache, is_neox)
    torch.testing.assert_close(q, ref_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, ref_k, atol=1e-5, rtol=1e-5)
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_size:], v_before), "v untouched"


def test_rotary_reference_is_hf_rotate_half():
    torch.manual_seed(0)
    q, k = torch.randn(5, 2, 16), torch.randn(5, 1, 16)
    positions = torch.tensor([0, 3, 9, 1, 4])
    cache = _cos_sin_cache(16, 16)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
    emb = torch.cat([torch.outer(positions.float(), inv_freq)] * 2, dim=-1)  # [T, D]
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]

    def rotate_half(x):
        return torch.cat([-x[..., 8:], x[..., :8]], dim=-1)

    hf_q, hf_k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    reference.rotary_embedding(positions, q, k, cache, True)
    torch.testing.assert_close(q, hf_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, hf_k, atol=1e-5, rtol=1e-5)
