"""Fused residual + LayerNorm / RMSNorm (Triton interpreter) against the reference, and the
reference against torch.nn.functional.layer_norm and HF's LlamaRMSNorm formula."""
import pytest
import torch
import torch.nn.functional as F

from hybrid.ops import reference
from hybrid.ops.layernorm import add_layernorm
from hybrid.ops.rmsnorm import add_rmsnorm
from hybrid.ops.testing import assert_matches, poisoned_allocations

HIDDEN = [96, 200]  # non-powers of two


@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_layernorm(hidden, with_residual):
    torch.manual_seed(hidden)
    x = torch.randn(7, 2 * hidden)[:, :hidden]  # strided rows
    res = torch.randn(7, hidden) if with_residual else None
    w, b = torch.randn(hidden), torch.randn(hidden)
    ref_n, ref_r = reference.add_layernorm(x, res, w, b, 1e-5)
    with poisoned_allocations():
        n, r = add_layernorm(x, res, w, b, 1e-5)
    assert_matches(n, ref_n, what="normed")
    assert_matches(r, ref_r, what="residual_out")
    # the reference is F.layer_norm of x + residual
    h = x + res if with_residual else x
    torch.testing.assert_close(ref_n, F.layer_norm(h, (hidden,), w, b, 1e-5), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_r, h)


@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rmsnorm(hidden, with_residual):
    torch.manual_seed(hidden + 1)
    x = torch.randn(7, hidden)
    res = torch.randn(7, hidden) if with_residual else None
    w = torch.randn(hidden)
    ref_n, ref_r = reference.add_rmsnorm(x, res, w, 1e-6)
    with poisoned_allocations():
        n, r = add_rmsnorm(x, res, w, 1e-6)
    assert_matches(n, ref_n, what="normed")
    assert_matches(r, ref_r, what="residual_out")
    h = x + res if with_residual else x
    hf = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))  # HF LlamaRMSNorm, fp32
    torch.testing.assert_close(ref_n, hf, atol=1e-5, rtol=1e-5)


def test_rmsnorm_bf16_reference_follows_hf_rounding():
    """bf16: HF casts the normalised value to bf16 before the weight multiply; so do we."""
    torch.manual_seed(0)
    x, w = torch.randn(5, 64, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16)
    h = x.float()
    hf = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(reference.add_rmsnorm(x, None, w, 1e-6)[0], hf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", HIDDEN)
def test_embed_layernorm_is_lookups_plus_add_layernorm(dtype, hidden):
    from hybrid.ops.layernorm import embed_layernorm

    torch.manual_seed(hidden)
    table, pos_table = torch.randn(50, 2 * hidden)[:, :hidden].to(dtype), torch.randn(40, hidden).to(dtype)
    ids = torch.tensor([3, 49, 0, 3, 17], dtype=torch.int64)
    pos = torch.tensor([0, 1, 2, 37, 5], dtype=torch.int64)
    w, b = torch.randn(hidden), torch.randn(hidden)
    ref_n, ref_r = reference.embed_layernorm(ids, table, pos, pos_table, 2, w, b, 1e-5)
    with poisoned_allocations():
        n, r = embed_layernorm(ids, table, pos, pos_table, 2, w, b, 1e-5)
    assert_matches(n, ref_n, what="normed")
    assert_matches(r, ref_r, what="residual_out")  # the interpreter's bf16 casts are not RNE
    assert dtype != torch.float32 or torch.equal(r, ref_r)
    # the reference is the model's old path: two F.embedding lookups, the add, then add_layernorm
    h = F.embedding(ids, table) + F.embedding(pos + 2, pos_table)
    want_n, want_r = reference.add_layernorm(h, None, w, b, 1e-5)
    assert torch.equal(ref_r, want_r) and torch.equal(ref_n, want_n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embed_rmsnorm_is_lookup_plus_add_rmsnorm(dtype):
    from hybrid.ops.rmsnorm import embed_rmsnorm

    torch.manual_seed(5)
    table, w = torch.randn(30, 200).to(dtype), torch.randn(200)
    ids = torch.tensor([29, 0, 7, 7], dtype=torch.int64)
    ref_n, ref_r = reference.embed_rmsnorm(ids, table, w, 1e-6)
    with poisoned_allocations():
        n, r = embed_rmsnorm(ids, table, w, 1e-6)
    assert_matches(n, ref_n, what="normed")
    assert torch.equal(r, table[ids])
    want_n, _ = reference.add_rmsnorm(F.embedding(ids, table), None, w, 1e-6)
    assert torch.equal(ref_n, want_n)
