"""Fused residual + LayerNorm / RMSNorm: GB/s (read x, residual, weights; write normed and
residual_out), Triton vs the torch reference."""
import pytest
import torch

import hybrid.ops as ops
from bench.kernels.harness import nbytes, record

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("num_tokens", [256, 8192])
@pytest.mark.parametrize("op,hidden", [("add_layernorm", 2048), ("add_rmsnorm", 4096)])
def test_bench_norm(benchmark, op, hidden, num_tokens, backend):
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16)
    res = torch.randn_like(x)
    w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(w)
    args = (x, res, w, b, 1e-5) if op == "add_layernorm" else (x, res, w, 1e-6)
    fn = ops.get_impl(op, backend)
    moved = 4 * nbytes(x) + nbytes(w) * (2 if op == "add_layernorm" else 1)
    record(benchmark, lambda: fn(*args), kernel=op, backend=backend,
           shape={"tokens": num_tokens, "hidden": hidden}, bytes_moved=moved)
