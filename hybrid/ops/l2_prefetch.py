"""Next-weight L2 prefetch for decode steps (EngineConfig.l2_prefetch_mb, opt-in, GPU experiment).

Why: a decode step's GEMMs are short (6-15 us for OPT-1.3B at batch 16-64) and each one ramps up
and drains on its own, so DRAM idles at every kernel boundary and during the small kernels in
between (norms, attention tails): the four layer GEMMs run at 30-70% of the copy bandwidth
(bench/kernels/NOTES.md). Before each projection's GEMM, this asks the L2 to fetch the first
`cap` bytes of the *next* projection's weight (csrc/l2_prefetch.cu), so DRAM keeps streaming
while the current GEMM, the norm or the attention runs, and the next GEMM starts on L2 hits.

- The plan maps each weight (by data pointer) to the one the forward reads after it; the model
  says the order (model.prefetch_order()). Weights never move (load_weights copies in place), so
  a plan set before CUDA-graph capture stays valid.
- "side" streams: the prefetch kernel runs on a side stream forked from the current one (graph
  capture turns that into a parallel branch), so the GEMM never waits for it; join() (the model
  calls it at the end of forward) merges the side stream back, which capture requires.
  "inline": the prefetch kernel goes on the current stream, just before the GEMM.
- Only a hint: results never depend on it (tests check equality with it on and off).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

MODES = ("side-bulk", "side-line", "inline-bulk", "inline-line")


@dataclass
class _Plan:
    next_of: dict[int, tuple[torch.Tensor, int]]
    side: bool
    kernel_mode: int  # csrc: 0 bulk, 1 per line
    stream: torch.cuda.Stream | None
    forked: bool = False


_plan: _Plan | None = None


def set_plan(order: list[torch.Tensor] | None, cap_bytes: int = 0, mode: str = "side-bulk") -> None:
    """Prefetch the first cap_bytes of order[i + 1] before each GEMM over order[i]; None or
    cap_bytes <= 0 turns prefetching off. Read at trace time (capture graphs after a change)."""
    global _plan
    if mode not in MODES:
        raise ValueError(f"l2 prefetch mode {mode!r}: choose from {MODES}")
    if not order or cap_bytes <= 0:
        _plan = None
        return
    if any(not w.is_cuda for w in order):
        raise ValueError("l2 prefetch needs CUDA weights")
    from hybrid.ops import cuda_backend as cb

    if not cb.available():
        raise RuntimeError(f"l2 prefetch needs the CUDA extension: {cb.load_error()}")
    nxt = {}
    for a, b in zip(order, order[1:]):
        if a.data_ptr() != b.data_ptr():
            nxt[a.data_ptr()] = (b, min(int(cap_bytes), b.numel() * b.element_size()))
    side = mode.startswith("side")
    _plan = _Plan(nxt, side, 0 if mode.endswith("bulk") else 1,
                  torch.cuda.Stream(order[0].device) if side else None)
    log.info("l2 prefetch on: %s, up to %.1f MB of the next weight before each of %d GEMMs",
             mode, cap_bytes / 2**20, len(nxt))


def enabled() -> bool:
    return _plan is not None


def before_gemm(w: torch.Tensor) -> None:
    """Called by linear() / linear_add_norm() just before the GEMM over weight w."""
    plan = _plan
    if plan is None or not w.is_cuda:
        return
    hit = plan.next_of.get(w.data_ptr())
    if hit is None:
        return
    from hybrid.ops import cuda_backend as cb

    t, nbytes = hit
    if not plan.side:
        cb.l2_prefetch(t, nbytes, plan.kernel_mode)
        return
    cur = torch.cuda.current_stream(w.device)
    plan.stream.wait_stream(cur)  # fork: ordered after everything queued so far
    with torch.cuda.stream(plan.stream):
        cb.l2_prefetch(t, nbytes, plan.kernel_mode)
    plan.forked = True


def join() -> None:
    """Merge the side stream back into the current one (end of a forward; graph capture needs it)."""
    plan = _plan
    if plan is not None and plan.side and plan.forked:
        torch.cuda.current_stream(plan.stream.device).wait_stream(plan.stream)
        plan.forked = False
