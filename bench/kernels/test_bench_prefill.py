"""Causal varlen prefill attention: TFLOP/s (causal half of QK^T and PV) and GB/s, Triton vs the
torch reference (SDPA per sequence; its per-sequence loop and host sync are part of its cost)."""
import pytest
import torch

import hybrid.ops as ops
from bench.kernels.harness import nbytes, record

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("shape,heads,kv_heads,head_size,batch,seq",
                         [("opt-1.3b", 32, 32, 64, 16, 256), ("llama-7b", 32, 32, 128, 8, 512),
                          ("llama3-8b", 32, 8, 128, 8, 512)])
def test_bench_prefill(benchmark, shape, heads, kv_heads, head_size, batch, seq, backend):
    T = batch * seq
    q = torch.randn(T, heads, head_size, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(T, kv_heads, head_size, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cu = torch.arange(0, T + 1, seq, device="cuda", dtype=torch.int32)
    fn = ops.get_impl("prefill_attention", backend)
    flops = 4.0 * batch * seq * (seq + 1) / 2 * heads * head_size
    record(benchmark, lambda: fn(q, k, v, cu, seq, head_size ** -0.5), kernel="prefill_attention",
           backend=backend, shape={"model": shape, "batch": batch, "seq": seq},
           bytes_moved=2 * nbytes(q) + nbytes(k, v), flops=flops)
