"""Measure-and-pick for the "auto" backend: times the Triton and CUDA versions of paged decode
attention (and the KV-cache write) on the engine's real decode shapes and keeps the faster one in
hybrid.ops' auto-cuda set. Call it once before capturing CUDA graphs (it launches and times
kernels, so never inside a capture); without the CUDA extension it leaves everything to Triton.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def _median_ms(fn, reps: int = 30) -> float:
    for _ in range(3):
        fn()  # warm-up: compiles, allocator
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2]


@torch.no_grad()
def pick_decode_backends(num_heads: int, num_kv_heads: int, head_size: int, block_size: int,
                         batch: int, context: int, dtype: torch.dtype,
                         device: torch.device | str = "cuda") -> dict[str, str]:
    """Times triton vs cuda for paged_decode_attention and write_kv_cache at (batch, context) and
    sets hybrid.ops' auto-cuda set to the ops where cuda won. Returns {op: winning backend}."""
    import hybrid.ops as ops

    device = torch.device(device)
    if device.type != "cuda" or not ops.cuda_ext_available():
        ops.set_auto_cuda_ops("none")
        return {op: "triton" for op in ops.CUDA_OPS}
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
    }
    winners, timings = {}, {}
    for op, call in calls.items():
        ms = {b: _median_ms(lambda b=b: call(ops.get_impl(op, b))) for b in ("triton", "cuda")}
        winners[op] = min(ms, key=ms.get)
        timings[op] = ms
    ops.set_auto_cuda_ops([op for op, b in winners.items() if b == "cuda"])
    log.info("ops auto backend at batch %d context %d (%s): %s", batch, context, dtype,
             ", ".join(f"{op} -> {winners[op]} (triton {t['triton'] * 1e3:.1f} us, "
                       f"cuda {t['cuda'] * 1e3:.1f} us)" for op, t in timings.items()))
    return winners
