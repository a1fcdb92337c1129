"""The persistent decode MLP's torch ops (csrc/decode_mlp*.cu: `torch.ops.hybrid.decode_mlp`,
`decode_mlp_norm`, `decode_mlp_accumulate`, `decode_mlp_cluster`, `decode_mlp_k_splits`): the Python-side checks that
mirror csrc/ops.cpp, the per-device synchronisation words and sum buffer, the wrappers, the phase
stamps and the self-check. The extension itself is loaded by hybrid.ops.cuda_backend.
"""
from __future__ import annotations

import torch

from hybrid.ops.cuda_backend import _aligned16, _max_error, _require, _selfcheck, persistent_zeros
from hybrid.ops.cuda_skinny import SKINNY_DTYPES, SKINNY_TILE

MLP_MAX_M = 64
MLP_MAX_K_SPLITS = 16
_mlp_barriers: dict[torch.device, torch.Tensor] = {}


def decode_mlp_unsupported(x, w1, b1, w2, k_splits: int = 0, w2_transposed: bool = False) -> str | None:
    """Why csrc/'s decode_mlp cannot take these inputs (None: it can); csrc/ops.cpp's checks.
    w2_transposed: w2 is fc2's weight transposed, [ffn, hidden] (decode_mlp_accumulate)."""
    if not (x.is_cuda and w1.is_cuda and w2.is_cuda):
        return "x, w1 and w2 must be CUDA tensors"
    if x.dim() != 2 or w1.dim() != 2 or w2.dim() != 2:
        return "needs 2-d x, w1 and w2"
    m, hidden = x.shape
    ffn = w1.shape[0]
    if w2_transposed:
        if tuple(w1.shape) != (ffn, hidden) or tuple(w2.shape) != (ffn, hidden):
            return f"needs w1 [ffn, {hidden}] and w2t [ffn, {hidden}], got {tuple(w1.shape)} / {tuple(w2.shape)}"
    elif tuple(w1.shape) != (ffn, hidden) or tuple(w2.shape) != (hidden, ffn):
        return f"needs w1 [ffn, {hidden}] and w2 [{hidden}, ffn], got {tuple(w1.shape)} / {tuple(w2.shape)}"
    if x.dtype not in SKINNY_DTYPES or w1.dtype != x.dtype or w2.dtype != x.dtype:
        return f"x, w1 and w2 must all be bfloat16 or float16, got {x.dtype} / {w1.dtype} / {w2.dtype}"
    if not (x.is_contiguous() and w1.is_contiguous() and w2.is_contiguous()):
        return "x, w1 and w2 must be contiguous"
    if w1.device != x.device or w2.device != x.device:
        return f"all tensors must be on {x.device}"
    if not 1 <= m <= MLP_MAX_M:
        return f"needs 1 <= M <= {MLP_MAX_M}, got {m}"
    if hidden <= 0 or hidden % SKINNY_TILE or ffn <= 0 or ffn % SKINNY_TILE:
        return f"needs hidden and ffn multiples of {SKINNY_TILE}, got {hidden} / {ffn}"
    if max(hidden, ffn) * MLP_MAX_M > 2**31 - 1:
        return "sizes too large"
    if not (_aligned16(x) and _aligned16(w1) and _aligned16(w2)):
        return "x, w1 and w2 must be 16-byte aligned"
    if b1 is not None:
        if (b1.dim() != 1 or b1.shape[0] != ffn or not b1.is_contiguous() or b1.dtype != x.dtype
                or b1.device != x.device):
            return "b1 must be [ffn] contiguous, dtype and device of x"
        if b1.data_ptr() % 4:
            return "b1 must be 4-byte aligned"
    if not 0 <= int(k_splits) <= min(MLP_MAX_K_SPLITS, ffn // SKINNY_TILE):
        return f"k_splits must be 0..min({MLP_MAX_K_SPLITS}, ffn / {SKINNY_TILE}), got {k_splits}"
    return None


MLP_SYNC_INTS = 6 + MLP_MAX_K_SPLITS  # csrc/decode_mlp.h kMlpSyncInts


def _mlp_barrier(device: torch.device) -> torch.Tensor:
    """The persistent MLP's synchronisation words on this device, int32 [MLP_SYNC_INTS], zeroed once:
    [0:2] the grid barrier's 64-bit arrival counter (every barrier adds exactly 2^32,
    csrc/decode_mlp.cu barrier_arrive); [2:] the flow schedule's queue, exit count, slice counters
    and (its phase 3) fc2-partials count and row tickets, which every flow launch leaves at zero. One per device: decode_mlp launches must not
    run concurrently on two streams of one device (the engine runs one stream)."""
    return persistent_zeros(_mlp_barriers, device, (MLP_SYNC_INTS,), torch.int32, device,
                            "the decode MLP's synchronisation words")


def decode_mlp(
    x: torch.Tensor,  # [M, hidden] contiguous, M <= 64
    w1: torch.Tensor,  # [ffn, hidden]
    b1: torch.Tensor | None,  # [ffn]
    w2: torch.Tensor,  # [hidden, ffn]
    relu: bool = True,
    *,
    k_splits: int = 0,
    pdl: bool = False,
    stamps: torch.Tensor | None = None,
    prefetch: int = -1,
    flow: bool = False,
) -> torch.Tensor:  # [S, M, hidden] fp32
    """fc2's split-K partials of relu(x @ w1.T + b1) in one persistent launch (csrc/decode_mlp.cu):
    part[s] = act[:, K_s] @ w2[:, K_s].T over S K slices of ffn (0 = chosen from the shapes), i.e.
    linear.splitk_partials(linear(x, w1, b1, act="relu"), w2, S) up to fp32 summation order; the
    split-K reduce + bias + residual + norm (linear_norm.splitk_add_norm) finishes the block.
    pdl: programmatic dependent launch (sm_90+). stamps: diagnostics, see decode_mlp_phase_stamps.
    prefetch: phase-2 weight stages issued between the grid barrier's arrival and wait (-1: all
    of the ring's prologue; a tuning knob for the benchmark). flow: the dataflow schedule instead
    of the grid barrier (csrc/decode_mlp.h: one unit queue, each fc2 unit waits only for the fc1
    tiles of its K slice; the same default K slices)."""
    _require()
    why = decode_mlp_unsupported(x, w1, b1, w2, int(k_splits))
    if why is not None:
        raise RuntimeError(f"hybrid: decode_mlp: {why}")
    if pdl and torch.cuda.get_device_capability(x.device)[0] < 9:
        pdl = False
    dev = x.device if x.device.index is not None else torch.device("cuda", torch.cuda.current_device())
    return torch.ops.hybrid.decode_mlp(x, w1, b1, w2, _mlp_barrier(dev), bool(relu), int(k_splits), bool(pdl),
                                       stamps, int(prefetch), bool(flow))


_mlp_accum_buffers: dict[tuple[torch.device, int], torch.Tensor] = {}


def mlp_accum_buffer(device: torch.device, hidden: int, m: int) -> torch.Tensor:
    """The [m, hidden] float32 sum decode_mlp_accumulate adds into, zero whenever no MLP block is
    in flight: rows [0, m) of one [MLP_MAX_M, hidden] buffer per (device, hidden), allocated zeroed
    on first use. The block's end (linear_norm.splitk_add_norm(..., zero_part=True)) reads it and
    stores zeros back, so the next layer's launch finds it zero again. One per device and width:
    blocks must not run concurrently on two streams (the engine runs one). Allocated outside any
    CUDA-graph capture (the runner's eager warm-up steps come first); inside one it is an error,
    because a buffer from the graph's pool would be freed with the graph."""
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device, int(hidden))
    buf = persistent_zeros(_mlp_accum_buffers, key, (MLP_MAX_M, hidden), torch.float32, device,
                           "the accumulate MLP's sum buffer")
    if not 1 <= m <= MLP_MAX_M:
        raise ValueError(f"accumulate MLP needs 1 <= M <= {MLP_MAX_M}, got {m}")
    return buf[:m]


def decode_mlp_accumulate(
    x: torch.Tensor,  # [M, hidden] contiguous, M <= 64
    w1: torch.Tensor,  # [ffn, hidden]
    b1: torch.Tensor | None,  # [ffn]
    w2t: torch.Tensor,  # [ffn, hidden]: fc2's weight transposed, contiguous
    part: torch.Tensor,  # [M, hidden] float32, zero on entry
    relu: bool = True,
    *,
    pdl: bool = False,
    stamps: torch.Tensor | None = None,
) -> torch.Tensor:
    """part += relu(x @ w1.T + b1) @ w2t (no b2) with the persistent MLP's ffn-split schedule
    (csrc/decode_mlp.h `accumulate`): each CTA streams one 64-column fc1 tile and the matching 64
    rows of w2t with no wait on any other CTA, and adds its fp32 products into part with vector
    atomics (summation order not fixed). part must be zero for the plain product; returns it."""
    _require()
    why = decode_mlp_unsupported(x, w1, b1, w2t, w2_transposed=True)
    if why is not None:
        raise RuntimeError(f"hybrid: decode_mlp_accumulate: {why}")
    m, hidden = x.shape
    if not (part.is_cuda and part.device == x.device and part.dtype == torch.float32 and part.is_contiguous()
            and part.numel() == m * hidden and part.data_ptr() % 16 == 0):
        raise RuntimeError(f"hybrid: decode_mlp_accumulate: part must be a contiguous, 16-byte aligned float32 "
                           f"[{m}, {hidden}] tensor on {x.device}")
    if pdl and torch.cuda.get_device_capability(x.device)[0] < 9:
        pdl = False
    dev = x.device if x.device.index is not None else torch.device("cuda", torch.cuda.current_device())
    torch.ops.hybrid.decode_mlp_accumulate(x, w1, b1, w2t, part, _mlp_barrier(dev), bool(relu), bool(pdl), stamps)
    return part


MLP_CLUSTER_MAX_M = 32  # csrc/decode_mlp.h kMlpClusterMaxM
MLP_CLUSTER_SIZES = (2, 4, 8, 16)
_SMEM_MAX = 227 * 1024  # csrc/decode_mlp_core.cuh kMaxSmem


def _cluster_smem(m: int, cluster: int) -> int:
    """csrc/decode_mlp_cluster.cu ClusterCfg::smem: ring + warp partials + the act area."""
    tiles = 1 if m <= 16 else 2
    stages = 6 if tiles == 1 else 5
    x_bytes = 16 * tiles * 256
    red = 8 * (16 * tiles * 72) * 4
    return stages * (16384 + x_bytes) + red + cluster // 2 * x_bytes


def decode_mlp_cluster_unsupported(x, w1, b1, w2, cluster: int) -> str | None:
    """Why csrc/'s decode_mlp_cluster cannot take these inputs with clusters of `cluster` CTAs
    (None: it can); csrc/ops.cpp's checks."""
    why = decode_mlp_unsupported(x, w1, b1, w2)
    if why is not None:
        return why
    m, hidden = x.shape
    ffn = w1.shape[0]
    if cluster not in MLP_CLUSTER_SIZES:
        return f"cluster must be one of {MLP_CLUSTER_SIZES}, got {cluster}"
    if m > MLP_CLUSTER_MAX_M:
        return f"needs M <= {MLP_CLUSTER_MAX_M}, got {m}"
    step = SKINNY_TILE * cluster
    if hidden % step or ffn % step:
        return f"needs hidden and ffn multiples of 64 x cluster ({step}), got {hidden} / {ffn}"
    if ffn // step > MLP_MAX_K_SPLITS:
        return f"needs ffn / (64 x cluster) <= {MLP_MAX_K_SPLITS} partials, got {ffn // step}"
    if _cluster_smem(m, cluster) > _SMEM_MAX:
        return f"M={m} with a cluster of {cluster} needs more than {_SMEM_MAX} bytes of shared memory"
    return None


def cluster_size_for(m: int, hidden: int, ffn: int, largest: int = 8) -> int:
    """The cluster schedule's default cluster: the largest portable size (<= largest) the shapes
    allow (fewer partials for the reduce; OPT-1.3B: 8, i.e. 16 partials); 0 if none does."""
    for c in (16, 8, 4, 2):
        step = SKINNY_TILE * c
        if (c <= largest and hidden % step == 0 and ffn % step == 0 and ffn // step <= MLP_MAX_K_SPLITS
                and m <= MLP_CLUSTER_MAX_M and _cluster_smem(m, c) <= _SMEM_MAX):
            return c
    return 0


def decode_mlp_cluster(
    x: torch.Tensor,  # [M, hidden] contiguous, M <= 32
    w1: torch.Tensor,  # [ffn, hidden]
    b1: torch.Tensor | None,  # [ffn]
    w2: torch.Tensor,  # [hidden, ffn]
    relu: bool = True,
    *,
    cluster: int = 0,
    pdl: bool = False,
    stamps: torch.Tensor | None = None,
) -> torch.Tensor:  # [ffn / (64 cluster), M, hidden] fp32
    """fc2's split-K partials of relu(x @ w1.T + b1) with the persistent MLP's cluster schedule
    (csrc/decode_mlp_cluster.cu): one CTA per fc1 tile, clusters of `cluster` CTAs (0: cluster_size_for)
    exchange their act tiles through distributed shared memory and each computes the partial of its
    own K slice (the cluster's ffn columns), so no CTA waits on another cluster."""
    _require()
    if not cluster:
        cluster = cluster_size_for(x.shape[0], x.shape[-1], w1.shape[0]) or 2
    why = decode_mlp_cluster_unsupported(x, w1, b1, w2, int(cluster))
    if why is not None:
        raise RuntimeError(f"hybrid: decode_mlp_cluster: {why}")
    if torch.cuda.get_device_capability(x.device)[0] < 9:
        raise RuntimeError("hybrid: decode_mlp_cluster needs thread-block clusters (sm_90+)")
    dev = x.device if x.device.index is not None else torch.device("cuda", torch.cuda.current_device())
    return torch.ops.hybrid.decode_mlp_cluster(x, w1, b1, w2, _mlp_barrier(dev), bool(relu), int(cluster), bool(pdl),
                                               stamps)


def decode_mlp_cluster_active(x, w1, b1, w2, cluster: int) -> int:
    """Clusters of that launch the device holds at once (cudaOccupancyMaxActiveClusters); all
    ffn / (64 cluster) of them fit in one wave when this is at least that."""
    _require()
    why = decode_mlp_cluster_unsupported(x, w1, b1, w2, int(cluster))
    if why is not None:
        raise RuntimeError(f"hybrid: decode_mlp_cluster: {why}")
    dev = x.device if x.device.index is not None else torch.device("cuda", torch.cuda.current_device())
    return int(torch.ops.hybrid.decode_mlp_cluster_active(x, w1, b1, w2, _mlp_barrier(dev), int(cluster)))


MLP_MAX_HIDDEN_NORM = 16384


def decode_mlp_norm_unsupported(x, w1, b1, w2, b2, residual, norm_w, norm_b, k_splits: int = 0) -> str | None:
    """decode_mlp_unsupported plus csrc/ops.cpp decode_mlp_norm's checks of the block's end."""
    why = decode_mlp_unsupported(x, w1, b1, w2, k_splits)
    if why is not None:
        return why
    m, hidden = x.shape
    if hidden > MLP_MAX_HIDDEN_NORM:
        return f"needs hidden <= {MLP_MAX_HIDDEN_NORM}, got {hidden}"
    for name, v in (("b2", b2), ("norm_w", norm_w), ("norm_b", norm_b)):
        if v is None:
            if name == "norm_w":
                return "norm_w is required"
            continue
        if (v.dim() != 1 or v.shape[0] != hidden or not v.is_contiguous() or v.dtype != x.dtype
                or v.device != x.device or v.data_ptr() % 4):
            return f"{name} must be [{hidden}] contiguous, 4-byte aligned, dtype and device of x"
    if residual is not None:
        if (residual.dim() != 2 or tuple(residual.shape) != (m, hidden) or residual.stride(1) != 1
                or residual.stride(0) % 2 or residual.dtype != x.dtype or residual.device != x.device
                or residual.data_ptr() % 4):
            return ("residual must be [M, hidden] rows (unit column stride, even row stride, 4-byte aligned), "
                    "dtype and device of x")
    return None


def decode_mlp_norm(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None,
    residual: torch.Tensor | None, norm_w: torch.Tensor, norm_b: torch.Tensor | None, eps: float,
    relu: bool = True, *, k_splits: int = 0, pdl: bool = False, stamps: torch.Tensor | None = None,
    flow: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed, residual_out) [M, hidden]
    """The whole MLP block in one persistent launch (csrc/decode_mlp.cu with its phase 3):
    residual_out = fc2(act(fc1(x))) + b2 + residual, normed = LayerNorm (norm_b given) or RMSNorm
    of it, with linear_norm.splitk_add_norm's rounding steps. flow: the dataflow schedule, whose
    phase 3 needs no grid barrier (the last min(M, CTAs) CTAs out of the unit loop take the rows
    once every fc2 partial is stored)."""
    _require()
    why = decode_mlp_norm_unsupported(x, w1, b1, w2, b2, residual, norm_w, norm_b, int(k_splits))
    if why is not None:
        raise RuntimeError(f"hybrid: decode_mlp_norm: {why}")
    if pdl and torch.cuda.get_device_capability(x.device)[0] < 9:
        pdl = False
    dev = x.device if x.device.index is not None else torch.device("cuda", torch.cuda.current_device())
    return torch.ops.hybrid.decode_mlp_norm(x, w1, b1, w2, b2, residual, norm_w, norm_b, float(eps),
                                            _mlp_barrier(dev), bool(relu), int(k_splits), bool(pdl), stamps,
                                            bool(flow))


MLP_STAMPS = ("start", "wait", "phase1_gemm", "phase1_done", "barrier1", "phase2_done", "barrier2", "end",
              "norm_loads", "norm_sum1", "norm_sum2", "unused")


@torch.no_grad()
def decode_mlp_phase_stamps(x, w1s, b1s, w2s, *, norm: tuple | None = None, pdl: bool = False,
                            prefetch: int = -1, flow: bool = False, accumulate: bool = False,
                            cluster: int = 0) -> dict:
    """Where a persistent MLP launch spends its time: runs decode_mlp (or, with norm = (b2,
    residual, norm_w, norm_b, eps), decode_mlp_norm) once per weight copy in w1s / b1s / w2s
    (distinct copies, so the last launch reads its weights from DRAM, not L2) and returns, for that
    last launch, each MLP_STAMPS checkpoint's min / median / max over the CTAs in us after the
    earliest CTA start. flow: the dataflow schedule, whose "phase1_done" is a CTA's last fc1
    tile, "barrier1" its first fc2 slice wait passed, "phase2_done" its loop's end (with norm: its
    "barrier2" a row CTA's wait for every fc2 partial passed). accumulate: the
    ffn-split schedule (decode_mlp_accumulate; w2s then hold the TRANSPOSED fc2 weights [ffn,
    hidden]), whose "phase1_gemm" is its first act tile done. cluster: the cluster schedule with
    clusters of that many CTAs (decode_mlp_cluster), whose "phase1_gemm" is its fc1 tile computed,
    "phase1_done" its act pushed to the peers, "barrier1" the cluster barrier passed."""
    grid_max = torch.cuda.get_device_properties(x.device).multi_processor_count * 4
    stamps = torch.zeros(grid_max * len(MLP_STAMPS), dtype=torch.int64, device=x.device)
    for w1, b1, w2 in zip(w1s, b1s, w2s):
        stamps.zero_()
        if cluster:
            decode_mlp_cluster(x, w1, b1, w2, True, cluster=cluster, pdl=pdl, stamps=stamps)
        elif accumulate:
            part = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
            decode_mlp_accumulate(x, w1, b1, w2, part, True, pdl=pdl, stamps=stamps)  # w2s: transposed
        elif norm is None:
            decode_mlp(x, w1, b1, w2, True, pdl=pdl, stamps=stamps, prefetch=prefetch, flow=flow)
        else:
            decode_mlp_norm(x, w1, b1, w2, *norm, True, pdl=pdl, stamps=stamps, flow=flow)
    torch.cuda.synchronize(x.device)
    t = stamps.view(-1, len(MLP_STAMPS))
    t = t[t[:, 0] > 0].double()
    t0 = t[:, 0].min()
    out = {"ctas": int(t.shape[0])}
    for i, name in enumerate(MLP_STAMPS):
        col = t[:, i]
        col = col[col > 0]
        if col.numel():
            us = (col - t0) / 1e3
            out[name] = (round(us.min().item(), 2), round(us.median().item(), 2), round(us.max().item(), 2))
    return out


def decode_mlp_k_splits(m: int, hidden: int, ffn: int, dtype: torch.dtype, device_index: int | None = None) -> int:
    """The K slices (partials) decode_mlp picks for these shapes on this device."""
    _require()
    if not (1 <= m <= MLP_MAX_M and hidden > 0 and hidden % SKINNY_TILE == 0 and ffn > 0
            and ffn % SKINNY_TILE == 0 and dtype in SKINNY_DTYPES):
        raise RuntimeError(f"hybrid: decode_mlp does not take M={m} hidden={hidden} ffn={ffn} {dtype}")
    if device_index is None:
        device_index = torch.cuda.current_device()
    return int(torch.ops.hybrid.decode_mlp_k_splits(m, hidden, ffn, dtype, device_index))


def _check_mlp(device, dtype, gen) -> str | None:
    hidden, ffn = 192, 704
    w1 = torch.randn(ffn, hidden, device=device, dtype=dtype, generator=gen) * hidden ** -0.5
    b1 = torch.randn(ffn, device=device, dtype=dtype, generator=gen)
    w2 = torch.randn(hidden, ffn, device=device, dtype=dtype, generator=gen) * ffn ** -0.5
    for m in (1, 5, 17, 33, 64):
        x = torch.randn(m, hidden, device=device, dtype=dtype, generator=gen)
        for k_splits in (0, 1, 3):
            for bias, relu in ((None, False), (b1, True)):
                where = f"M={m} k_splits={k_splits} bias={bias is not None}"
                h = torch.nn.functional.linear(x.float(), w1.float(), None if bias is None else bias.float())
                ref = (h.relu() if relu else h).to(dtype).float() @ w2.float().t()
                for flow in (False, True):
                    part = decode_mlp(x, w1, bias, w2, relu, k_splits=k_splits, flow=flow)
                    why = _max_error(part.sum(0), ref, 1e-2, 1e-3)
                    if why:
                        return f"{where} flow={flow}: {why}"
                if k_splits == 0:  # the ffn-split schedule adds into its sum: twice = 2 x ref
                    acc = torch.zeros(m, hidden, device=device, dtype=torch.float32)
                    w2t = w2.t().contiguous()
                    for times in (1, 2):
                        decode_mlp_accumulate(x, w1, bias, w2t, acc, relu)
                        why = _max_error(acc, times * ref, 1e-2, 1e-3)
                        if why:
                            return f"{where} accumulate x{times}: {why}"
                # phase 3: LayerNorm and RMSNorm of the block's end against its torch definition
                res = torch.randn(m, hidden, device=device, dtype=dtype, generator=gen)
                nw = torch.randn(hidden, device=device, dtype=dtype, generator=gen)
                for nb in (nw.flip(0), None):
                    normed, res_out = decode_mlp_norm(x, w1, bias, w2, nw, res, nw, nb, 1e-5, relu,
                                                      k_splits=k_splits)
                    h2 = (ref + nw.float()).to(dtype).float() + res.float()
                    if nb is None:
                        want = h2 * torch.rsqrt(h2.pow(2).mean(-1, keepdim=True) + 1e-5) * nw.float()
                    else:
                        want = torch.nn.functional.layer_norm(h2, (hidden,), nw.float(), nb.float(), 1e-5)
                    for got, ref2, name in ((res_out, h2, "residual"), (normed, want, "normed")):
                        why = _max_error(got, ref2, 0.05, 1e-2)
                        if why:
                            return f"{where} {name} ({'rms' if nb is None else 'layer'}): {why}"
    return None


def _check_mlp_cluster(device, dtype, gen) -> str | None:
    hidden, ffn = 256, 1024
    w1 = torch.randn(ffn, hidden, device=device, dtype=dtype, generator=gen) * hidden ** -0.5
    b1 = torch.randn(ffn, device=device, dtype=dtype, generator=gen)
    w2 = torch.randn(hidden, ffn, device=device, dtype=dtype, generator=gen) * ffn ** -0.5
    for m in (1, 5, 17, 32):
        x = torch.randn(m, hidden, device=device, dtype=dtype, generator=gen)
        for cluster in (2, 4):
            for bias, relu in ((None, False), (b1, True)):
                h = torch.nn.functional.linear(x.float(), w1.float(), None if bias is None else bias.float())
                ref = (h.relu() if relu else h).to(dtype).float() @ w2.float().t()
                part = decode_mlp_cluster(x, w1, bias, w2, relu, cluster=cluster)
                if part.shape[0] != ffn // (64 * cluster):
                    return f"M={m} cluster={cluster}: {part.shape[0]} partials"
                why = _max_error(part.sum(0), ref, 1e-2, 1e-3)
                if why:
                    return f"M={m} cluster={cluster} bias={bias is not None}: {why}"
    return None


def decode_mlp_cluster_selfcheck(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """None if decode_mlp_cluster matches an fp32 torch MLP (M 1 / 5 / 17 / 32: both m16-tile
    builds; clusters of 2 and 4; bias and ReLU on and off); else why not. Once per (device, dtype)."""
    if torch.device(device).type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        return "thread-block clusters need sm_90+"
    return _selfcheck("decode_mlp_cluster", device, dtype, _check_mlp_cluster)


def decode_mlp_selfcheck(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """None if decode_mlp matches an fp32 torch MLP on shapes covering every compiled variant
    (M 1 / 5 / 17 / 33 / 64 = 1..4 m16 tiles and both warp grids), K slices that end on half
    stages and uneven splits, more units than CTAs (ffn 704 -> 11 tiles), bias and ReLU on and off,
    and decode_mlp_norm's LayerNorm / RMSNorm end; else why not. Once per (device, dtype) and
    process; callers offer it only if this passes."""
    return _selfcheck("decode_mlp", device, dtype, _check_mlp)
