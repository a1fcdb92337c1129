"""Helpers shared by the op tests (CPU interpreter and GPU) and the kernel benchmarks.

- TOLERANCES: per-dtype bounds on ||out - ref|| / ||ref|| and on the max abs error.
- assert_matches(): NaN-free check against an fp32 reference with the dtype's tolerance.
- poisoned_allocations(): torch.empty / empty_like return NaN-filled (float) or -7777 (int) tensors
  while active, so an op that leaves part of its output unwritten fails the comparison.
- random block tables and KV pools in the paged layout.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-4),  # (relative L2 error, max abs error)
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (1e-2, 6e-2),
}


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None,
                   scale: float = 1.0, what: str = "") -> None:
    """out vs ref (ref computed in higher precision); scale loosens both bounds. The max-abs bound
    is relative to max(1, max |ref|), as one rounding step of the dtype grows with magnitude."""
    dtype = dtype or out.dtype
    rel_tol, abs_tol = TOLERANCES[dtype]
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    o, r = out.double(), ref.double()
    assert torch.isfinite(o).all(), f"{what}: non-finite output (unwritten or overflow)"
    err = (o - r).norm().item()
    rel = err / max(r.norm().item(), 1e-12)
    max_abs = (o - r).abs().max().item() if o.numel() else 0.0
    assert rel <= rel_tol * scale, f"{what}: relative L2 error {rel:.3g} > {rel_tol * scale:.3g}"
    bound = abs_tol * scale * max(1.0, r.abs().max().item() if r.numel() else 1.0)
    assert max_abs <= bound, f"{what}: max abs error {max_abs:.3g} > {bound:.3g}"


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    if t.dtype != torch.bool:
        return t.fill_(-7777)
    return t


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Makes torch.empty / torch.empty_like poison what they return, for the duration."""
    empty, empty_like = torch.empty, torch.empty_like

    def p_empty(*args, **kwargs):
        return _poison(empty(*args, **kwargs))

    def p_empty_like(*args, **kwargs):
        return _poison(empty_like(*args, **kwargs))

    torch.empty, torch.empty_like = p_empty, p_empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def random_block_tables(seq_lens: list[int], block_size: int, num_blocks: int,
                        max_blocks_per_seq: int, generator: torch.Generator | None = None,
                        device: str | torch.device = "cpu") -> torch.Tensor:
    """Disjoint random blocks per row ([batch, max_blocks_per_seq] int32); unused entries are
    random valid-looking ids too, so an op that reads past seq_len reads wrong data."""
    need = [(n + block_size - 1) // block_size for n in seq_lens]
    assert sum(need) <= num_blocks and max(need, default=0) <= max_blocks_per_seq
    perm = torch.randperm(num_blocks, generator=generator)
    table = torch.randint(0, num_blocks, (len(seq_lens), max_blocks_per_seq), generator=generator,
                          dtype=torch.int32)
    used = 0
    for row, n in enumerate(need):
        table[row, :n] = perm[used:used + n].int()
        used += n
    return table.to(device)


def random_kv_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                    dtype: torch.dtype, device: str | torch.device = "cpu",
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random key and value pools (drawn on the device, from its default generator)."""
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    k = torch.randn(shape, device=device, dtype=dtype)
    v = torch.randn(shape, device=device, dtype=dtype)
    return k, v  # [num_blocks, block_size, num_kv_heads, head_size] each
