"""Measure-and-pick for the "auto" backend: times the Triton and CUDA versions of paged decode
attention, the KV-cache write and the fused write + attention (EngineConfig.fuse_kv_write) on the
engine's real decode shapes and keeps the faster one in hybrid.ops' auto-cuda set, per decode
batch bucket (the winner flips with the batch). Call it once before capturing CUDA graphs (it launches and times kernels, so never inside a capture); without
the CUDA extension it leaves everything to Triton.
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch

log = logging.getLogger(__name__)


def graph_time_us(fn, reps: int = 20) -> float:
    """Microseconds per fn() from CUDA-graph replays of `reps` back-to-back calls: what the
    engine's captured decode step pays, without Python launch overhead (which would otherwise
    dominate a ~10 us kernel and favour whichever backend launches faster from Python)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()  # warm-up: compiles, allocator
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(3):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(times)[1]


@torch.no_grad()
def pick_decode_backends(num_heads: int, num_kv_heads: int, head_size: int, block_size: int,
                         batch: int | Iterable[int], context: int, dtype: torch.dtype,
                         device: torch.device | str = "cuda") -> dict[str, str]:
    """Times triton vs cuda for each op of ops.CUDA_OPS at (batch, context) and sets hybrid.ops'
    auto-cuda choice. batch may be several decode batch buckets: each gets its own pick (the
    winner flips with the batch: on an H200, OPT-1.3B shapes at 416 tokens, Triton's attention won
    at 24 rows, 24.7 vs 27.1 us, and lost at 32, 36.5 vs 29.9; picked once at 24 rows for every
    batch, the 32-row decode step ran 2.154 ms against 1.944 with the 32-row pick). Returns {op:
    winning backend} at the largest batch; pick_decode_backends_per_batch has every bucket."""
    per = pick_decode_backends_per_batch(num_heads, num_kv_heads, head_size, block_size, batch, context,
                                         dtype, device)
    return {op: picks[max(picks)] for op, picks in per.items()}


@torch.no_grad()
def pick_decode_backends_per_batch(num_heads: int, num_kv_heads: int, head_size: int, block_size: int,
                                   batch: int | Iterable[int], context: int, dtype: torch.dtype,
                                   device: torch.device | str = "cuda") -> dict[str, dict[int, str]]:
    """pick_decode_backends' measurement: {op: {batch: winning backend}}, and sets hybrid.ops'
    auto-cuda set with those per-batch picks."""
    import hybrid.ops as ops

    device = torch.device(device)
    batches = sorted({int(b) for b in ([batch] if isinstance(batch, int) else batch)})
    if not batches or batches[0] <= 0:
        raise ValueError(f"decode batches must be positive, got {batches}")
    if device.type != "cuda" or not ops.cuda_ext_available():
        ops.set_auto_cuda_ops("none")
        return {op: {b: "triton" for b in batches} for op in ops.CUDA_OPS}
    winners: dict[str, dict[int, str]] = {op: {} for op in ops.CUDA_OPS}
    lines = []
    for b in batches:
        try:
            won, timings = _time_backends(ops, num_heads, num_kv_heads, head_size, block_size, b, context, dtype,
                                          device)
        except torch.cuda.OutOfMemoryError:  # a large bucket's test cache did not fit next to the pool
            torch.cuda.empty_cache()
            lines.append(f"batch {b}: not measured (out of memory), takes the nearest measured batch's pick")
            continue
        for op in ops.CUDA_OPS:
            winners[op][b] = won[op]
        lines.append(f"batch {b}: " + ", ".join(
            f"{op} -> {won[op]} (" + ", ".join(f"{k} {t:.1f} us" for k, t in us.items()) + ")"
            for op, us in timings.items()))
    if not winners[ops.CUDA_OPS[0]]:
        raise RuntimeError(f"autoselect: no decode batch of {batches} could be measured")
    cuda_ops = [op for op, picks in winners.items() if "cuda" in picks.values()]
    ops.set_auto_cuda_ops(cuda_ops, rows={op: {b: w == "cuda" for b, w in winners[op].items()} for op in cuda_ops})
    log.info("ops auto backend at context %d (%s): %s", context, dtype, " | ".join(lines))
    return winners


def _time_backends(ops, num_heads, num_kv_heads, head_size, block_size, batch, context, dtype, device):
    """({op: winner}, {op: {backend: us}}) at one decode batch."""
    per_row = (context + block_size - 1) // block_size
    num_blocks = batch * per_row + 1
    kc = torch.randn(num_blocks, block_size, num_kv_heads, head_size, device=device, dtype=dtype)
    vc = torch.randn_like(kc)
    bt = torch.randperm(num_blocks, device=device)[: batch * per_row].view(batch, per_row).int()
    sl = torch.full((batch,), context, device=device, dtype=torch.int32)
    q = torch.randn(batch, num_heads, head_size, device=device, dtype=dtype)
    k_new = torch.randn(batch, num_kv_heads, head_size, device=device, dtype=dtype)
    v_new = torch.randn_like(k_new)
    slots = bt[:, -1].long() * block_size  # [batch] one fresh slot per row
    calls = {
        "paged_decode_attention": lambda fn: fn(q, kc, vc, bt, sl, head_size ** -0.5),
        "write_kv_cache": lambda fn: fn(k_new, v_new, kc, vc, slots),
        "paged_decode_attention_append":
            lambda fn: fn(q, k_new, v_new, kc, vc, slots, bt, sl, head_size ** -0.5),
    }
    from hybrid.ops import cuda_backend

    supported = {
        "paged_decode_attention": cuda_backend.decode_unsupported(q, kc, vc, bt, sl) is None,
        "write_kv_cache": cuda_backend.write_unsupported(k_new, v_new, kc, vc, slots) is None,
        "paged_decode_attention_append": cuda_backend.append_unsupported(
            q, k_new, v_new, kc, vc, slots, bt, sl) is None,
    }
    winners, timings = {}, {}
    for op, call in calls.items():
        us = {}
        for b in ("triton", "cuda") if supported[op] else ("triton",):
            try:
                us[b] = graph_time_us(lambda b=b: call(ops.get_impl(op, b)))
            except Exception as err:  # noqa: BLE001 - a backend that fails here is not chosen
                log.warning("autoselect: %s on %s failed (%s)", op, b, err)
        winners[op] = min(us, key=us.get) if us else "triton"
        timings[op] = us
    del kc, vc
    return winners, timings
