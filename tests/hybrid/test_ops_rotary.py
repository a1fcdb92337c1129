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


# ---- precision at real positions: the engine keeps cos/sin in fp32 (HF rounds them to bf16) ------

def _llama_cfg(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=256, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                       num_hidden_layers=1, vocab_size=32, max_position_embeddings=4096, **kw)


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 1024}


@pytest.mark.parametrize("cfg_kw", [{}, {"rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING}],
                         ids=["llama2", "llama3-scaled"])
def test_llama_cos_sin_cache_is_hf_fp32_at_large_positions(cfg_kw):
    """The cache equals HF LlamaRotaryEmbedding's fp32 cos/sin (before HF casts them to the
    activation dtype) up to position 4095, and is within fp32 rounding of float64 trigonometry of the
    same angles: a cache built in bf16, or angles from bf16 positions, is off by >= 1e-3 there."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from hybrid.models.llama import rope_cos_sin_cache

    cfg = _llama_cfg(**cfg_kw)
    cache = rope_cos_sin_cache(cfg, 4096, torch.device("cpu"))  # [P, D]
    assert cache.dtype == torch.float32 and cache.shape == (4096, 128)
    rope = LlamaRotaryEmbedding(cfg)
    pos = torch.tensor([[0, 1, 7, 255, 1023, 1024, 2047, 3000, 4095]])
    hf_cos, hf_sin = rope(torch.zeros(1, dtype=torch.float32), pos)  # [1, n, D] fp32
    torch.testing.assert_close(cache[pos[0], :64], hf_cos[0, :, :64], atol=2e-6, rtol=0)
    torch.testing.assert_close(cache[pos[0], 64:], hf_sin[0, :, :64], atol=2e-6, rtol=0)
    angles = torch.arange(4096, dtype=torch.float64)[:, None] * rope.inv_freq.double()[None, :]  # [P, D/2]
    exact = torch.cat([angles.cos(), angles.sin()], dim=-1) * rope.attention_scaling
    # fp32 angle rounding: half an ulp of 4095 is 1.2e-4 rad
    assert (cache.double() - exact).abs().max() < 2e-4
    assert (cache.to(torch.bfloat16).double() - exact).abs().max() > 1e-3, "the bound above can tell bf16 apart"


def test_rotary_bf16_rounds_once_and_beats_hf_bf16():
    """bf16 query/key at positions 1k-4k: with the fp32 cache and fp32 math each output is rounded
    once, so the reference (the torch backend, and the oracle the GPU test holds the Triton kernel
    to) is within half a bf16 ulp of the exact rotation; HF's bf16 path (cos/sin cast to bf16, three
    bf16 roundings) is measurably worse. The Triton kernel agrees with it within one ulp here: the
    interpreter truncates fp32 -> bf16 stores (the GPU rounds to nearest)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from hybrid.models.llama import rope_cos_sin_cache

    torch.manual_seed(0)
    cfg = _llama_cfg()
    cache = rope_cos_sin_cache(cfg, 4096, torch.device("cpu"))  # [P, 128] fp32
    T, H, D = 24, 2, 128
    positions = torch.randint(1024, 4096, (T,))
    q = torch.randn(T, H, D).to(torch.bfloat16)
    k = torch.randn(T, 1, D).to(torch.bfloat16)
    cs = cache[positions].double()  # [T, D]
    cos, sin = cs[:, None, :D // 2].repeat(1, 1, 2), cs[:, None, D // 2:].repeat(1, 1, 2)  # [T, 1, D]

    def rotate_half(x):
        return torch.cat([-x[..., D // 2:], x[..., :D // 2]], dim=-1)

    exact_q = q.double() * cos + rotate_half(q.double()) * sin  # [T, H, D] fp64
    exact_k = k.double() * cos + rotate_half(k.double()) * sin
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1), k.transpose(0, 1), cos.to(torch.bfloat16)[:, 0],
                                      sin.to(torch.bfloat16)[:, 0], unsqueeze_dim=0)
    ref_q, ref_k = q.clone(), k.clone()
    reference.rotary_embedding(positions, ref_q, ref_k, cache, True)
    got_q, got_k = q.clone(), k.clone()
    rotary_embedding(positions, got_q, got_k, cache, True)
    for ref, got, hf, exact in ((ref_q, got_q, hf_q.transpose(0, 1), exact_q),
                                (ref_k, got_k, hf_k.transpose(0, 1), exact_k)):
        err = (ref.double() - exact).abs()
        assert (err <= exact.abs() * 2.0 ** -8 + 1e-6).all(), err.max()  # half an ulp (8 bits) + fp32 slack
        hf_err = (hf.double() - exact).abs()
        assert err.mean() < 0.75 * hf_err.mean(), (err.mean().item(), hf_err.mean().item())
        assert ((got.double() - exact).abs() <= exact.abs() * 2.0 ** -7 + 1e-6).all()
