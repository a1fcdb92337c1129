"""ReLU and SiLU-and-multiply: GB/s (read input, write output), Triton vs torch."""
import pytest
import torch

import hybrid.ops as ops
from bench.kernels.harness import nbytes, record

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("num_tokens", [256, 8192])
def test_bench_silu_and_mul(benchmark, num_tokens, backend):
    x = torch.randn(num_tokens, 2 * 11008, device="cuda", dtype=torch.bfloat16)  # llama-7b MLP
    fn = ops.get_impl("silu_and_mul", backend)
    record(benchmark, lambda: fn(x), kernel="silu_and_mul", backend=backend,
           shape={"tokens": num_tokens, "inter": 11008}, bytes_moved=nbytes(x) * 3 // 2)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("num_tokens", [256, 8192])
def test_bench_relu(benchmark, num_tokens, backend):
    x = torch.randn(num_tokens, 8192, device="cuda", dtype=torch.bfloat16)  # OPT-1.3B MLP
    fn = ops.get_impl("relu", backend)
    record(benchmark, lambda: fn(x), kernel="relu", backend=backend,
           shape={"tokens": num_tokens, "ffn": 8192}, bytes_moved=2 * nbytes(x))
