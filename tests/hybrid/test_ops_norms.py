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
