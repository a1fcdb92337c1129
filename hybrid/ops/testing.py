"""Helpers shared by the op tests (CPU interpreter and GPU) and the kernel benchmarks.

- TOLERANCES: per-dtype bounds on ||out - ref|| / ||ref|| and on the max abs error.
- assert_matches(): NaN-free check against an fp32 reference with the dtype's tolerance.
- poisoned_allocations(): torch.empty / empty_like return NaN-filled (float) or -7777 (int) tensors
  while active, so an op that leaves part of its output unwritten fails the comparison.
- random block tables and KV pools in the paged layout.
- find_cuobjdump(): the CUDA binary dumper for SASS checks (PATH, else the one Triton ships).
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
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


# ---- decode projections (the skinny GEMMs' GPU tests) ----------------------------------------
def check_projection(op, shape, m: int, dtype: torch.dtype, *, k_splits: int = 0, has_bias: bool | None = None,
                     act: str | None = "shape", seed: int = 0, poison: bool = False, **kw) -> None:
    """op(x, w, b, relu, k_splits=..., **kw) for a LinearShape (n, k, has_bias, act) at m rows on
    the GPU against an fp64 reference: its max error no worse than twice cuBLAS' own, or 1% of the
    output scale. poison: leave a NaN-filled block of the output's size in the allocator first, so
    an output element the kernel forgets stays NaN."""
    import torch.nn.functional as F

    has_bias = shape.has_bias if has_bias is None else has_bias
    act = shape.act if act == "shape" else act
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(shape.n, shape.k, device="cuda", dtype=dtype, generator=g) * shape.k ** -0.5
    b = torch.randn(shape.n, device="cuda", dtype=dtype, generator=g) if has_bias else None
    x = torch.randn(m, shape.k, device="cuda", dtype=dtype, generator=g)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    cub = F.linear(x, w, b)
    if act == "relu":
        ref, cub = ref.relu(), cub.relu()
    if poison:
        torch.empty(m, shape.n, device="cuda", dtype=dtype).fill_(float("nan"))
    y = op(x, w, b, act == "relu", k_splits=k_splits, **kw)
    assert y.shape == (m, shape.n) and y.dtype == dtype
    err = (y.double() - ref).abs().max().item()
    cub_err = (cub.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= max(2 * cub_err, 1e-2 * scale), (shape, m, k_splits, err, cub_err, scale)


def projection_cases() -> list[tuple]:
    """(model, label, LinearShape) for the OPT-1.3B and LLaMA-7B decode projections the GEMM tests
    and timing tables run."""
    from hybrid.ops.linear import LinearShape as S

    shapes = {
        "opt-1.3b": {"qkv": S(6144, 2048, True), "o": S(2048, 2048, True), "fc1": S(8192, 2048, True, "relu"),
                     "fc2": S(2048, 8192, True)},
        "llama-7b": {"qkv": S(12288, 4096), "o": S(4096, 4096), "gate_up": S(22016, 4096), "down": S(4096, 11008)},
    }
    return [(model, label, shape) for model, d in shapes.items() for label, shape in d.items()]


def assert_pdl_chain_replays_equal(op, m: int, dtype: torch.dtype = torch.bfloat16, links: int = 3,
                                   replays: int = 20) -> None:
    """`links` launches of op(h, w, pdl=...) (bias-free, ReLU), each reading the previous output,
    captured with PDL in a CUDA graph and replayed `replays` times: bit-equal to the plain launches
    (a PDL kernel may read its weights before the wait, its input only after it)."""
    ws = [torch.randn(64 * 32, 2048, device="cuda", dtype=dtype) * 2048 ** -0.5 for _ in range(links)]
    x = torch.randn(m, 2048, device="cuda", dtype=dtype)

    def chain(pdl):
        h = x
        for w in ws:
            h = op(h, w, None, True, pdl=pdl)
        return h

    eager = chain(False)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        chain(True)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(True)
    for _ in range(replays):
        out.fill_(float("nan"))
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


def time_projections(cases, ms, variants, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """us per call of each variant at each (case, m), in CUDA graphs over rotating weight copies of
    more than twice the L2 in all (hybrid.ops.linear.graph_us). cases: (model, label, LinearShape);
    variants(x, shape) -> {name: fn(w, b)}. Rows: model, proj, m, n, k, us, weight_bytes, copies."""
    import math

    from hybrid.ops import linear as L

    l2 = torch.cuda.get_device_properties(0).L2_cache_size or (50 << 20)
    rows = []
    for model, label, shape in cases:
        wbytes = shape.n * shape.k * torch.empty((), dtype=dtype).element_size()
        copies = max(8, min(L.MAX_COPIES, math.ceil(max(2 * l2, 50 << 20) / wbytes)))
        ws = [torch.empty(shape.n, shape.k, device="cuda", dtype=dtype).normal_(0, shape.k ** -0.5)
              for _ in range(copies)]
        bs = [torch.empty(shape.n, device="cuda", dtype=dtype).normal_() if shape.has_bias else None
              for _ in range(copies)]
        for m in ms:
            x = torch.randn(m, shape.k, device="cuda", dtype=dtype)
            us = {v: L.graph_us([lambda w=w, b=b, fn=fn: fn(w, b) for w, b in zip(ws, bs)])
                  for v, fn in variants(x, shape).items()}
            rows.append(dict(model=model, proj=label, m=m, n=shape.n, k=shape.k, has_bias=shape.has_bias,
                             act=shape.act, us={v: round(t, 3) for v, t in us.items()}, weight_bytes=wbytes,
                             copies=copies))
        del ws, bs
        torch.cuda.empty_cache()
    return rows


def find_cuobjdump() -> str | None:
    """cuobjdump on PATH, else the copy Triton's NVIDIA backend ships (CPU machines without a CUDA
    toolkit's bin/ on PATH), else None."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton

        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(path) if path.exists() else None
    except ImportError:
        return None
