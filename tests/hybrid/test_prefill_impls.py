"""The model-level prefill attention choices (hybrid.models.base): batched SDPA per run of
equal-length sequences and the "flash" switch, against the reference on the CPU."""
import pytest
import torch

from hybrid.models import base
from hybrid.ops import reference


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_sdpa_varlen_runs_of_equal_lengths_match_reference(heads, kv_heads):
    torch.manual_seed(heads)
    lens = [5, 5, 5, 3, 7, 7, 1]  # runs 3x5, 1x3, 2x7, 1x1
    t = sum(lens)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * 16)  # q/k/v as strided views, as the models pass them
    q = qkv[:, :heads * 16].view(t, heads, 16)
    k = qkv[:, heads * 16:(heads + kv_heads) * 16].view(t, kv_heads, 16)
    v = qkv[:, (heads + kv_heads) * 16:].view(t, kv_heads, 16)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    want = reference.prefill_attention(q, k, v, cu, max(lens), 0.25)
    got = base._sdpa_varlen(q, k, v, lens, 0.25)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_flash_unavailable_on_cpu_and_unknown_impl_rejected():
    q = torch.randn(3, 2, 16)
    assert not base.flash_varlen_available(q, q)
    assert not base.flash_varlen_available(q.bfloat16(), q.bfloat16())  # CPU: never
    with pytest.raises(ValueError, match="choose from"):
        base.set_prefill_impl("fa9")
    before = base._prefill_impl
    base.set_prefill_impl("flash")
    base.set_prefill_impl(before)
