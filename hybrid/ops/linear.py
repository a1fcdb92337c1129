"""Projections (x @ w.T + b, optionally ReLU) dispatched per weight shape and row count to the
fastest of a few implementations over the same stored weight, measured on the GPU at engine start.

Why: decode GEMMs are skinny (M = the batch bucket, 1..256 rows) and memory-bound, and cuBLAS'
heuristic does not always fill the GPU for them (OPT-1.3B o_proj at M=16: 32 CTAs, 6.1 us for a
2 us weight-bytes floor) or adds a separate split-K reduce (qkv at M=16). Candidates, all reading
the one stored weight w [N, K] in place (no second copy of any weight):
- "cublas": F.linear; bias + ReLU through torch._addmm_activation (the cuBLASLt epilogue).
- "lt": the same call with cuBLASLt preferred (torch's BLAS preference is set and restored around
  the call on the host, so a CUDA graph captures whichever kernel the call launched).
- "cuda_skinny": csrc/skinny_gemm.cu, tensor-core mma over the stored weight with 16-byte loads,
  K split over warps and over the CTAs of a cluster (M <= 64, N and K multiples of 64).
- "lt{i}": the i-th candidate of cuBLASLt's own heuristic for exactly this (M, N, K, bias, act)
  (hybrid/ops/cublaslt.py, through ctypes): other tile shapes, split-K and cluster shapes than the
  first pick torch runs. On an H200 the best of them beat F.linear by 0.5-4 us on some decode
  shapes (OPT-1.3B lm_head M=16 54.0 -> 50.2 us, fc1 M=64 12.3 -> 11.6; bench/kernels/lt_algos.py),
  but the engine's decode step did not get faster with them, so they are offered only with
  EngineConfig.cublaslt_gemm / HYBRID_LT_GEMM=1.
- "splitk{S}": torch.bmm of x viewed [S, M, K/S] and w viewed [S, K/S, N] (strided views, no copies)
  into fp32 partials [S, M, N], then one Triton kernel sums them and adds bias / ReLU: S times the
  CTAs of the plain GEMM, fp32 accumulation throughout like cuBLAS' own split-K.

autotune_linears() times every candidate inside CUDA graphs over >= 8 distinct weight copies that
together exceed twice the L2 (so no timing is flattered by L2 hits), per (shape, batch bucket), and
fills the choice table; linear() looks up the smallest tuned bucket >= M (exact for graph buckets),
and uses cuBLAS beyond the largest (prefill) or for untuned shapes. Results are cached per process.
"""
from __future__ import annotations

import bisect
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from hybrid.ops import l2_prefetch as _l2_prefetch
from hybrid.ops import pdl as _pdl
from hybrid.ops.pdl import gdc_launch_dependents

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA torch
    triton = None

log = logging.getLogger(__name__)

ACTS = (None, "relu")
SPLITS = (2, 4, 8)
SPLIT_ALIGN = 64
"""split-K candidates need K/S to be a multiple of this (whole GEMM K tiles per slice)."""
MAX_COPIES = 128
"""Weight copies rotated through per timing at most (see _measure)."""
LT_ALGOS = 8
"""cuBLASLt heuristic candidates offered per (shape, bucket) ("lt0" .. "lt7")."""
LT_MAX_M = 256
"""cuBLASLt candidates are offered for decode buckets up to this many rows."""
LT_ALIGN = 256
"""Operand alignment (bytes) the cuBLASLt heuristic assumes by default; other operands use F.linear."""
PICK_MARGIN = 0.02
"""A non-cuBLAS variant must beat cuBLAS by this fraction to be chosen (timing noise is ~1%)."""


@dataclass(frozen=True)
class LinearShape:
    """One projection of a model: weight [n, k], optional bias [n], optional activation."""

    n: int
    k: int
    has_bias: bool = False
    act: str | None = None


@dataclass
class LinearTiming:
    """Measured us per call of each candidate at one (shape, rows) and the one chosen."""

    m: int
    n: int
    k: int
    dtype: str
    has_bias: bool
    act: str | None
    us: dict[str, float]
    chosen: str
    weight_bytes: int
    copies: int
    copy_bandwidth: float
    """bytes/s (read + write) of a device copy on this card, the bandwidth reference."""
    rejected: dict[str, str] = field(default_factory=dict)
    """Candidates not timed, and why (wrong result, hidden weight copy, error)."""

    def pct_bandwidth(self, variant: str | None = None) -> float:
        """Weight bytes / time as % of the measured copy bandwidth."""
        us = self.us[variant or self.chosen]
        return 100.0 * self.weight_bytes / (us * 1e-6) / self.copy_bandwidth

    def row(self) -> dict:
        d = asdict(self)
        d["pct_bw"] = {v: round(self.pct_bandwidth(v), 1) for v in self.us}
        return d


# ---- the dispatch table -----------------------------------------------------------------------
_Key = tuple  # (n, k, dtype, has_bias, act)
_table: dict[_Key, tuple[list[int], list[str]]] = {}
_enabled = True
_timings: dict[tuple, LinearTiming] = {}  # (device name, key, m) -> measurement, per process


def _key(n: int, k: int, dtype: torch.dtype, has_bias: bool, act: str | None) -> _Key:
    return (n, k, dtype, has_bias, act)


_skinny_offered = True


def set_skinny_offered(on: bool) -> None:
    """Offer the CUDA skinny GEMM (plain and PDL) to the autotune (EngineConfig.skinny_gemm). The
    environment variable HYBRID_SKINNY_GEMM=0 / 1, where set, overrides it."""
    global _skinny_offered
    _skinny_offered = bool(on)


def skinny_offered() -> bool:
    env = os.environ.get("HYBRID_SKINNY_GEMM")
    return env == "1" if env in ("0", "1") else _skinny_offered


_lt_offered = False


def set_lt_offered(on: bool) -> None:
    """Offer cuBLASLt's other heuristic candidates ("lt0".."lt7") to the autotune
    (EngineConfig.cublaslt_gemm). HYBRID_LT_GEMM=0 / 1 in the environment overrides it."""
    global _lt_offered
    _lt_offered = bool(on)


def lt_offered() -> bool:
    env = os.environ.get("HYBRID_LT_GEMM")
    return env == "1" if env in ("0", "1") else _lt_offered


_timed_with_skinny: tuple | None = None


def timings_match_offer() -> None:
    """Drops the per-process timings (this module's and linear_norm's, whose "unfused" path runs
    linear()'s pick) when they were measured with other offers (skinny_offered(), lt_offered())
    than now."""
    global _timed_with_skinny
    now = (skinny_offered(), lt_offered())
    if _timed_with_skinny is not None and _timed_with_skinny != now:
        from hybrid.ops import linear_norm

        _timings.clear()
        linear_norm._timings.clear()
    _timed_with_skinny = now


def set_enabled(enabled: bool) -> None:
    """False: linear() is plain F.linear (+ ReLU) whatever the table holds (EngineConfig flag)."""
    global _enabled
    _enabled = bool(enabled)


def is_enabled() -> bool:
    return _enabled


def bucket_put(table: dict, key: tuple, m: int, variant: str) -> None:
    """table[key] holds sorted row buckets and the variant of each; set (or replace) bucket m."""
    ms, vs = table.setdefault(key, ([], []))
    i = bisect.bisect_left(ms, m)
    if i < len(ms) and ms[i] == m:
        vs[i] = variant
    else:
        ms.insert(i, m)
        vs.insert(i, variant)


def bucket_get(table: dict, key: tuple, m: int, default: str) -> str:
    """The variant of the smallest bucket >= m under key; default past the largest or untuned."""
    entry = table.get(key)
    if entry is None:
        return default
    ms, vs = entry
    i = bisect.bisect_left(ms, m)
    return vs[i] if i < len(ms) else default


def set_choice(shape: LinearShape, dtype: torch.dtype, m: int, variant: str) -> None:
    """Use `variant` for rows up to bucket m of this shape (autotune, or a test forcing a table)."""
    if not known_variant(variant):
        raise ValueError(f"unknown linear variant {variant!r}")
    if shape.act not in ACTS:
        raise ValueError(f"unknown activation {shape.act!r}")
    bucket_put(_table, _key(shape.n, shape.k, dtype, shape.has_bias, shape.act), m, variant)


_forced: tuple[str, int, int | None] | None = None


def set_forced(variant: str | None, max_m: int = 64, only_n: int | None = None) -> None:
    """Experiment switch (bench.engine_decode --force-linear, bench.kernels.decode_knockout
    --linear-variant): every projection with at most max_m rows (and, given only_n, exactly only_n
    output features, i.e. one weight shape of a model) runs `variant` where it takes the shape (the
    skinny kernels: N, K multiples of 64), whatever the autotune table says; None turns it off. Read
    at trace time, like the table."""
    global _forced
    if variant is not None and not known_variant(variant):
        raise ValueError(f"unknown linear variant {variant!r}")
    if only_n is not None and int(only_n) <= 0:
        raise ValueError(f"only_n must be a positive output width, got {only_n}")
    _forced = None if variant is None else (variant, int(max_m), None if only_n is None else int(only_n))


def _forced_choice(m: int, n: int, k: int, dtype: torch.dtype) -> str | None:
    if _forced is None or m > _forced[1] or (_forced[2] is not None and n != _forced[2]):
        return None
    v = _forced[0]
    if v in SKINNY_VARIANTS and not (n % 64 == 0 and k % 64 == 0 and dtype in (torch.bfloat16, torch.float16)):
        return None
    s = _split_of(v)
    if s is not None and k % s:
        return None
    return v


def clear_choices() -> None:
    """Empty the table (every call back to cuBLAS); measurements stay cached."""
    _table.clear()


def choice(m: int, n: int, k: int, dtype: torch.dtype, has_bias: bool, act: str | None) -> str:
    """The variant linear() runs for m rows: the choice of the smallest tuned bucket >= m, cuBLAS
    past the largest bucket, for untuned shapes, or while disabled."""
    if not _enabled or m == 0:
        return "cublas"
    forced = _forced_choice(m, n, k, dtype) if _forced is not None else None
    if forced is not None:
        return forced
    return bucket_get(_table, _key(n, k, dtype, has_bias, act), m, "cublas")


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
           act: str | None = None) -> torch.Tensor:
    """act(x @ w.T + b) for x [..., K], w [N, K], b [N] | None, act None | "relu"; F.linear's
    result up to the floating-point reduction order of the chosen variant."""
    if _l2_prefetch.enabled():
        _l2_prefetch.before_gemm(w)
    if (not _table and _forced is None) or not _enabled:
        return _cublas(x, w, b, act)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    v = choice(x2.shape[0], w.shape[0], w.shape[1], w.dtype, b is not None, act)
    if v == "cublas":
        return _cublas(x, w, b, act)
    return run_variant(v, x2, w, b, act).view(*lead, w.shape[0])


def linear_kv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, k_cache: torch.Tensor,
              v_cache: torch.Tensor, slots: torch.Tensor, kv_col0: int) -> tuple[torch.Tensor, bool]:
    """linear(x, w, b) of a fused qkv projection in a decode step, plus (where the chosen variant is
    the CUDA skinny GEMM) the paged KV-cache write of its key / value columns in the same launch:
    columns [kv_col0, kv_col0 + W) go to k_cache and the next W to v_cache at each row's slot
    (W = kv_heads * head_size; slots < 0 skipped), as write_kv_cache would store them. Returns
    (y, written): written False means the caller still has to write the cache."""
    if (not _table and _forced is None) or not _enabled or x.dim() != 2 or not x.is_cuda:
        return linear(x, w, b), False
    v = choice(x.shape[0], w.shape[0], w.shape[1], w.dtype, b is not None, None)
    if v in OFFERED_SKINNY:  # the mma.sync kernel has the KV-write epilogue; the wgmma one does not
        from hybrid.ops import cuda_skinny as cs

        xc = x.contiguous()
        if (cs.skinny_gemm_unsupported(xc, w, b) is None
                and cs.skinny_kv_unsupported(xc, w, k_cache, v_cache, slots, kv_col0) is None):
            y = cs.skinny_gemm(xc, w, b, False, pdl=v == "cuda_skinny_pdl", kv=(k_cache, v_cache, slots, kv_col0))
            return y, True
    return linear(x, w, b), False


# ---- the candidates ---------------------------------------------------------------------------
def _cublas(x, w, b, act):
    if act is None:
        return F.linear(x, w, b)
    if x.is_cuda and b is not None and x.dim() == 2:
        # bias + ReLU in the cuBLASLt epilogue: one kernel and one [M, N] write fewer than a ReLU
        # after the GEMM (same result: ReLU commutes with the rounding to the output dtype)
        return torch._addmm_activation(b, x, w.t())
    from hybrid import ops

    return ops.relu(F.linear(x, w, b).contiguous())


def _lt(x, w, b, act):
    prev = torch._C._get_blas_preferred_backend()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        return _cublas(x, w, b, act)
    finally:
        torch._C._set_blas_preferred_backend(prev)


def _skinny(x, w, b, act, pdl=False):
    """csrc/skinny_gemm.cu (tensor-core decode GEMM, M <= 64). Offered by candidates() only where
    the extension loads, passes its self-check and takes the shape; anything else (e.g. an
    unaligned activation view at run time) goes to cuBLAS, which computes the same thing."""
    from hybrid.ops import cuda_skinny as cs

    xc = x.contiguous()
    if cs.skinny_gemm_unsupported(xc, w, b) is not None:
        return _cublas(x, w, b, act)
    return cs.skinny_gemm(xc, w, b, act == "relu", pdl=pdl)


def _skinny_pdl(x, w, b, act):
    """_skinny launched with programmatic dependent launch: its first weight stages stream while
    the previous kernel drains (csrc/skinny_gemm.cu); the result is the same."""
    return _skinny(x, w, b, act, pdl=True)


def _skinny_wg(x, w, b, act, pdl=False):
    """csrc/skinny_wgmma.cu (the skinny GEMM on warpgroup MMA, 64-row tiles; sm_90a builds). Not
    offered to the autotune yet (set_forced / set_choice run it); cuBLAS where it cannot run."""
    from hybrid.ops import cuda_skinny as cs

    xc = x.contiguous()
    if cs.skinny_gemm_unsupported(xc, w, b) is not None or not cs.skinny_gemm_wgmma_available():
        return _cublas(x, w, b, act)
    return cs.skinny_gemm_wgmma(xc, w, b, act == "relu", pdl=pdl)


def _skinny_wg_pdl(x, w, b, act):
    return _skinny_wg(x, w, b, act, pdl=True)


def _streamk(x, w, b, act, pdl=False):
    """csrc/skinny_streamk.cu (stream-K over every SM, TMA ring, wgmma; sm_90a builds). Not offered
    to the autotune yet (set_forced / set_choice run it); cuBLAS where it cannot run."""
    from hybrid.ops import cuda_streamk as sk

    xc = x.contiguous()
    if sk.unsupported(xc, w, b) is not None or not sk.available():
        return _cublas(x, w, b, act)
    return sk.skinny_gemm_streamk(xc, w, b, act == "relu", pdl=pdl)


def _streamk_pdl(x, w, b, act):
    return _streamk(x, w, b, act, pdl=True)


VARIANTS: dict[str, Callable] = {"cublas": _cublas, "lt": _lt, "cuda_skinny": _skinny,
                                 "cuda_skinny_pdl": _skinny_pdl, "cuda_skinny_wg": _skinny_wg,
                                 "cuda_skinny_wg_pdl": _skinny_wg_pdl, "cuda_streamk": _streamk,
                                 "cuda_streamk_pdl": _streamk_pdl}
SKINNY_VARIANTS = ("cuda_skinny", "cuda_skinny_pdl", "cuda_skinny_wg", "cuda_skinny_wg_pdl", "cuda_streamk",
                   "cuda_streamk_pdl")
OFFERED_SKINNY = ("cuda_skinny", "cuda_skinny_pdl")  # what candidates() adds


def _split_of(variant: str) -> int | None:
    if variant.startswith("splitk") and variant[6:].isdigit():
        return int(variant[6:])
    return None


def _lt_index(variant: str) -> int | None:
    if variant.startswith("lt") and variant[2:].isdigit():
        return int(variant[2:])
    return None


def known_variant(variant: str) -> bool:
    return variant in VARIANTS or _split_of(variant) is not None or _lt_index(variant) is not None


def _lt_algo(x, w, b, act, i: int):
    """cuBLASLt heuristic candidate i for this exact shape (hybrid/ops/cublaslt.py). Falls back to
    F.linear where cuBLASLt is not usable, the plan has fewer candidates (rows other than the tuned
    bucket), or the call is refused (e.g. an operand alignment the algorithm does not take)."""
    from hybrid.ops import cublaslt

    if (not x.is_cuda or x.dim() != 2 or act not in (None, "relu") or (act == "relu" and b is None)
            or x.dtype not in (torch.bfloat16, torch.float16) or not cublaslt.available()):
        return _cublas(x, w, b, act)
    m, k = x.shape
    try:
        p = cublaslt.plan(m, w.shape[0], k, w.dtype, b is not None, act, x.device.index or 0, LT_ALGOS)
        x = x.contiguous()
        # the heuristic assumed cuBLASLt's default 256-byte operand alignment
        if (i >= len(p.infos) or not w.is_contiguous()
                or any(t.data_ptr() % LT_ALIGN for t in (x, w, b) if t is not None)):
            return _cublas(x, w, b, act)
        return p.run(i, x, w, b)
    except (RuntimeError, ValueError) as err:
        log.debug("cuBLASLt candidate %d refused (%s): F.linear", i, err)
        return _cublas(x, w, b, act)


def splitk_views(x: torch.Tensor, w: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> [S, M, K/S] and w [N, K] -> [S, K/S, N]: views, no data moved. Both have unit
    stride in one of their two matrix dims, which cuBLAS' strided-batched GEMM takes as is."""
    m, k = x.shape
    n = w.shape[0]
    ks = k // s
    return x.view(m, s, ks).transpose(0, 1), w.view(n, s, ks).permute(1, 2, 0)


_fp32_partials = True


def splitk_partials(x: torch.Tensor, w: torch.Tensor, s: int) -> torch.Tensor:
    """[S, M, N] partial products of x [M, K] and the S K-slices of w [N, K], read in place: fp32
    on CUDA (accumulation stays fp32 across the slices, as in cuBLAS' own split-K), else x's dtype."""
    m, k = x.shape
    if k % s or not w.is_contiguous():
        raise ValueError(f"splitk{s}: K={k} not divisible or weight not contiguous")
    if x.stride(1) != 1:
        x = x.contiguous()  # activations only (small); the weight is always read in place
    a, bm = splitk_views(x, w, s)  # [S, M, K/S], [S, K/S, N]
    if x.is_cuda and x.dtype != torch.float32:
        global _fp32_partials
        if _fp32_partials:
            try:
                return torch.bmm(a, bm, out_dtype=torch.float32)
            except (RuntimeError, TypeError) as err:  # torch without bmm's out_dtype
                log.warning("bmm out_dtype=float32 unavailable (%s): split-K partials in %s", err, x.dtype)
                _fp32_partials = False
    return torch.bmm(a, bm)


def splitk(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, act: str | None, s: int) -> torch.Tensor:
    part = splitk_partials(x, w, s)
    if x.is_cuda:
        return splitk_reduce_triton(part, b, act, x.dtype)
    return splitk_reduce_torch(part, b, act, x.dtype)


def splitk_reduce_torch(part: torch.Tensor, b, act, dtype) -> torch.Tensor:
    out = part.float().sum(0)  # [M, N]
    if b is not None:
        out = out + b.float()
    if act == "relu":
        out = out.relu()
    return out.to(dtype)


if triton is not None:
    @triton.jit
    def _splitk_reduce_kernel(out_ptr, part_ptr, bias_ptr, numel, n, splits,
                              HAS_BIAS: tl.constexpr, RELU: tl.constexpr, BLOCK: tl.constexpr,
                              PDL_TRIGGER: tl.constexpr = False, PDL: tl.constexpr = False):
        if PDL:  # PDL-launched (ops/pdl.py): nothing is touched before the previous kernel ends
            _pdl.prologue()
        if PDL_TRIGGER:  # a PDL-launched GEMM after this may start streaming its weights (ops/pdl.py)
            gdc_launch_dependents()
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(splits):
            acc += tl.load(part_ptr + s * numel + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs % n, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            acc = tl.maximum(acc, 0.0)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


_REDUCE_BLOCK = 1024


def splitk_reduce_triton(part: torch.Tensor, b, act, dtype) -> torch.Tensor:
    """[S, M, N] partials (contiguous) -> act(sum + b) [M, N] in dtype: one kernel."""
    s, m, n = part.shape
    out = torch.empty(m, n, device=part.device, dtype=dtype)
    numel = m * n
    if numel:
        grid = (triton.cdiv(numel, _REDUCE_BLOCK),)
        _splitk_reduce_kernel[grid](out, part, b if b is not None else out, numel, n, s,
                                    HAS_BIAS=b is not None, RELU=act == "relu", BLOCK=_REDUCE_BLOCK,
                                    PDL_TRIGGER=_pdl.trigger(part), num_warps=4, **_pdl.launch(part))
    return out


def run_variant(variant: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                act: str | None) -> torch.Tensor:
    """x [M, K] through one named variant (any K % S == 0 works; autotune only offers aligned S)."""
    s = _split_of(variant)
    if s is not None:
        return splitk(x, w, b, act, s)
    i = _lt_index(variant)
    if i is not None:
        return _lt_algo(x, w, b, act, i)
    return VARIANTS[variant](x, w, b, act)


def candidates(shape: LinearShape, device: torch.device, m: int | None = None,
               dtype: torch.dtype | None = None) -> list[str]:
    """Variants worth timing for this shape (and, given, rows m and dtype): cuBLAS first (the
    reference), then the rest. "cuda_skinny" only for m <= 64, a shape it takes, and where the
    CUDA extension loads and passes its moderate-size self-check (so a broken build is never timed
    at real shapes). Offered while skinny_offered() (EngineConfig.skinny_gemm, on by default): with
    the PDL launches of the kernels around it, the engine measured 1-2.5% faster at batch 16 and
    the same at 64-128 on an H200 (csrc/NOTES.md)."""
    out = ["cublas"]
    if device.type == "cuda" and not (shape.has_bias and shape.act):  # bias+ReLU is already Lt
        out.append("lt")
    out += [f"splitk{s}" for s in SPLITS if shape.k % s == 0 and (shape.k // s) % SPLIT_ALIGN == 0]
    if (device.type == "cuda" and lt_offered() and m is not None and 1 <= m <= LT_MAX_M and dtype in (torch.bfloat16, torch.float16)
            and (shape.act is None or (shape.act == "relu" and shape.has_bias))):
        from hybrid.ops import cublaslt

        if cublaslt.available():
            try:
                n_lt = len(cublaslt.plan(m, shape.n, shape.k, dtype, shape.has_bias, shape.act,
                                         device.index or 0, LT_ALGOS).infos)
            except (RuntimeError, ValueError) as err:
                log.info("cuBLASLt candidates for %s M=%d not offered: %s", shape, m, err)
                n_lt = 0
            out += [f"lt{i}" for i in range(n_lt)]
    if (device.type == "cuda" and m is not None and dtype is not None and shape.act in (None, "relu")
            and skinny_offered()):
        from hybrid.ops import cuda_backend as cb
        from hybrid.ops import cuda_skinny as cs

        if (1 <= m <= cs.SKINNY_MAX_M and dtype in cs.SKINNY_DTYPES and shape.n % cs.SKINNY_TILE == 0
                and shape.k % cs.SKINNY_TILE == 0 and shape.k * cs.SKINNY_MAX_M < 2**31
                and cb.available() and cs.skinny_gemm_selfcheck(device, dtype) is None):
            out += list(OFFERED_SKINNY)
    return out


# ---- timing -----------------------------------------------------------------------------------
def graph_us(fns: list[Callable[[], object]], reps: int = 2) -> float:
    """us per call of fns captured back to back (reps times) in one CUDA graph: no Python launch
    cost in the number, as in the engine's captured decode step. Median of 5 replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()  # warm-up: Triton compile, cuBLAS workspace, allocator
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for fn in fns:
                fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (reps * len(fns)))
    del graph
    return sorted(times)[2]


_bandwidth: dict[str, float] = {}


def copy_bandwidth(device: torch.device, nbytes: int = 512 << 20) -> float:
    """Device-to-device copy bytes/s (read + write) of an fp32 buffer, once per process and card:
    the convention of bench/hardware.py's measure_copy_bandwidth (4.25 TB/s on an H200). A bf16 copy
    captured in a CUDA graph read only 2.7 TB/s there, so it is not used as the yardstick."""
    name = torch.cuda.get_device_name(device)
    if name not in _bandwidth:
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        dst.copy_(src)  # first touch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(10):
            dst.copy_(src)
        end.record()
        end.synchronize()
        _bandwidth[name] = 2 * nbytes * 10 / (start.elapsed_time(end) * 1e-3)
        del src, dst
    return _bandwidth[name]


def allocated_during(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes the caching allocator handed out while fn() ran (a hidden weight copy shows here)."""
    key = "allocated_bytes.all.allocated"
    before = torch.cuda.memory_stats(device).get(key, 0)
    out = fn()
    after = torch.cuda.memory_stats(device).get(key, 0)
    del out
    return after - before


def _close(y: torch.Tensor, ref: torch.Tensor) -> bool:
    y, ref = y.float(), ref.float()
    tol = 2e-2 * ref.abs().max().item() + 1e-6
    return bool(((y - ref).abs() <= tol).all())


@torch.no_grad()
def autotune_linears(shapes: Iterable[LinearShape], buckets: Iterable[int], device: torch.device | str,
                     dtype: torch.dtype, *, variants: Iterable[str] | None = None,
                     min_copies: int = 8) -> list[LinearTiming]:
    """Times every candidate for every (shape, bucket) on the GPU and fills linear()'s choice table
    with the fastest (cuBLAS unless another wins by PICK_MARGIN). Weight copies: >= min_copies and
    >= 2x the L2 size in total, rotated through inside one graph. Measurements are cached per
    process; a call for shapes already measured only re-fills the table. Returns the timings of
    every (shape, bucket) asked for. No-op on CPU. Call outside any CUDA-graph capture."""
    device = torch.device(device)
    if device.type != "cuda":
        return []
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    timings_match_offer()
    buckets = sorted(set(int(m) for m in buckets if m > 0))
    name = torch.cuda.get_device_name(device)
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (50 << 20)
    bw = copy_bandwidth(device)
    elt = torch.empty((), dtype=dtype).element_size()
    out = []
    for shape in dict.fromkeys(shapes):  # unique, in order
        key = _key(shape.n, shape.k, dtype, shape.has_bias, shape.act)
        todo = [m for m in buckets if (name, key, m) not in _timings]
        if todo:
            _measure(shape, todo, device, dtype, name, key, l2, bw, elt, variants, min_copies)
        rows = [_timings[(name, key, m)] for m in buckets]
        for r in rows:
            set_choice(shape, dtype, r.m, r.chosen)
        out += rows
        log.log(logging.INFO if todo else logging.DEBUG, "linear %dx%d%s%s: %s", shape.n, shape.k, " +bias" if shape.has_bias else "",
                 f" +{shape.act}" if shape.act else "",
                 " | ".join(f"M={r.m} {r.chosen} {r.us[r.chosen]:.1f}us {r.pct_bandwidth():.0f}%"
                            + (f" (cublas {r.us['cublas']:.1f})" if r.chosen != "cublas" else "")
                            for r in rows))
    return out


def weight_copies(n: int, k: int, has_bias: bool, device, dtype, l2: int, min_copies: int):
    """Distinct random [n, k] weights (and [n] biases or None) for timing: >= min_copies and >= 2x
    the L2 in total, so rotating through them in one graph never times L2 hits. Small weights
    would need thousands of copies to outgrow L2; past MAX_COPIES they are launch-bound anyway."""
    wbytes = n * k * torch.empty((), dtype=dtype).element_size()
    copies = max(min_copies, min(MAX_COPIES, math.ceil(2 * l2 / wbytes)))
    ws = [torch.empty(n, k, device=device, dtype=dtype).normal_(0, k ** -0.5) for _ in range(copies)]
    bs = [torch.empty(n, device=device, dtype=dtype).normal_() if has_bias else None for _ in range(copies)]
    return ws, bs


def _measure(shape, todo, device, dtype, name, key, l2, bw, elt, variants, min_copies) -> None:
    wbytes = shape.n * shape.k * elt
    ws, bs = weight_copies(shape.n, shape.k, shape.has_bias, device, dtype, l2, min_copies)
    copies = len(ws)
    for m in todo:
        names = [v for v in candidates(shape, device, m, dtype)
                 if variants is None or v in variants or v == "cublas"]
        x = torch.empty(m, shape.k, device=device, dtype=dtype).normal_()
        ref = _cublas(x, ws[0], bs[0], shape.act)
        us, rejected = {}, {}
        for v in names:
            call = lambda w, b, v=v: run_variant(v, x, w, b, shape.act)  # noqa: E731
            try:
                y = call(ws[0], bs[0])
                if not _close(y, ref):
                    rejected[v] = f"result differs from F.linear by {(y.float() - ref.float()).abs().max().item():.3g}"
                    continue
                # the output (and fp32 partials) are expected; a weight-sized extra is a copy
                extra = allocated_during(lambda: call(ws[0], bs[0]), device) - y.numel() * y.element_size()
                s = _split_of(v)
                if s is not None:
                    extra -= s * m * shape.n * (4 if _fp32_partials else elt)
                if extra >= wbytes // 2:
                    rejected[v] = f"allocated {extra} bytes beyond its output: the weight was copied"
                    continue
                us[v] = graph_us([lambda w=w, b=b: call(w, b) for w, b in zip(ws, bs)])
            except Exception as err:  # noqa: BLE001 - a variant that fails here is never chosen
                rejected[v] = repr(err)[:200]
        if "cublas" not in us:
            raise RuntimeError(f"cuBLAS itself failed for {shape} at M={m}: {rejected.get('cublas')}")
        best = min(us, key=us.get)
        if best != "cublas" and us[best] > (1 - PICK_MARGIN) * us["cublas"]:
            best = "cublas"
        for v, why in rejected.items():
            log.warning("linear %s M=%d: %s rejected (%s)", shape, m, v, why)
        _timings[(name, key, m)] = LinearTiming(
            m=m, n=shape.n, k=shape.k, dtype=str(dtype).removeprefix("torch."), has_bias=shape.has_bias,
            act=shape.act, us={v: round(t, 3) for v, t in us.items()}, chosen=best, weight_bytes=wbytes,
            copies=copies, copy_bandwidth=bw, rejected=rejected)
        del x, ref
    del ws, bs
    torch.cuda.empty_cache()
