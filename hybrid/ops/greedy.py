"""Greedy sampling's argmax over the vocabulary, split across programs (Triton).

torch's argmax over [b, V] logits runs one block per row: at decode batch sizes (16-256 rows)
that is a few blocks on a 132-SM card, about 14 us for a 6 MB read that the bandwidth allows in
under 2 us. Here each of b x S programs reduces a contiguous chunk of one row to a single int64
key that orders like (value, -index):

    key = (ordered_bits(float32(x)) << 32) | (2^32 - 1 - index)

where ordered_bits maps the float's bit pattern to an int32 that compares like the float
(negative floats get their magnitude bits flipped; -0.0 is first turned into +0.0). The max key
is the max value, ties broken towards the smaller index: torch.argmax's first occurrence. The
partials [b, S] are reduced by decode_advance (decode_state.py) in the same launch that records the
token, or by reference.greedy_tokens; a separate reduction launch is never needed in the step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybrid.ops import pdl

_BLOCK = 2048


@triton.jit
def ordered_key(x, cols):
    """fp32 values [N] and their int32/int64 indices [N] -> int64 keys (see module docstring)."""
    x = x + 0.0  # -0.0 -> +0.0: both compare equal, as in torch.argmax
    bits = x.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (4294967295 - cols.to(tl.int64))


@triton.jit
def _argmax_partials_kernel(
    logits_ptr, keys_ptr, vocab, stride_row, chunk, num_splits,
    BLOCK: tl.constexpr, PDL: tl.constexpr = False,
):
    if PDL:  # PDL-launched (ops/pdl.py): nothing is touched before the previous kernel ends
        pdl.prologue()
    row = tl.program_id(0)
    split = tl.program_id(1)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, vocab)
    best = tl.full([BLOCK], -9223372036854775807 - 1, tl.int64)
    base = logits_ptr + row.to(tl.int64) * stride_row
    for start in range(lo, hi, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < hi, other=float("-inf")).to(tl.float32)
        key = ordered_key(x, cols)
        best = tl.maximum(best, tl.where(cols < hi, key, -9223372036854775807 - 1))
    tl.store(keys_ptr + row * num_splits + split, tl.max(best, axis=0))


def num_splits_for(rows: int, vocab: int, device: torch.device) -> int:
    """Chunks per row: one BLOCK each (all loads of a program in flight at once: a loop over
    several blocks per program was latency-bound, 12 us at 64 x 50272 on an H200), at most 64."""
    if device.type != "cuda":
        return max(1, min(4, -(-vocab // _BLOCK)))
    return max(1, min(-(-vocab // _BLOCK), 64))


def greedy_partials(logits: torch.Tensor, num_splits: int | None = None) -> torch.Tensor:
    """logits [b, V] (fp32 / bf16 / fp16, unit stride along V) -> int64 keys [b, S]."""
    assert logits.dim() == 2 and logits.stride(1) == 1, (logits.shape, logits.stride())
    rows, vocab = logits.shape
    assert 0 < vocab < 2 ** 31, vocab
    splits = num_splits or num_splits_for(rows, vocab, logits.device)
    chunk = -(-vocab // splits)
    keys = torch.empty(rows, splits, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return keys
    _argmax_partials_kernel[(rows, splits)](
        logits, keys, vocab, logits.stride(0), chunk, splits,
        BLOCK=_BLOCK, num_warps=4, **pdl.launch(logits),
    )
    return keys
