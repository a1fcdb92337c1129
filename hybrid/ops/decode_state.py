"""End of a decode step (Triton): the sampled tokens -> the runner's static buffers, in one launch.

Replaces the eager chain where(active, nxt, pad); out_tokens.index_copy_ at step_idx; hit_eos
(stop_on_eos and nxt in eos_ids); rem = 0 on EOS else max(rem - 1, 0); ids = nxt;
pos += active; gen += 1; step_idx += 1 — about a dozen small kernels per decode step.

step_idx lives on the device (the CUDA graph replays with no host involvement), so the kernel reads
it and writes it back + 1. One program handles every row: it must read step_idx before the single
write, and a decode batch (<= a few hundred rows) is one block's work anyway.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybrid.ops import pdl


@triton.jit
def _decode_advance_kernel(
    next_ptr, ids_ptr, pos_ptr, rem_ptr, gen_ptr, stop_ptr, out_ptr, step_ptr, eos_ptr,
    num_rows, num_eos, out_rows, stride_out, pad_token_id, num_keys,
    BLOCK_ROWS: tl.constexpr, BLOCK_EOS: tl.constexpr, BLOCK_KEYS: tl.constexpr, PDL: tl.constexpr = False,
):
    if PDL:  # PDL-launched (ops/pdl.py): nothing is touched before the previous kernel ends
        pdl.prologue()
    rows = tl.arange(0, BLOCK_ROWS)  # [R]
    in_range = rows < num_rows
    rem = tl.load(rem_ptr + rows, mask=in_range, other=0)  # int64
    active = rem > 0
    if BLOCK_KEYS > 0:  # next_ptr holds greedy_partials keys [b, num_keys]: argmax = max key
        kk = tl.arange(0, BLOCK_KEYS)  # [S]
        kmask = in_range[:, None] & (kk < num_keys)[None, :]
        keys = tl.load(next_ptr + rows[:, None] * num_keys + kk[None, :], mask=kmask,
                       other=-9223372036854775807 - 1)  # [R, S]
        nxt = 4294967295 - (tl.max(keys, axis=1) & 4294967295)  # [R] int64
    else:
        nxt = tl.load(next_ptr + rows, mask=in_range, other=0)  # int64
    tok = tl.where(active, nxt, pad_token_id).to(tl.int64)  # [R]
    step = tl.load(step_ptr)
    # out_tokens has max_model_len rows, more than a chunk ever runs; the bound only keeps a
    # misuse from writing past the buffer (step broadcast to [R] first: the CPU interpreter
    # rejects a mask made from a scalar comparison)
    step_ok = (step + tl.zeros([BLOCK_ROWS], tl.int64)) < out_rows  # [R]
    tl.store(out_ptr + step * stride_out + rows, tok, mask=in_range & step_ok)
    e = tl.arange(0, BLOCK_EOS)  # [E]
    e_valid = e < num_eos
    eos = tl.load(eos_ptr + e, mask=e_valid, other=0)  # [E]
    match = (tok[:, None] == eos[None, :]) & e_valid[None, :]  # [R, E]
    is_eos = tl.sum(match.to(tl.int32), axis=1) > 0  # [R]
    stop = tl.load(stop_ptr + rows, mask=in_range, other=0) > 0
    new_rem = tl.where(stop & is_eos, 0, tl.maximum(rem - 1, 0))
    pos = tl.load(pos_ptr + rows, mask=in_range, other=0)
    gen = tl.load(gen_ptr + rows, mask=in_range, other=0)
    tl.store(rem_ptr + rows, new_rem, mask=in_range)
    tl.store(ids_ptr + rows, tok, mask=in_range)
    tl.store(pos_ptr + rows, pos + active.to(tl.int64), mask=in_range)
    tl.store(gen_ptr + rows, gen + 1, mask=in_range)
    tl.store(step_ptr, step + 1)


def decode_advance(
    next_tokens: torch.Tensor,  # [b] int64 sampled tokens (anything for inactive rows), or
    # [b, S] int64 greedy_partials keys (ops/greedy.py): the argmax is reduced here, no extra launch
    input_ids: torch.Tensor,  # [b] int64 <- the row's next input token (pad for inactive rows)
    positions: torch.Tensor,  # [b] int64, += 1 for active rows
    remaining: torch.Tensor,  # [b] int64, 0 after EOS (stop_on_eos rows), else max(rem - 1, 0)
    num_generated: torch.Tensor,  # [b] int64, += 1 for every row
    stop_on_eos: torch.Tensor,  # [b] int64, > 0: an EOS token ends the row
    out_tokens: torch.Tensor,  # [K, b] int64; row step_idx <- the (padded) tokens
    step_idx: torch.Tensor,  # [1] int64 on the device, += 1
    eos_ids: torch.Tensor,  # [E] int64
    pad_token_id: int,
) -> None:
    num_rows = next_tokens.shape[0]
    num_keys = next_tokens.shape[1] if next_tokens.dim() == 2 else 0
    if num_keys:
        assert next_tokens.dtype == torch.int64 and next_tokens.is_contiguous(), next_tokens.stride()
    for t in ((() if num_keys else (next_tokens,)) + (input_ids, positions, remaining, num_generated,
                                                     stop_on_eos)):
        assert t.dtype == torch.int64 and t.shape == (num_rows,) and t.stride(0) == 1, (t.dtype, t.shape)
    assert out_tokens.dtype == torch.int64 and out_tokens.shape[1] == num_rows and out_tokens.stride(1) == 1
    assert step_idx.dtype == torch.int64 and step_idx.numel() == 1
    assert eos_ids.dtype == torch.int64 and eos_ids.dim() == 1 and eos_ids.stride(0) == 1
    if num_rows == 0:
        step_idx.add_(1)
        return
    block_rows = triton.next_power_of_2(num_rows)
    _decode_advance_kernel[(1,)](
        next_tokens, input_ids, positions, remaining, num_generated, stop_on_eos, out_tokens,
        step_idx, eos_ids,
        num_rows, eos_ids.shape[0], out_tokens.shape[0], out_tokens.stride(0), pad_token_id, num_keys,
        BLOCK_ROWS=block_rows, BLOCK_EOS=triton.next_power_of_2(max(eos_ids.shape[0], 1)),
        BLOCK_KEYS=triton.next_power_of_2(num_keys) if num_keys else 0,
        num_warps=1 if block_rows <= 128 else 4, **pdl.launch(next_tokens),
    )
