"""The skinny (decode) GEMM's torch ops (csrc/skinny_gemm.cu, csrc/skinny_wgmma.cu:
`torch.ops.hybrid.skinny_gemm`, `skinny_gemm_norm`, `skinny_gemm_wgmma`, `skinny_gemm_k_splits`):
the Python-side checks that mirror csrc/ops.cpp, the block end's arrival counter, the wrappers and
the self-check that gates the autotune candidates. The extension itself is loaded by
hybrid.ops.cuda_backend (split out of it in Session 13, when it passed 700 lines).
"""
from __future__ import annotations

import torch

from hybrid.ops.cuda_backend import _aligned16, _max_error, _require, _selfcheck, persistent_zeros

SKINNY_MAX_M = 64
SKINNY_TILE = 64
"""N and K must be multiples of this (csrc/skinny_gemm.h kSkinnyTileN / kSkinnyTileK)."""
SKINNY_MAX_K_SPLITS = 8
SKINNY_DTYPES = (torch.bfloat16, torch.float16)


def skinny_gemm_unsupported(x, w, bias=None, k_splits: int = 0) -> str | None:
    """Why csrc/'s skinny_gemm cannot take these inputs (None: it can); csrc/ops.cpp's checks."""
    if not (x.is_cuda and w.is_cuda):
        return "x and w must be CUDA tensors"
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        return f"needs x [M, K] and w [N, K], got {tuple(x.shape)} / {tuple(w.shape)}"
    if x.dtype not in SKINNY_DTYPES or w.dtype != x.dtype:
        return f"x and w must both be bfloat16 or float16, got {x.dtype} / {w.dtype}"
    if not (x.is_contiguous() and w.is_contiguous()):
        return "x and w must be contiguous"
    if w.device != x.device:
        return f"all tensors must be on {x.device}"
    m, k = x.shape
    n = w.shape[0]
    if not 1 <= m <= SKINNY_MAX_M:
        return f"needs 1 <= M <= {SKINNY_MAX_M}, got {m}"
    if n <= 0 or n % SKINNY_TILE or n // SKINNY_TILE > 2**31 - 1:
        return f"needs N % {SKINNY_TILE} == 0, got {n}"
    if k <= 0 or k % SKINNY_TILE or k * SKINNY_MAX_M > 2**31 - 1:
        return f"needs K % {SKINNY_TILE} == 0 (and K * 64 < 2^31), got {k}"
    if not (_aligned16(x) and _aligned16(w)):
        return "x and w must be 16-byte aligned"
    if bias is not None:
        if (bias.dim() != 1 or bias.shape[0] != n or not bias.is_contiguous() or bias.dtype != x.dtype
                or bias.device != x.device):
            return "bias must be [N] contiguous, dtype and device of x"
        if bias.data_ptr() % 4:
            return "bias must be 4-byte aligned"
    if not 0 <= int(k_splits) <= SKINNY_MAX_K_SPLITS:
        return f"k_splits must be 0..{SKINNY_MAX_K_SPLITS}, got {k_splits}"
    return None


def skinny_kv_unsupported(x, w, k_cache, v_cache, slots, kv_col0: int) -> str | None:
    """Why skinny_gemm cannot also write columns [kv_col0, kv_col0 + 2 * width) of its output to the
    paged caches (None: it can); csrc/ops.cpp's checks. width = kv_heads * head_size."""
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        return "caches must be [num_blocks, block_size, kv_heads, head_size] of equal shapes"
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or k_cache.dtype != x.dtype or v_cache.dtype != x.dtype:
        return "caches must be contiguous with the dtype of x"
    if k_cache.device != x.device or v_cache.device != x.device or slots.device != x.device:
        return f"caches and slots must be on {x.device}"
    if slots.dim() != 1 or slots.shape[0] != x.shape[0] or slots.dtype != torch.int64 or not slots.is_contiguous():
        return "slots must be [M] int64 contiguous"
    width = k_cache.shape[2] * k_cache.shape[3]
    if width % 2 or kv_col0 % 2 or kv_col0 < 0 or kv_col0 + 2 * width > w.shape[0]:
        return f"kv columns [{kv_col0}, {kv_col0 + 2 * width}) must be even and within N={w.shape[0]}"
    return None


def skinny_gemm_wgmma_available() -> bool:
    """Whether the loaded extension has the wgmma skinny GEMM (a build for sm_90a: H100 / H200)."""
    try:
        return bool(torch.ops.hybrid.skinny_gemm_wgmma_available())
    except (AttributeError, RuntimeError):
        return False


def skinny_gemm_wgmma(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, relu: bool = False, *,
                      k_splits: int = 0, pdl: bool = False) -> torch.Tensor:
    """skinny_gemm on Hopper warpgroup MMA (csrc/skinny_wgmma.cu): 64-row tiles read from shared
    memory by wgmma, for 33-64 rows; same shapes, splits and PDL launch, no KV write."""
    _require()
    why = skinny_gemm_unsupported(x, w, bias, int(k_splits))
    if why is not None:
        raise RuntimeError(f"hybrid: skinny_gemm_wgmma: {why}")
    if not skinny_gemm_wgmma_available():
        raise RuntimeError("hybrid: skinny_gemm_wgmma needs the extension built for sm_90a (H100 / H200)")
    return torch.ops.hybrid.skinny_gemm_wgmma(x, w, bias, bool(relu), int(k_splits), bool(pdl))


def skinny_gemm(
    x: torch.Tensor,  # [M, K] contiguous, M <= 64
    w: torch.Tensor,  # [N, K] contiguous (the stored weight)
    bias: torch.Tensor | None = None,  # [N]
    relu: bool = False,
    *,
    k_splits: int = 0,
    pdl: bool = False,
    kv: tuple | None = None,  # (k_cache, v_cache, slots [M] int64, kv_col0): also write k / v to the cache
) -> torch.Tensor:  # [M, N]
    """act(x @ w.T + bias) on tensor cores, fp32 accumulation (csrc/skinny_gemm.cu v2: W and x
    streamed through a cp.async shared-memory ring, ldmatrix + mma.sync). k_splits: CTAs of a
    cluster splitting K (0 = the most that fit one wave of resident CTAs with >= 512 of K each).
    pdl: launched with programmatic dependent launch (sm_90+), so its first weight stages stream
    while the previous kernel in the stream drains (it waits for that kernel before reading x)."""
    _require()
    why = skinny_gemm_unsupported(x, w, bias, int(k_splits))
    if why is not None:
        raise RuntimeError(f"hybrid: skinny_gemm: {why}")
    if pdl and torch.cuda.get_device_capability(x.device)[0] < 9:
        pdl = False  # griddepcontrol needs sm_90: a plain launch computes the same
    if kv is None:
        return torch.ops.hybrid.skinny_gemm(x, w, bias, bool(relu), int(k_splits), bool(pdl))
    k_cache, v_cache, slots, kv_col0 = kv
    why = skinny_kv_unsupported(x, w, k_cache, v_cache, slots, int(kv_col0))
    if why is not None:
        raise RuntimeError(f"hybrid: skinny_gemm kv write: {why}")
    return torch.ops.hybrid.skinny_gemm(x, w, bias, bool(relu), int(k_splits), bool(pdl), k_cache, v_cache, slots,
                                        int(kv_col0))


SKINNY_NORM_MAX_N = 4096
"""csrc/skinny_gemm.h kSkinnyNormMaxN: the block-end build keeps the norm's weight, bias and 8 rows
in its ring."""
_skinny_norm_counters: dict[torch.device, torch.Tensor] = {}


def skinny_norm_counter(device: torch.device) -> torch.Tensor:
    """The block-end GEMM's arrival counter on this device (int32 [1], zeroed once; every launch
    leaves it zero). One per device: skinny_gemm_norm launches must not run concurrently on two
    streams of one device (the engine runs one stream). Created outside graph capture."""
    return persistent_zeros(_skinny_norm_counters, device, (1,), torch.int32, device, "skinny_gemm_norm's counter")


def skinny_gemm_norm_unsupported(x, w, bias, residual, norm_w, norm_b, k_splits: int = 0) -> str | None:
    """skinny_gemm_unsupported plus csrc/ops.cpp skinny_gemm_norm's checks of the block end."""
    why = skinny_gemm_unsupported(x, w, bias, k_splits)
    if why is not None:
        return why
    m, n = x.shape[0], w.shape[0]
    if n > SKINNY_NORM_MAX_N:
        return f"needs N <= {SKINNY_NORM_MAX_N}, got {n}"
    for name, v in (("norm_w", norm_w), ("norm_b", norm_b)):
        if v is None:
            if name == "norm_w":
                return "norm_w is required"
            continue
        if (v.dim() != 1 or v.shape[0] != n or not v.is_contiguous() or v.dtype != x.dtype or v.device != x.device
                or not _aligned16(v)):
            return f"{name} must be [{n}] contiguous, 16-byte aligned, dtype and device of x"
    if residual is not None:
        if (residual.dim() != 2 or tuple(residual.shape) != (m, n) or not residual.is_contiguous()
                or residual.dtype != x.dtype or residual.device != x.device or residual.data_ptr() % 4):
            return "residual must be [M, N] contiguous, 4-byte aligned, dtype and device of x"
    return None


def skinny_gemm_norm(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, residual: torch.Tensor | None,
    norm_w: torch.Tensor, norm_b: torch.Tensor | None, eps: float, *, k_splits: int = 0, pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed, residual_out) [M, N]
    """A projection and its block end in one launch (csrc/skinny_gemm.cu, build kNorm):
    residual_out = round(x @ w.T + b) + residual (rounded), normed = LayerNorm (norm_b given) or
    RMSNorm of it, with linear_norm.splitk_add_norm's rounding steps. Each cluster stores its column
    tile; the last cluster to finish normalises the rows, so no CTA waits on another."""
    _require()
    why = skinny_gemm_norm_unsupported(x, w, b, residual, norm_w, norm_b, int(k_splits))
    if why is not None:
        raise RuntimeError(f"hybrid: skinny_gemm_norm: {why}")
    if pdl and torch.cuda.get_device_capability(x.device)[0] < 9:
        pdl = False
    dev = x.device if x.device.index is not None else torch.device("cuda", torch.cuda.current_device())
    return torch.ops.hybrid.skinny_gemm_norm(x, w, b, residual, norm_w, norm_b, float(eps),
                                             skinny_norm_counter(dev), int(k_splits), bool(pdl))


def skinny_gemm_k_splits(m: int, n: int, k: int, dtype: torch.dtype, device_index: int | None = None) -> int:
    """The k_splits skinny_gemm picks for these shapes on this device."""
    _require()
    if not (1 <= m <= SKINNY_MAX_M and n > 0 and n % SKINNY_TILE == 0 and k > 0 and k % SKINNY_TILE == 0
            and k * SKINNY_MAX_M <= 2**31 - 1 and dtype in SKINNY_DTYPES):
        raise RuntimeError(f"hybrid: skinny_gemm does not take M={m} N={n} K={k} {dtype}")
    if device_index is None:
        device_index = torch.cuda.current_device()
    return int(torch.ops.hybrid.skinny_gemm_k_splits(m, n, k, dtype, device_index))


def _check_skinny(device, dtype, gen) -> str | None:
    n, k = 192, 704  # 3 column tiles, 11 k blocks: 6 stages (last half), uneven slices
    w = torch.randn(n, k, device=device, dtype=dtype, generator=gen) * k ** -0.5
    b = torch.randn(n, device=device, dtype=dtype, generator=gen)
    for m in (1, 5, 17, 33, 64):
        x = torch.randn(m, k, device=device, dtype=dtype, generator=gen)
        for k_splits in (0, 1, 3, 8):
            for bias, relu in ((None, False), (b, True)):
                y = skinny_gemm(x, w, bias, relu, k_splits=k_splits)
                ref = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())
                why = _max_error(y, ref.relu() if relu else ref, 1e-2, 1e-3)
                if why:
                    return f"M={m} k_splits={k_splits} bias={bias is not None}: {why}"
    return None


def skinny_gemm_selfcheck(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """None if skinny_gemm matches an fp32 F.linear on moderate shapes covering every compiled
    variant (M 1..64 -> 1..4 m16 tiles and both warp grids, cluster splits 1..8 incl. uneven K
    slices, K = 11 blocks of 64 so the ring wraps and ends on a half stage, bias, ReLU);
    else why not. Once per (device, dtype) and process; callers offer the kernel only if it passes."""
    return _selfcheck("skinny_gemm", device, dtype, _check_skinny)
