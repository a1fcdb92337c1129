"""The decode MLP block up to the next norm as one dispatch (OPT: fc1 -> ReLU -> fc2):

    act = relu(x @ w1.T + b1)               (rounded to the model dtype, as linear() returns it)
    y = act @ w2.T + b2, residual_out = y + residual, normed = norm(residual_out)

Variants per (shape, decode batch bucket), chosen by autotune_mlps():
- "unfused": linear(x, w1, b1, act="relu") + linear_norm.linear_add_norm(...), i.e. whatever the
  linear and linear + norm tables picked: the path every other case takes.
- "persistent" / "persistent_pdl": csrc/decode_mlp.cu computes fc1 and fc2's split-K partials in
  one launch (the CTAs stay resident across a grid barrier, and phase 2's first weight stages
  stream while phase 1 drains), then linear_norm.splitk_add_norm does bias + residual + norm as
  for the split-K fused variants. "_pdl" launches it with programmatic dependent launch.
- "flow" / "flow_pdl": the same kernel with its dataflow schedule instead of the grid barrier
  (csrc/decode_mlp.h): one queue of units, each fc2 (K slice, column tile) unit waits only for the
  fc1 tiles of its slice, so a late fc1 tile holds up one slice and the other CTAs keep streaming.
- "accum" / "accum_pdl": the same kernel file's ffn-split schedule (csrc/decode_mlp.h
  `accumulate`): CTA c streams fc1 tile c and then, through the same ring, the matching 64 rows of
  fc2's TRANSPOSED weight w2t [ffn, hidden], and adds its products into one fp32 [M, hidden] sum
  with vector atomics; no CTA waits for another. The sum is a persistent zeroed buffer
  (cuda_mlp.mlp_accum_buffer) that the block's end (splitk_add_norm with zero_part) reads and
  zeroes again. fp32 summation order not fixed. Needs the caller's w2t copy (the OPT inference
  model keeps one while wants_w2t() says a table entry uses it); without it, the flow variant runs.
- "persistent_norm": the same launch also ends the block (a third phase after one more grid
  barrier: one row per CTA does the reduce + bias + residual + norm with splitk_add_norm's
  rounding steps), PDL-launched on sm_90+.
- "flow_norm" / "flow_norm_pdl": the flow schedule with that third phase and no barrier: the last
  min(M, CTAs) CTAs out of the unit loop wait until every fc2 partial is stored and take the rows
  (their row inputs loaded before the wait). One launch instead of two, but measured slower in the
  OPT-1.3B decode step at 16 rows on an H200 (1.517 vs flow_pdl's 1.410 ms): the row CTAs' wait
  passes ~3 us after the last partial is published, what the kernel boundary it replaces costs
  (the split-K norm kernel: 2.0 us per layer, decode_knockout "mlpnorm"). Not offered by the
  autotune; forced / set_choice run it.
- "cluster" / "cluster_pdl": csrc/decode_mlp_cluster.cu, one CTA per fc1 tile in thread-block
  clusters (8 CTAs where the shapes allow): a cluster's CTAs push their act tiles into each other's
  shared memory, pass one hardware cluster barrier and compute the fc2 partial of their own K slice
  (the cluster's ffn columns) for every output column, so no CTA waits on a memory poll or on
  another cluster. ffn / (64 x cluster) partials (OPT-1.3B: 16) for splitk_add_norm. M <= 32 and
  sm_90; elsewhere the flow variant runs. Correct, but slower on an H200: it holds only 15 of
  OPT-1.3B's 16 clusters at once, so the grid takes two waves, and fc2 streamed at ~2.5 TB/s even
  in the first (decode step at 16 rows 1.999 ms vs flow_pdl's 1.411). Not offered by the autotune
  (set_cluster_offered); forced / set_choice run it.

Why: two GEMM launches at decode sizes each pay a ramp and a tail (~3 us apiece on an H200,
bench/kernels/NOTES.md); this is the first piece of a persistent per-layer decode kernel.
Same rounding steps as the unfused path; only the fp32 summation order inside the GEMMs differs.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch

from hybrid.ops import linear as L
from hybrid.ops import linear_norm as LN

log = logging.getLogger(__name__)

VARIANTS = ("unfused", "persistent", "persistent_pdl", "persistent_norm", "flow", "flow_pdl", "flow_norm",
            "flow_norm_pdl", "accum", "accum_pdl", "cluster", "cluster_pdl")


@dataclass(frozen=True)
class MlpShape:
    """x [M, hidden] -> fc1 [ffn, hidden] (+ bias, act) -> fc2 [hidden, ffn] (+ bias) -> add + norm."""

    hidden: int
    ffn: int
    has_bias: bool
    act: str  # "relu"
    norm: str  # "layer" | "rms"


@dataclass
class MlpTiming:
    m: int
    hidden: int
    ffn: int
    dtype: str
    has_bias: bool
    act: str
    norm: str
    us: dict[str, float]
    chosen: str
    weight_bytes: int
    copies: int
    k_splits: int
    rejected: dict[str, str] = field(default_factory=dict)

    def row(self) -> dict:
        return asdict(self)


_table: dict[tuple, tuple[list[int], list[str]]] = {}
_timings: dict[tuple, MlpTiming] = {}
_forced: str | None = None
_flow_splits = 0  # K slices of the flow variants (0: csrc/ops.cpp's default, decode_mlp_k_splits)
_flow_prefetch = -1  # fc2 weight stages the flow variants stream before a slice wait (-1: all)
_cluster_size = 0  # CTAs per cluster of the cluster variants (0: cuda_mlp.cluster_size_for)
_cluster_offered = False  # whether candidates() offers "cluster_pdl" (off: slower on an H200)


def set_cluster_offered(on: bool) -> None:
    """Offer "cluster_pdl" to the autotune (off by default: measured slower in the OPT-1.3B decode
    step on an H200, csrc/NOTES.md "Session 12"). set_forced / set_choice run it either way."""
    global _cluster_offered
    _cluster_offered = bool(on)


def set_cluster_size(cluster: int) -> None:
    """The cluster variants' CTAs per cluster (0 = cuda_mlp.cluster_size_for: the largest portable
    size the shapes allow; 16 is non-portable but runs on H100 / H200). A tuning knob for benchmarks
    (bench.kernels.decode_knockout --mlp-variant cluster_pdl:16)."""
    global _cluster_size
    if int(cluster) not in (0, 2, 4, 8, 16):
        raise ValueError(f"cluster size must be 0 (auto), 2, 4, 8 or 16, got {cluster}")
    _cluster_size = int(cluster)


def set_flow_splits(k_splits: int, prefetch: int = -1) -> None:
    """The K slices (fc2 partials) the flow variants use (0 = the extension's default) and the
    weight stages of an fc2 unit they stream before its slice wait (-1 = the whole prologue).
    Tuning knobs for benchmarks (bench.kernels.decode_knockout --mlp-variant flow_pdl:S:P)."""
    global _flow_splits, _flow_prefetch
    if not 0 <= int(k_splits) <= 16:
        raise ValueError(f"flow K slices must be 0..16, got {k_splits}")
    if int(prefetch) < -1:
        raise ValueError(f"flow prefetch must be -1 (all) or a stage count, got {prefetch}")
    _flow_splits, _flow_prefetch = int(k_splits), int(prefetch)


def set_forced(variant: str | None) -> None:
    """Every tuned MLP runs `variant` (None: the autotune's choice), for benchmarks and tests. A
    variant the inputs do not support still falls back as run_variant does."""
    global _forced
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown MLP variant {variant!r}; choose from {VARIANTS}")
    _forced = variant


def _key(shape: MlpShape, dtype: torch.dtype) -> tuple:
    return (shape.hidden, shape.ffn, dtype, shape.has_bias, shape.act, shape.norm)


def set_choice(shape: MlpShape, dtype: torch.dtype, m: int, variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown MLP variant {variant!r}; choose from {VARIANTS}")
    if shape.act != "relu":
        raise ValueError(f"the persistent decode MLP takes act='relu' only, got {shape.act!r}")
    if shape.norm not in LN.NORMS:
        raise ValueError(f"unknown norm {shape.norm!r}; choose from {LN.NORMS}")
    L.bucket_put(_table, _key(shape, dtype), m, variant)


def clear_choices() -> None:
    _table.clear()


def choice(m: int, shape: MlpShape, dtype: torch.dtype) -> str:
    """The variant for m rows: the smallest tuned bucket >= m; "unfused" past the largest, for
    untuned shapes, or while linear()'s dispatch is disabled."""
    if not L.is_enabled() or m == 0:
        return "unfused"
    picked = L.bucket_get(_table, _key(shape, dtype), m, "unfused")
    return _forced if _forced is not None and m <= 64 else picked


def wants_w2t(shape: MlpShape, dtype: torch.dtype) -> bool:
    """Whether some decode bucket of this block runs an "accum" variant (tuned or forced), which
    reads fc2's weight transposed: the inference model then keeps a [ffn, hidden] copy."""
    if _forced is not None:
        return _forced.startswith("accum")
    entry = _table.get(_key(shape, dtype))
    return entry is not None and any(v.startswith("accum") for v in entry[1])


def mlp_add_norm(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                 b2: torch.Tensor | None, residual: torch.Tensor | None, norm_w: torch.Tensor,
                 norm_b: torch.Tensor | None, eps: float, act: str = "relu",
                 w2t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, residual_out) of the MLP block on x [M, hidden]: fc2(act(fc1(x))) + residual, then
    LayerNorm(norm_w, norm_b) or, with norm_b None, RMSNorm(norm_w). w2t: w2 transposed and
    contiguous ([ffn, hidden]), which the "accum" variants read; None: they fall back to "flow"."""
    v = "unfused"
    if _table or _forced is not None:
        shape = MlpShape(w1.shape[1], w1.shape[0], b1 is not None, act, "rms" if norm_b is None else "layer")
        v = choice(x.shape[0], shape, w1.dtype)
    return run_variant(v, x, w1, b1, w2, b2, residual, norm_w, norm_b, eps, act, w2t)


def run_variant(variant: str, x, w1, b1, w2, b2, residual, norm_w, norm_b, eps, act="relu", w2t=None):
    if variant == "unfused":
        f = L.linear(x, w1, b1, act=act)
        return LN.linear_add_norm(f, w2, b2, residual, norm_w, norm_b, eps)
    if variant not in VARIANTS:
        raise ValueError(f"unknown MLP variant {variant!r}; choose from {VARIANTS}")
    from hybrid.ops import cuda_mlp as cm

    xc = x.contiguous()
    if act != "relu" or cm.decode_mlp_unsupported(xc, w1, b1, w2) is not None:  # e.g. an odd view
        return run_variant("unfused", x, w1, b1, w2, b2, residual, norm_w, norm_b, eps, act)
    if variant == "persistent_norm":
        if cm.decode_mlp_norm_unsupported(xc, w1, b1, w2, b2, residual, norm_w, norm_b) is None:
            pdl = torch.cuda.get_device_capability(x.device)[0] >= 9
            return cm.decode_mlp_norm(xc, w1, b1, w2, b2, residual, norm_w, norm_b, eps, True, pdl=pdl)
        variant = "persistent_pdl"
    if variant.startswith("accum"):
        if w2t is not None and cm.decode_mlp_unsupported(xc, w1, b1, w2t, w2_transposed=True) is None:
            part = cm.mlp_accum_buffer(x.device, xc.shape[1], xc.shape[0])
            cm.decode_mlp_accumulate(xc, w1, b1, w2t, part, True, pdl=variant.endswith("_pdl"))
            return LN.splitk_add_norm(part.unsqueeze(0), b2, residual, norm_w, norm_b, eps, x.dtype, zero_part=True)
        variant = "flow" + variant[len("accum"):]  # no transposed copy: the same kernel's flow schedule
    if variant.startswith("cluster"):
        m, hidden = xc.shape
        cl = _cluster_size or cm.cluster_size_for(m, hidden, w1.shape[0])
        if (cl and torch.cuda.get_device_capability(x.device)[0] >= 9
                and cm.decode_mlp_cluster_unsupported(xc, w1, b1, w2, cl) is None):
            part = cm.decode_mlp_cluster(xc, w1, b1, w2, True, cluster=cl, pdl=variant.endswith("_pdl"))
            return LN.splitk_add_norm(part, b2, residual, norm_w, norm_b, eps, x.dtype)
        variant = "flow" + variant[len("cluster"):]  # e.g. M > 32: the flow schedule
    flow = variant.startswith("flow")
    splits = min(_flow_splits, w1.shape[0] // 64) if flow else 0
    if variant.startswith("flow_norm"):
        if cm.decode_mlp_norm_unsupported(xc, w1, b1, w2, b2, residual, norm_w, norm_b, splits) is None:
            return cm.decode_mlp_norm(xc, w1, b1, w2, b2, residual, norm_w, norm_b, eps, True,
                                      pdl=variant.endswith("_pdl"), flow=True, k_splits=splits)
        variant = "flow" + variant[len("flow_norm"):]  # e.g. hidden past the row kernel's registers
    part = cm.decode_mlp(xc, w1, b1, w2, True, pdl=variant.endswith("_pdl"), flow=flow, k_splits=splits,
                         prefetch=_flow_prefetch if flow else -1)
    return LN.splitk_add_norm(part, b2, residual, norm_w, norm_b, eps, x.dtype)


def candidates(shape: MlpShape, device: torch.device, m: int, dtype: torch.dtype) -> list[str]:
    """"unfused", plus the persistent kernel's schedules where the extension loads, passes its
    self-check and takes the shape (ReLU MLPs, M <= 64, hidden / ffn multiples of 64, bf16 / fp16)."""
    out = ["unfused"]
    if shape.act != "relu" or device.type != "cuda":
        return out
    from hybrid.ops import cuda_mlp as cm, cuda_skinny as cs

    if not (1 <= m <= cm.MLP_MAX_M and shape.hidden % cs.SKINNY_TILE == 0 and shape.ffn % cs.SKINNY_TILE == 0
            and dtype in cs.SKINNY_DTYPES):
        return out
    if cm.decode_mlp_selfcheck(device, dtype) is not None:
        return out
    # not "accum" / "accum_pdl": slower than flow_pdl in the decode step where measured (OPT-1.3B,
    # 16 rows, H200: 1.557-1.570 vs 1.481-1.486 ms) and they cost a transposed fc2 copy per layer;
    # forced (set_forced, bench --mlp-variant) or set by set_choice they still run
    # nor "flow_norm" / "flow_norm_pdl": slower than flow_pdl in the step (see the module docstring)
    out += ["persistent", "flow"]
    if torch.cuda.get_device_capability(device)[0] >= 9:
        out += ["persistent_pdl", "flow_pdl"]
    if shape.hidden <= cm.MLP_MAX_HIDDEN_NORM:
        out.append("persistent_norm")
    # not "cluster" / "cluster_pdl": an H200 holds 15 clusters of 8 one-SM CTAs at once, so OPT-1.3B's
    # 128-CTA grid ran in two waves (decode step at 16 rows 1.999 ms vs flow_pdl's 1.411), and even
    # its first wave streamed fc2 at ~2.5 TB/s (csrc/NOTES.md "Session 12"); forced they still run.
    # cluster_offered() turns them on for a card where they might fit.
    if _cluster_offered and torch.cuda.get_device_capability(device)[0] >= 9 and \
            cm.cluster_size_for(m, shape.hidden, shape.ffn) and cm.decode_mlp_cluster_selfcheck(device, dtype) is None:
        out.append("cluster_pdl")
    return out


@torch.no_grad()
def autotune_mlps(shapes: Iterable[MlpShape], buckets: Iterable[int], device: torch.device | str,
                  dtype: torch.dtype, min_copies: int = 8) -> list[MlpTiming]:
    """Times "unfused" (the linear and linear + norm tables' current picks: run their autotunes
    first) against the persistent kernel per (shape, bucket) in CUDA graphs over rotating weight
    copies (>= 2x L2), each between the neighbours it has in a decoder layer (out_proj + add + norm
    before, a [3 x hidden, hidden] projection after; us = the chain minus the neighbours alone), and
    fills the table with the fastest ("unfused" unless another wins by linear.PICK_MARGIN). No-op
    on CPU; cached per process."""
    device = torch.device(device)
    if device.type != "cuda":
        return []
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    L.timings_match_offer()
    buckets = sorted(set(int(m) for m in buckets if m > 0))
    name = torch.cuda.get_device_name(device)
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (50 << 20)
    out = []
    for shape in dict.fromkeys(shapes):
        key = _key(shape, dtype)
        todo = [m for m in buckets if (name, key, m) not in _timings]
        if todo:
            _measure(shape, todo, device, dtype, name, key, l2, min_copies)
        rows = [_timings[(name, key, m)] for m in buckets]
        for r in rows:
            set_choice(shape, dtype, r.m, r.chosen)
        out += rows
        log.log(logging.INFO if todo else logging.DEBUG, "MLP %dx%d + add %snorm: %s", shape.hidden, shape.ffn, shape.norm,
                 " | ".join(f"M={r.m} {r.chosen} {r.us[r.chosen]:.1f}us (unfused {r.us['unfused']:.1f})"
                            for r in rows))
    return out


def _measure(shape, todo, device, dtype, name, key, l2, min_copies) -> None:
    elt = torch.empty((), dtype=dtype).element_size()
    wbytes = 2 * shape.hidden * shape.ffn * elt
    # fc1 and fc2 copies together >= 2x L2: each half is sized for the L2 on its own
    w1s, b1s = L.weight_copies(shape.ffn, shape.hidden, shape.has_bias, device, dtype, l2, min_copies)
    w2s, b2s = L.weight_copies(shape.hidden, shape.ffn, shape.has_bias, device, dtype, l2, min_copies)
    copies = min(len(w1s), len(w2s))
    w2ts = None  # the transposed copies the "accum" variants read, made only if they are offered
    nw = torch.empty(shape.hidden, device=device, dtype=dtype).normal_(1.0, 0.1)
    nb = torch.empty(shape.hidden, device=device, dtype=dtype).normal_() if shape.norm == "layer" else None
    eps = 1e-5
    from hybrid.ops import cuda_mlp as cm

    # the neighbours of the block in a decoder layer: out_proj + add + norm before, the next qkv
    # projection after (two copies each: the MLP weights streaming in between evict them from L2)
    o_ws, o_bs = L.weight_copies(shape.hidden, shape.hidden, shape.has_bias, device, dtype, 0, 2)
    q_ws, q_bs = L.weight_copies(3 * shape.hidden, shape.hidden, shape.has_bias, device, dtype, 0, 2)
    for m in todo:
        x = torch.empty(m, shape.hidden, device=device, dtype=dtype).normal_()
        res = torch.empty(m, shape.hidden, device=device, dtype=dtype).normal_()
        offered = candidates(shape, device, m, dtype)
        if w2ts is None and any(v.startswith("accum") for v in offered):
            w2ts = [w.t().contiguous() for w in w2s[:copies]]
        w2t = lambda i: w2ts[i] if w2ts is not None else None  # noqa: E731
        args = lambda i: (w1s[i], b1s[i], w2s[i], b2s[i], res, nw, nb, eps, shape.act, w2t(i))  # noqa: E731
        ref_n, ref_r = run_variant("unfused", x, *args(0))

        def in_layer(v, i):
            h, r = LN.linear_add_norm(x, o_ws[i % 2], o_bs[i % 2], res, nw, nb, eps)
            if v is not None:
                h, r = run_variant(v, h, w1s[i], b1s[i], w2s[i], b2s[i], r, nw, nb, eps, shape.act, w2t(i))
            return L.linear(h, q_ws[i % 2], q_bs[i % 2])

        # in context: each candidate between its neighbours, minus the neighbours alone. Timed
        # back to back with itself, the persistent kernel overlapped its own copies far better
        # than it does the real neighbours (OPT-1.3B batch 16 on an H200, whole decode step: the
        # isolated pick "persistent_pdl" 1.707 ms vs "flow_pdl" 1.492 and "unfused" 1.539)
        neighbours = L.graph_us([lambda i=i: in_layer(None, i) for i in range(copies)])
        us, rejected = {}, {}
        for v in offered:
            try:
                got_n, got_r = run_variant(v, x, *args(0))
                if not (L._close(got_r, ref_r) and L._close(got_n, ref_n)):
                    rejected[v] = "result differs from the unfused path"
                    continue
                us[v] = L.graph_us([lambda i=i, v=v: in_layer(v, i) for i in range(copies)]) - neighbours
            except Exception as err:  # noqa: BLE001 - a variant that fails here is never chosen
                rejected[v] = repr(err)[:200]
        if "unfused" not in us:
            raise RuntimeError(f"unfused MLP failed for {shape} at M={m}: {rejected.get('unfused')}")
        best = min(us, key=us.get)
        if best != "unfused" and us[best] > (1 - L.PICK_MARGIN) * us["unfused"]:
            best = "unfused"
        for v, why in rejected.items():
            log.warning("MLP %s M=%d: %s rejected (%s)", shape, m, v, why)
        splits = 0
        if len(us) > 1:
            splits = cm.decode_mlp_k_splits(m, shape.hidden, shape.ffn, dtype, device.index)
        _timings[(name, key, m)] = MlpTiming(
            m=m, hidden=shape.hidden, ffn=shape.ffn, dtype=str(dtype).removeprefix("torch."),
            has_bias=shape.has_bias, act=shape.act, norm=shape.norm, us={v: round(t, 3) for v, t in us.items()},
            chosen=best, weight_bytes=wbytes, copies=copies, k_splits=splits, rejected=rejected)
        del x, res
    del w1s, b1s, w2s, b2s, w2ts, o_ws, o_bs, q_ws, q_bs
    torch.cuda.empty_cache()
