"""Rotary embedding in place on strided q/k views of a fused qkv: GB/s (read + write q and k, read
the cos/sin rows), Triton vs the torch reference."""
import pytest
import torch

import hybrid.ops as ops
from bench.kernels.harness import record

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("num_tokens", [256, 8192])
@pytest.mark.parametrize("shape,heads,kv_heads", [("llama-7b", 32, 32), ("llama3-8b", 32, 8)])
def test_bench_rotary(benchmark, shape, heads, kv_heads, num_tokens, backend):
    head_size = 128
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_size, device="cuda",
                      dtype=torch.bfloat16)
    q = qkv[:, : heads * head_size].view(num_tokens, heads, head_size)
    k = qkv[:, heads * head_size: (heads + kv_heads) * head_size].view(num_tokens, kv_heads,
                                                                       head_size)
    cache = torch.randn(4096, head_size, device="cuda")  # fp32 cos|sin
    positions = torch.randint(0, 4096, (num_tokens,), device="cuda")
    fn = ops.get_impl("rotary_embedding", backend)
    moved = 2 * (q.numel() + k.numel()) * 2 + num_tokens * head_size * 4 + num_tokens * 8
    record(benchmark, lambda: fn(positions, q, k, cache, True), kernel="rotary_embedding",
           backend=backend, shape={"model": shape, "tokens": num_tokens}, bytes_moved=moved)
