"""KV-cache write by slot mapping: GB/s (read k, v + write them into the pool), Triton vs torch
reference vs csrc/ (when built); decode (one token per row) and prefill token counts."""
import pytest
import torch

import hybrid.ops as ops
from bench.kernels.harness import nbytes, record

pytestmark = pytest.mark.gpu
SHAPES = {"opt-1.3b": (32, 64), "llama3-8b": (8, 128)}


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("num_tokens", [256, 8192])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_bench_write_kv_cache(benchmark, shape, num_tokens, backend):
    if backend == "cuda" and not ops.cuda_ext_available():
        pytest.skip("CUDA extension not built")
    num_kv_heads, head_size = SHAPES[shape]
    num_blocks, block_size = 16384, 16
    kc = torch.randn(num_blocks, block_size, num_kv_heads, head_size, device="cuda",
                     dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    k = torch.randn(num_tokens, num_kv_heads, head_size, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:num_tokens]
    fn = ops.get_impl("write_kv_cache", backend)
    record(benchmark, lambda: fn(k, v, kc, vc, slots), kernel="write_kv_cache", backend=backend,
           shape={"model": shape, "tokens": num_tokens}, bytes_moved=2 * nbytes(k, v) + nbytes(slots))
