"""Paged decode attention: GB/s (live KV + q + out + metadata) and % of copy bandwidth, Triton vs
the torch reference vs csrc/ (when built). Target: >= 70% at OPT-1.3B shapes, batch 16-256,
context 256-512 (issue 4)."""
import pytest
import torch

import hybrid.ops as ops
from bench.kernels.harness import nbytes, record

pytestmark = pytest.mark.gpu
SHAPES = {"opt-1.3b": (32, 32, 64), "llama-7b": (32, 32, 128), "llama3-8b": (32, 8, 128)}
CASES = (
    [("opt-1.3b", b, c) for b in (16, 64, 128, 256) for c in (256, 512)]
    + [("opt-1.3b", 4, 4096), ("llama-7b", 16, 512), ("llama-7b", 64, 512),
       ("llama3-8b", 16, 512), ("llama3-8b", 64, 2048), ("llama3-8b", 4, 4096)]
)
BLOCK_SIZE = 16


def decode_inputs(shape, batch, ctx, dtype=torch.bfloat16):
    """Every row at context ctx, blocks scattered over a pool with 10% slack (random table)."""
    num_heads, num_kv_heads, head_size = SHAPES[shape]
    per_row = (ctx + BLOCK_SIZE - 1) // BLOCK_SIZE
    num_blocks = batch * per_row * 11 // 10 + 1
    kc = torch.randn(num_blocks, BLOCK_SIZE, num_kv_heads, head_size, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    bt = torch.randperm(num_blocks, device="cuda")[: batch * per_row].view(batch, per_row).int()
    sl = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, num_heads, head_size, device="cuda", dtype=dtype)
    live_kv = 2 * batch * ctx * num_kv_heads * head_size * kc.element_size()
    return (q, kc, vc, bt, sl), live_kv + 2 * nbytes(q) + nbytes(bt, sl)


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("shape,batch,ctx", CASES)
def test_bench_paged_decode_attention(benchmark, shape, batch, ctx, backend):
    if backend == "cuda" and not ops.cuda_ext_available():
        pytest.skip("CUDA extension not built")
    args, moved = decode_inputs(shape, batch, ctx)
    scale = args[0].shape[-1] ** -0.5
    fn = ops.get_impl("paged_decode_attention", backend)
    record(benchmark, lambda: fn(*args, scale), kernel="paged_decode_attention", backend=backend,
           shape={"model": shape, "batch": batch, "ctx": ctx}, bytes_moved=moved)
