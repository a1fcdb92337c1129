"""Paged decode attention, csrc/ CUDA kernel vs the Triton kernel, batch 16-256 x context 256-4096:
GB/s of live KV + q + out + metadata and % of measured copy bandwidth (bench/kernels/harness.py:
event-timed medians, L2 flushed). "cuda" is the shipped heuristic; "cuda-nosplit" forces one split
and "cuda-gq<N>" N query heads per CTA, so the table shows what split-K and GQA grouping buy.
Rows land in kernels.jsonl; the session summary prints the table.
"""
import pytest
import torch

from bench.kernels.harness import nbytes, record

pytestmark = pytest.mark.gpu
SHAPES = {"opt-1.3b": (32, 32, 64), "llama-7b": (32, 32, 128), "llama3-8b": (32, 8, 128)}
BLOCK_SIZE = 16
MAX_KV_BYTES = 9 << 30
CASES = [
    (shape, batch, ctx)
    for shape, batches, ctxs in [
        ("opt-1.3b", (16, 64, 256), (256, 1024, 4096)),
        ("llama-7b", (16, 64), (512, 2048)),
        ("llama3-8b", (16, 64, 256), (512, 4096)),
    ]
    for batch in batches
    for ctx in ctxs
    if 2 * batch * ctx * SHAPES[shape][1] * SHAPES[shape][2] * 2 <= MAX_KV_BYTES
]
VARIANTS = ["triton", "cuda", "cuda-nosplit", "cuda-gq2"]


def decode_inputs(shape, batch, ctx, dtype=torch.bfloat16):
    """Every row at context ctx; blocks scattered over the pool by a random block table."""
    num_heads, num_kv_heads, head_size = SHAPES[shape]
    per_row = (ctx + BLOCK_SIZE - 1) // BLOCK_SIZE
    num_blocks = batch * per_row + 1
    kc = torch.randn(num_blocks, BLOCK_SIZE, num_kv_heads, head_size, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    bt = torch.randperm(num_blocks, device="cuda")[: batch * per_row].view(batch, per_row).int()
    sl = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, num_heads, head_size, device="cuda", dtype=dtype)
    live_kv = 2 * batch * ctx * num_kv_heads * head_size * kc.element_size()
    return (q, kc, vc, bt, sl), live_kv + 2 * nbytes(q) + nbytes(bt, sl)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape,batch,ctx", CASES)
def test_bench_cuda_vs_triton_decode(benchmark, shape, batch, ctx, variant):
    from hybrid.ops import cuda_backend as cb

    num_heads, num_kv_heads, head_size = SHAPES[shape]
    if variant.startswith("cuda") and not cb.available():
        pytest.skip(f"CUDA extension unavailable: {cb.load_error()}")
    if variant == "cuda-gq2" and num_heads == num_kv_heads:
        pytest.skip("MHA: one query head per kv head already")
    args, moved = decode_inputs(shape, batch, ctx)
    scale = head_size ** -0.5
    info = {"model": shape, "batch": batch, "ctx": ctx}
    if variant == "triton":
        from hybrid.ops.paged_attention import paged_decode_attention

        fn = lambda: paged_decode_attention(*args, scale)  # noqa: E731
    else:
        kw = {"num_splits": 1} if variant == "cuda-nosplit" else {}
        if variant == "cuda-gq2":
            kw["heads_per_cta"] = 2
        info["splits"] = kw.get("num_splits") or cb.decode_num_splits(
            batch, num_heads, num_kv_heads, head_size, args[3].shape[1] * BLOCK_SIZE,
            torch.bfloat16, kw.get("heads_per_cta", 0))
        fn = lambda: cb.paged_decode_attention(*args, scale, **kw)  # noqa: E731
    record(benchmark, fn, kernel="paged_decode_attention", backend=variant, shape=info,
           bytes_moved=moved)
