"""The stream-K skinny GEMM's torch op (csrc/skinny_streamk.cu: `torch.ops.hybrid.skinny_gemm_streamk`):
the Python mirror of csrc/ops.cpp's checks and of skinny_streamk.h's partition, the per-device tile
counters, and the wrapper. The extension itself is loaded by hybrid.ops.cuda_backend.

The partition (skinny_streamk.h): units are (64-column tile, 64-wide k block), k block fastest;
CTA c of G takes units [c * U // G, (c + 1) * U // G). A tile split across CTAs is summed by the
last of them to arrive, from the others' fp32 partials, in contributor order.
"""
from __future__ import annotations

import torch

from hybrid.ops.cuda_backend import _aligned16, _require, persistent_zeros
from hybrid.ops.cuda_skinny import SKINNY_DTYPES

TILE = 64  # kStreamKTile: output columns per tile and k per unit
MAX_M = 64  # kStreamKMaxM
MAX_TILES_PER_CTA = 16  # kStreamKMaxTilesPerCta
MAX_TILES = 4096  # kStreamKMaxTiles: counters per device
STAMPS = 8  # kStreamKStamps: start, first unit landed, last unit consumed, last flush: partial stored,
# ticket taken, sum done; end
_counters: dict[torch.device, torch.Tensor] = {}


def unit_range(c: int, units: int, ctas: int) -> tuple[int, int]:
    """The units [u0, u1) of CTA c (skinny_streamk.cu)."""
    return c * units // ctas, (c + 1) * units // ctas


def cta_of(u: int, units: int, ctas: int) -> int:
    """The CTA holding unit u: the largest c with c * units // ctas <= u (the kernel's cta_of)."""
    return ((u + 1) * ctas - 1) // units


def max_contrib(n: int, k: int, ctas: int) -> int:
    """skinny_streamk.h streamk_max_contrib: a tile's workspace slots (CTAs it can meet)."""
    kb = k // TILE
    shortest = (n // TILE) * kb // ctas
    return (kb + shortest - 1) // shortest + 1


def max_tiles_per_cta(n: int, k: int, ctas: int) -> int:
    """skinny_streamk.h streamk_max_tiles_per_cta: column tiles one CTA can touch."""
    kb = k // TILE
    units = (n // TILE) * kb
    longest = -(-units // ctas)
    return -(-longest // kb) + 1


def available() -> bool:
    """Whether the loaded extension has the stream-K GEMM (a build for sm_90a: H100 / H200)."""
    try:
        return bool(torch.ops.hybrid.skinny_streamk_available())
    except (AttributeError, RuntimeError):
        return False


def default_ctas(n: int, k: int, device: torch.device) -> int:
    """One CTA per SM (each holds ~213 KB of shared memory), at most one per unit."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return min(sms, (n // TILE) * (k // TILE))


def unsupported(x, w, bias, ctas: int = 0) -> str | None:
    """Why skinny_gemm_streamk cannot take these inputs (None: it can); csrc/ops.cpp's checks."""
    if not (x.is_cuda and w.is_cuda):
        return "x and w must be CUDA tensors"
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        return f"x {tuple(x.shape)} and w {tuple(w.shape)} must be [M, K] and [N, K]"
    if x.dtype not in SKINNY_DTYPES or w.dtype != x.dtype:
        return f"x and w must both be bfloat16 or float16, got {x.dtype} / {w.dtype}"
    if not (x.is_contiguous() and w.is_contiguous()) or w.device != x.device or not (_aligned16(x) and _aligned16(w)):
        return "x and w must be contiguous, 16-byte aligned, on one device"
    m, k = x.shape
    n = w.shape[0]
    if not 1 <= m <= MAX_M:
        return f"needs 1 <= M <= {MAX_M}, got {m}"
    if n <= 0 or n % TILE or n // TILE > MAX_TILES or k <= 0 or k % TILE:
        return f"needs N (<= {MAX_TILES * TILE}) and K multiples of {TILE}, got N={n} K={k}"
    if bias is not None:
        if (bias.dim() != 1 or bias.shape[0] != n or not bias.is_contiguous() or bias.dtype != x.dtype
                or bias.device != x.device or bias.data_ptr() % 4):
            return "bias must be [N] contiguous, 4-byte aligned, dtype and device of x"
    if ctas < 0:
        return f"ctas must be >= 0, got {ctas}"
    g = min(ctas if ctas > 0 else default_ctas(n, k, x.device), (n // TILE) * (k // TILE))
    if max_tiles_per_cta(n, k, g) > MAX_TILES_PER_CTA:
        return f"{g} CTAs would give a CTA more than {MAX_TILES_PER_CTA} column tiles; use more CTAs"
    return None


def counters(device: torch.device) -> torch.Tensor:
    """The tile counters on this device (int32 [MAX_TILES], zeroed once; every launch leaves them
    zero). One set per device: launches must not run concurrently on two streams of one device (the
    engine runs one stream). Created outside graph capture."""
    return persistent_zeros(_counters, device, (MAX_TILES,), torch.int32, device, "skinny_gemm_streamk's counters")


def skinny_gemm_streamk(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, relu: bool = False, *,
                        ctas: int = 0, pdl: bool = False, stamps: torch.Tensor | None = None) -> torch.Tensor:
    """act(x @ w.T + bias) for M <= 64 (csrc/skinny_streamk.cu): every SM streams an equal share of
    the weight's (64-column, 64-k) units through a 12-deep TMA ring into wgmma; tiles split across
    CTAs are summed by their last arriver, in a fixed order. ctas: grid size (0 = one per SM).
    pdl: programmatic dependent launch (the first weight boxes load before the wait). stamps:
    int64 [>= ctas x STAMPS] for per-CTA %globaltimer stamps (diagnostics; see skinny_streamk.h)."""
    _require()
    why = unsupported(x, w, bias, int(ctas))
    if why is not None:
        raise RuntimeError(f"hybrid: skinny_gemm_streamk: {why}")
    if not available():
        raise RuntimeError("hybrid: skinny_gemm_streamk needs the extension built for sm_90a (H100 / H200)")
    dev = x.device if x.device.index is not None else torch.device("cuda", torch.cuda.current_device())
    return torch.ops.hybrid.skinny_gemm_streamk(x, w, bias, bool(relu), counters(dev), int(ctas), bool(pdl),
                                                stamps)
