"""ReLU and SiLU-and-multiply (Triton interpreter) against torch."""
import pytest
import torch
import torch.nn.functional as F

from hybrid.ops.activations import relu, silu_and_mul
from hybrid.ops.testing import assert_matches, poisoned_allocations


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_relu(dtype):
    torch.manual_seed(0)
    x = torch.randn(7, 1030).to(dtype)  # spans two 1024-element programs; half negative
    with poisoned_allocations():
        out = relu(x)
    assert out.dtype == dtype and torch.equal(out, torch.relu(x))


def test_silu_and_mul():
    torch.manual_seed(1)
    inter = 1100  # two column programs, the second partial
    x = torch.randn(7, 2 * inter + 6)[:, : 2 * inter]  # strided rows
    with poisoned_allocations():
        out = silu_and_mul(x)
    assert_matches(out, F.silu(x[:, :inter]) * x[:, inter:], what="silu_and_mul")
