"""A projection followed by the residual add + norm of the block boundary, as one dispatch:

    y = x @ w.T + b                      (rounded to the model dtype, as linear() returns it)
    residual_out = y + residual          (rounded to the model dtype, as HF adds)
    normed = LayerNorm(residual_out)     (OPT; norm_b given) or RMSNorm (LLaMA; norm_b None)

Why: in a decode step every o_proj and fc2/down projection is followed by ops.add_layernorm /
add_rmsnorm, a separate launch of ~2 us that reads back what the GEMM just wrote (49 launches per
OPT-1.3B step, ~100 us at batch 16, bench/kernels/NOTES.md). With split-K the GEMM already ends in
a reduce kernel; "splitk{S}" here makes that reduce do the bias, the residual add and the norm too,
one program per row (the norm needs the whole row), so the norm launch disappears:

- "unfused": linear() (whatever its own table picked) + the add-norm op: the reference path.
- "splitk{S}": torch.bmm into fp32 partials over S K-slices of the stored weight (read in place,
  linear.splitk_partials), then _splitk_add_norm_kernel.
- "skinny_norm" / "skinny_norm_pdl": csrc/skinny_gemm.cu's block-end build, one CUDA launch (the
  second with programmatic dependent launch): each cluster stores its column tile of the residual
  sum and the last cluster to finish normalises the rows, so no CTA waits on another and no second
  kernel boundary is crossed. M <= 64, N <= 4096, N and K multiples of 64 (cuda_backend). Correct,
  but slower in the decode step than the unfused path, so not offered to the autotune by default
  (set_skinny_norm_offered).

autotune_linear_norms() times both in CUDA graphs over rotating weight copies (as linear.py's
autotune, whose choices the unfused path uses, so run that first) per (shape, norm, batch bucket)
and fills this module's table. Same rounding steps as the unfused path: with the same split the
results agree to the last bit up to the order of the row sums.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch

from hybrid.ops import l2_prefetch, pdl
from hybrid.ops.pdl import gdc_launch_dependents
from hybrid.ops import linear as L

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

log = logging.getLogger(__name__)

NORMS = ("layer", "rms")


@dataclass(frozen=True)
class LinearNormShape:
    """A projection [n, k] (optional bias) whose output meets a residual and a norm over n."""

    n: int
    k: int
    has_bias: bool
    norm: str  # "layer" | "rms"


@dataclass
class LinearNormTiming:
    m: int
    n: int
    k: int
    dtype: str
    has_bias: bool
    norm: str
    us: dict[str, float]
    chosen: str
    weight_bytes: int
    copies: int
    rejected: dict[str, str] = field(default_factory=dict)

    def row(self) -> dict:
        return asdict(self)


_table: dict[tuple, tuple[list[int], list[str]]] = {}
_timings: dict[tuple, LinearNormTiming] = {}


def _key(n, k, dtype, has_bias, norm) -> tuple:
    return (n, k, dtype, has_bias, norm)


SKINNY_NORM_VARIANTS = ("skinny_norm", "skinny_norm_pdl")


def set_choice(shape: LinearNormShape, dtype: torch.dtype, m: int, variant: str) -> None:
    if variant != "unfused" and variant not in SKINNY_NORM_VARIANTS and L._split_of(variant) is None:
        raise ValueError(f"unknown linear+norm variant {variant!r}")
    if shape.norm not in NORMS:
        raise ValueError(f"unknown norm {shape.norm!r}; choose from {NORMS}")
    L.bucket_put(_table, _key(shape.n, shape.k, dtype, shape.has_bias, shape.norm), m, variant)


def clear_choices() -> None:
    _table.clear()


_forced: str | None = None


def set_forced(variant: str | None) -> None:
    """Every linear_add_norm call runs `variant` (None: the table's choice), for A/B runs in one
    process (bench.kernels.decode_knockout --norm-variant). Variants a call's inputs do not fit
    fall back as run_variant does."""
    global _forced
    if variant is not None and variant != "unfused" and variant not in SKINNY_NORM_VARIANTS \
            and L._split_of(variant) is None:
        raise ValueError(f"unknown linear+norm variant {variant!r}")
    _forced = variant


def choice(m: int, n: int, k: int, dtype: torch.dtype, has_bias: bool, norm: str) -> str:
    """The variant for m rows: the smallest tuned bucket >= m; "unfused" past the largest, for
    untuned shapes, or while linear()'s dispatch is disabled (EngineConfig.autotune_linear off)."""
    if not L.is_enabled() or m == 0:
        return "unfused"
    return L.bucket_get(_table, _key(n, k, dtype, has_bias, norm), m, "unfused")


def linear_add_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                    residual: torch.Tensor | None, norm_w: torch.Tensor, norm_b: torch.Tensor | None,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, residual_out) of x [M, K] through w [N, K] (+ b), + residual [M, N] (None: no add),
    then LayerNorm(norm_w, norm_b) or, with norm_b None, RMSNorm(norm_w)."""
    norm = "rms" if norm_b is None else "layer"
    if _forced is not None:
        v = _forced
    else:
        v = choice(x.shape[0], w.shape[0], w.shape[1], w.dtype, b is not None, norm) if _table else "unfused"
    return run_variant(v, x, w, b, residual, norm_w, norm_b, eps)


def run_variant(variant: str, x, w, b, residual, norm_w, norm_b, eps):
    if variant == "unfused":
        return _unfused(x, w, b, residual, norm_w, norm_b, eps)
    if variant in SKINNY_NORM_VARIANTS:
        return _skinny_norm(x, w, b, residual, norm_w, norm_b, eps, pdl=variant == "skinny_norm_pdl")
    s = L._split_of(variant)
    if s is None:
        raise ValueError(f"unknown linear+norm variant {variant!r}")
    if l2_prefetch.enabled():
        l2_prefetch.before_gemm(w)
    return splitk_add_norm(L.splitk_partials(x, w, s), b, residual, norm_w, norm_b, eps, x.dtype)


def _skinny_norm(x, w, b, residual, norm_w, norm_b, eps, pdl):
    """The CUDA block-end GEMM where it takes the inputs (tuned rows only reach it for shapes
    candidates() offered it); the unfused path for the rows it does not take (e.g. a strided
    residual), with the same result."""
    from hybrid.ops import cuda_skinny as cs

    xc = x.contiguous()
    if residual is not None and not residual.is_contiguous():
        return _unfused(x, w, b, residual, norm_w, norm_b, eps)
    if cs.skinny_gemm_norm_unsupported(xc, w, b, residual, norm_w, norm_b) is not None:
        return _unfused(x, w, b, residual, norm_w, norm_b, eps)
    if l2_prefetch.enabled():
        l2_prefetch.before_gemm(w)
    return cs.skinny_gemm_norm(xc, w, b, residual, norm_w, norm_b, eps, pdl=pdl)


def _unfused(x, w, b, residual, norm_w, norm_b, eps):
    from hybrid import ops

    y = L.linear(x, w, b)
    if norm_b is None:
        return ops.add_rmsnorm(y, residual, norm_w, eps)
    return ops.add_layernorm(y, residual, norm_w, norm_b, eps)


def splitk_add_norm_torch(part, b, residual, norm_w, norm_b, eps, dtype):
    """Reference of the fused reduce: the unfused path's rounding steps in torch."""
    from hybrid.ops import reference

    y = L.splitk_reduce_torch(part, b, None, dtype)
    if norm_b is None:
        return reference.add_rmsnorm(y, residual, norm_w, eps)
    return reference.add_layernorm(y, residual, norm_w, norm_b, eps)


if triton is not None:
    @triton.jit
    def _splitk_add_norm_kernel(out_ptr, res_out_ptr, part_ptr, bias_ptr, res_ptr, w_ptr, b_ptr,
                                rows, stride_o, stride_ro, stride_r, eps,
                                N: tl.constexpr, BLOCK_C: tl.constexpr, SPLITS: tl.constexpr,
                                HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, IS_RMS: tl.constexpr,
                                PDL_TRIGGER: tl.constexpr = False, PDL: tl.constexpr = False,
                                ZERO_PART: tl.constexpr = False):
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK_C)
        mask = c < N
        # The block's parameters first: no decode step writes them, so a PDL-launched program may
        # read them before the wait. Their (cold, DRAM) round trip then overlaps the kernel before
        # instead of sitting between its end and the next GEMM's start.
        w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
        bias = tl.zeros([BLOCK_C], dtype=tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + c, mask=mask, other=0.0).to(tl.float32)
        nb = tl.zeros([BLOCK_C], dtype=tl.float32)
        if not IS_RMS:
            nb = tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
        if PDL:  # PDL-launched (ops/pdl.py): nothing the previous kernels write is read before this
            pdl.prologue()
        if PDL_TRIGGER:  # a PDL-launched GEMM after this may start streaming its weights
            gdc_launch_dependents()
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for s in tl.static_range(SPLITS):  # same order as linear's split-K reduce; unrolled, so all
            # the splits' loads are in flight together (one L2 round trip, not one per split)
            acc += tl.load(part_ptr + (s * rows + row) * N + c, mask=mask, other=0.0).to(tl.float32)
        if ZERO_PART:  # the program is this row's only reader: leave it zero for the next sum. After a
            # barrier: the zeros' layout need not match the loads', so without one a thread could
            # zero columns another thread had not read yet (seen on an H200)
            tl.debug_barrier()
            for s in tl.static_range(SPLITS):
                tl.store(part_ptr + (s * rows + row) * N + c, tl.zeros([BLOCK_C], dtype=tl.float32), mask=mask)
        if HAS_BIAS:
            acc += bias
        h = acc.to(res_out_ptr.dtype.element_ty).to(tl.float32)  # the projection's output, rounded
        if HAS_RESIDUAL:
            h += tl.load(res_ptr + row * stride_r + c, mask=mask, other=0.0).to(tl.float32)
        h_rounded = h.to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + c, h_rounded, mask=mask)
        h = h_rounded.to(tl.float32)
        if IS_RMS:  # as rmsnorm.py: normalised value rounded, times the weight, rounded once
            rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / N + eps)
            normed = (h * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
            y = normed * w
        else:  # as layernorm.py
            mean = tl.sum(h, axis=0) / N
            diff = tl.where(mask, h - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / N + eps)
            y = diff * rstd * w + nb
        tl.store(out_ptr + row * stride_o + c, y.to(out_ptr.dtype.element_ty), mask=mask)


def splitk_add_norm(part: torch.Tensor, b, residual, norm_w, norm_b, eps, dtype, zero_part: bool = False):
    """[S, M, N] partials (contiguous) -> (normed, residual_out) [M, N] in dtype, one launch (a
    Triton kernel on CUDA or under the interpreter; the torch reference otherwise). zero_part: also
    store zeros over the partials once read (each row's program is its only reader), for a sum
    buffer the next producer adds into (cuda_mlp.mlp_accum_buffer); needs part contiguous."""
    from hybrid import ops

    s, m, n = part.shape
    if residual is not None:
        assert residual.shape == (m, n) and residual.stride(1) == 1 and residual.dtype == dtype
    assert norm_w.shape == (n,) and norm_w.is_contiguous()
    assert norm_b is None or (norm_b.shape == (n,) and norm_b.is_contiguous())
    if zero_part and not part.is_contiguous():
        raise ValueError("splitk_add_norm(zero_part=True) needs contiguous partials (it zeroes them in place)")
    if not (part.is_cuda or ops.triton_usable(part.device)):
        out = splitk_add_norm_torch(part, b, residual, norm_w, norm_b, eps, dtype)
        if zero_part:
            part.zero_()
        return out
    part = part.contiguous()
    out = torch.empty(m, n, device=part.device, dtype=dtype)
    res_out = torch.empty_like(out)
    if m:
        from hybrid.ops.layernorm import row_num_warps

        block = triton.next_power_of_2(n)
        res = residual if residual is not None else out
        _splitk_add_norm_kernel[(m,)](
            out, res_out, part, b if b is not None else out, res, norm_w,
            norm_b if norm_b is not None else norm_w, m, out.stride(0), res_out.stride(0),
            res.stride(0), eps, N=n, BLOCK_C=block, SPLITS=s, HAS_BIAS=b is not None,
            HAS_RESIDUAL=residual is not None, IS_RMS=norm_b is None, PDL_TRIGGER=pdl.trigger(part),
            ZERO_PART=bool(zero_part), num_warps=row_num_warps(block), **pdl.launch(part))
    return out, res_out


_skinny_norm_offered = False


def set_skinny_norm_offered(on: bool) -> None:
    """Offer the CUDA block-end GEMM ("skinny_norm*") to the autotune. Off: measured slower in the
    decode step (OPT-1.3B out_proj, batch 16, H200: +3.6 us per layer against the unfused path;
    csrc/NOTES.md "Session 10"). set_choice / set_forced still run it."""
    global _skinny_norm_offered
    _skinny_norm_offered = bool(on)


def candidates(shape: LinearNormShape, device: torch.device | None = None, m: int | None = None,
               dtype: torch.dtype | None = None) -> list[str]:
    """"unfused" (the reference) and the split-K variants; the CUDA block-end GEMM while offered
    (set_skinny_norm_offered, off by default) where its checks take the shape, linear's skinny GEMM
    is offered (EngineConfig.skinny_gemm) and the extension passes its self-check."""
    out = ["unfused"] + [f"splitk{s}" for s in L.SPLITS if shape.k % s == 0 and (shape.k // s) % L.SPLIT_ALIGN == 0]
    if (_skinny_norm_offered and device is not None and device.type == "cuda" and m is not None
            and dtype is not None and L.skinny_offered()):
        from hybrid.ops import cuda_backend as cb
        from hybrid.ops import cuda_skinny as cs

        if (1 <= m <= cs.SKINNY_MAX_M and dtype in cs.SKINNY_DTYPES and shape.n % cs.SKINNY_TILE == 0
                and shape.n <= cs.SKINNY_NORM_MAX_N and shape.k % cs.SKINNY_TILE == 0
                and shape.k * cs.SKINNY_MAX_M < 2**31 and cb.available()
                and cs.skinny_gemm_selfcheck(device, dtype) is None):
            out += list(SKINNY_NORM_VARIANTS)
    return out


@torch.no_grad()
def autotune_linear_norms(shapes: Iterable[LinearNormShape], buckets: Iterable[int],
                          device: torch.device | str, dtype: torch.dtype,
                          min_copies: int = 8) -> list[LinearNormTiming]:
    """Times "unfused" (linear()'s current choice + the add-norm launch) against every split-K
    fused variant per (shape, bucket) in CUDA graphs over rotating weight copies (>= 2x L2), each
    between the neighbours it has in a decoder layer (a projection that writes its input before, a
    [3 n, n] projection after; us = the chain minus the neighbours alone), and fills the table with
    the fastest (unfused unless another wins by linear.PICK_MARGIN). Run linear.autotune_linears
    for the same shapes first. No-op on CPU; cached per process."""
    device = torch.device(device)
    if device.type != "cuda":
        return []
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    L.timings_match_offer()
    buckets = sorted(set(int(m) for m in buckets if m > 0))
    name = torch.cuda.get_device_name(device)
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (50 << 20)
    elt = torch.empty((), dtype=dtype).element_size()
    out = []
    for shape in dict.fromkeys(shapes):
        key = _key(shape.n, shape.k, dtype, shape.has_bias, shape.norm)
        todo = [m for m in buckets if (name, key, m) not in _timings]
        if todo:
            _measure(shape, todo, device, dtype, name, key, l2, elt, min_copies)
        rows = [_timings[(name, key, m)] for m in buckets]
        for r in rows:
            set_choice(shape, dtype, r.m, r.chosen)
        out += rows
        log.log(logging.INFO if todo else logging.DEBUG, "linear %dx%d + add %snorm: %s", shape.n, shape.k, shape.norm,
                 " | ".join(f"M={r.m} {r.chosen} {r.us[r.chosen]:.1f}us (unfused {r.us['unfused']:.1f})"
                            for r in rows))
    return out


def _measure(shape, todo, device, dtype, name, key, l2, elt, min_copies) -> None:
    wbytes = shape.n * shape.k * elt
    ws, bs = L.weight_copies(shape.n, shape.k, shape.has_bias, device, dtype, l2, min_copies)
    copies = len(ws)
    nw = torch.empty(shape.n, device=device, dtype=dtype).normal_(1.0, 0.1)
    nb = torch.empty(shape.n, device=device, dtype=dtype).normal_() if shape.norm == "layer" else None
    eps = 1e-5
    # neighbours as in a decoder layer: a projection before (it writes x) and one after (it reads
    # the normed rows), linear()'s picks, two copies each (the weights streaming in between evict
    # them from L2)
    before_ws, before_bs = L.weight_copies(shape.k, shape.n, shape.has_bias, device, dtype, 0, 2)
    after_ws, after_bs = L.weight_copies(3 * shape.n, shape.n, shape.has_bias, device, dtype, 0, 2)
    for m in todo:
        x = torch.empty(m, shape.k, device=device, dtype=dtype).normal_()
        res = torch.empty(m, shape.n, device=device, dtype=dtype).normal_()
        ref_n, ref_r = _unfused(x, ws[0], bs[0], res, nw, nb, eps)

        def in_layer(v, i):
            h = L.linear(res, before_ws[i % 2], before_bs[i % 2])  # [m, k]: the block's input
            if v is not None:
                res_n, _ = run_variant(v, h, ws[i], bs[i], res, nw, nb, eps)
            else:
                res_n = res
            return L.linear(res_n, after_ws[i % 2], after_bs[i % 2])

        # In context: each candidate between its neighbours, minus the neighbours alone. Timed back
        # to back with copies of itself, split-K (cuBLAS bmm, no programmatic dependent launch, +
        # the reduce) measured 1 us faster than the unfused path at OPT-1.3B out_proj M=16 on an
        # H200, but 2 us per layer slower in the decode step (bench.kernels.decode_knockout
        # --norm-variant), where the PDL kernels around it overlap their prologues with it.
        neighbours = L.graph_us([lambda i=i: in_layer(None, i) for i in range(copies)])
        us, rejected = {}, {}
        for v in candidates(shape, device, m, dtype):
            try:
                got_n, got_r = run_variant(v, x, ws[0], bs[0], res, nw, nb, eps)
                if not (L._close(got_r, ref_r) and L._close(got_n, ref_n)):
                    rejected[v] = "result differs from the unfused path"
                    continue
                us[v] = L.graph_us([lambda i=i, v=v: in_layer(v, i) for i in range(copies)]) - neighbours
            except Exception as err:  # noqa: BLE001 - a variant that fails here is never chosen
                rejected[v] = repr(err)[:200]
        if "unfused" not in us:
            raise RuntimeError(f"unfused linear+norm failed for {shape} at M={m}: {rejected.get('unfused')}")
        best = min(us, key=us.get)
        if best != "unfused" and us[best] > (1 - L.PICK_MARGIN) * us["unfused"]:
            best = "unfused"
        for v, why in rejected.items():
            log.warning("linear+norm %s M=%d: %s rejected (%s)", shape, m, v, why)
        _timings[(name, key, m)] = LinearNormTiming(
            m=m, n=shape.n, k=shape.k, dtype=str(dtype).removeprefix("torch."), has_bias=shape.has_bias,
            norm=shape.norm, us={v: round(t, 3) for v, t in us.items()}, chosen=best,
            weight_bytes=wbytes, copies=copies, rejected=rejected)
        del x, res
    del ws, bs, before_ws, before_bs, after_ws, after_bs
    torch.cuda.empty_cache()
