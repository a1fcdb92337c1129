"""CUDA C++ backend (csrc/): loads the extension and wraps its torch ops.

The kernels register as `torch.ops.hybrid.paged_decode_attention`, `..._append` and
`torch.ops.hybrid.write_kv_cache` (csrc/bindings.cpp). They come either from `hybrid._C`, built by
setup.py where a CUDA torch is installed, or JIT-built from csrc/ with ninja on first use (about a minute; cached under
$TORCH_EXTENSIONS_DIR afterwards). Semantics are those of hybrid/ops/reference.py and of the Triton
kernels, so the backends are interchangeable. `available()` never raises: on a machine without CUDA
(or without nvcc) it is simply False and `load_error()` says why.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"
EXTENSION_NAME = "hybrid_C"
NVCC_FLAGS = ["-O3", "--use_fast_math"]

_lock = threading.Lock()
_loaded = False
_error: str | None = None
_origin: str | None = None


def sources() -> list[Path]:
    """The extension's translation units (setup.py builds the same set into hybrid._C)."""
    return sorted(p for p in CSRC_DIR.iterdir() if p.suffix in (".cu", ".cpp"))


def arch_flags() -> list[str]:
    """-gencode for the current device, unless TORCH_CUDA_ARCH_LIST decides. On H100 / H200 (9.0)
    always sm_90a, the arch-specific target whose wgmma the skinny_wgmma kernel needs, with
    HYBRID_SM90A telling its launcher so (the lent machine sets TORCH_CUDA_ARCH_LIST=9.0a, which
    built sm_90a without the define). sm_90a code runs on 9.0 devices only, which is what a JIT
    build for this device is for."""
    major, minor = torch.cuda.get_device_capability()
    cc = f"{major}{minor}"
    if cc == "90":  # also over TORCH_CUDA_ARCH_LIST: this build is for this device
        return ["-gencode=arch=compute_90a,code=sm_90a", "-DHYBRID_SM90A=1"]
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    return [f"-gencode=arch=compute_{cc},code=sm_{cc}"]


def extra_nvcc_flags() -> list[str]:
    """HYBRID_NVCC_EXTRA: more nvcc flags for the JIT build (whitespace separated), for kernel
    experiments such as "-DHYBRID_MLP_STAGES_M16=4" (csrc/decode_mlp.cu). Each distinct set builds
    in a directory of its own (build_directory), so experiments never reuse a default build."""
    return os.environ.get("HYBRID_NVCC_EXTRA", "").split()


def build_directory() -> str:
    """$TORCH_EXTENSIONS_DIR/hybrid_C_<torch>_<cuda>[_x<hash of HYBRID_NVCC_EXTRA>]: one build per
    torch / CUDA pair (and extra flag set)."""
    import hashlib

    from torch.utils.cpp_extension import get_default_build_root

    tag = re.sub(r"[^A-Za-z0-9]+", "_", f"{torch.__version__}_cu{torch.version.cuda}")
    extra = extra_nvcc_flags()
    if extra:
        tag += "_x" + hashlib.sha1(" ".join(extra).encode()).hexdigest()[:10]
    path = os.path.join(get_default_build_root(), f"{EXTENSION_NAME}_{tag}")
    os.makedirs(path, exist_ok=True)
    return path


def _ops_registered() -> bool:
    try:
        torch.ops.hybrid.paged_decode_attention  # noqa: B018 - lookup raises if not registered
        torch.ops.hybrid.write_kv_cache  # noqa: B018
        torch.ops.hybrid.paged_decode_attention_append  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def _register_fakes() -> None:
    """Shape-only implementations so torch.compile / FakeTensor tracing can pass through the ops."""
    try:

        @torch.library.register_fake("hybrid::paged_decode_attention")
        def _paged_decode_fake(query, key_cache, value_cache, block_tables, seq_lens, scale,
                               num_splits=0, heads_per_cta=0):
            return query.new_empty(query.shape)  # [batch, num_heads, head_size] contiguous

        @torch.library.register_fake("hybrid::paged_decode_attention_append")
        def _paged_decode_append_fake(query, key, value, key_cache, value_cache, slot_mapping,
                                      block_tables, seq_lens, scale, num_splits=0, heads_per_cta=0):
            return query.new_empty(query.shape)

        @torch.library.register_fake("hybrid::write_kv_cache")
        def _write_kv_cache_fake(key, value, key_cache, value_cache, slot_mapping):
            return None

        @torch.library.register_fake("hybrid::l2_prefetch")
        def _l2_prefetch_fake(t, nbytes=0, mode=0):
            return None

        @torch.library.register_fake("hybrid::skinny_gemm")
        def _skinny_gemm_fake(x, w, bias=None, relu=False, k_splits=0, pdl=False):
            return x.new_empty((x.shape[0], w.shape[0]))

        @torch.library.register_fake("hybrid::skinny_gemm_norm")
        def _skinny_gemm_norm_fake(x, w, bias, residual, norm_w, norm_b, eps, counter, k_splits=0, pdl=False):
            return x.new_empty((x.shape[0], w.shape[0])), x.new_empty((x.shape[0], w.shape[0]))

        @torch.library.register_fake("hybrid::decode_mlp_norm")
        def _decode_mlp_norm_fake(x, w1, b1, w2, b2, residual, norm_w, norm_b, eps, barrier, relu=True,
                                  k_splits=0, pdl=False, stamps=None, flow=False):
            return x.new_empty(x.shape), x.new_empty(x.shape)

        @torch.library.register_fake("hybrid::decode_mlp_accumulate")
        def _decode_mlp_accumulate_fake(x, w1, b1, w2t, part, barrier, relu=True, pdl=False, stamps=None):
            return None

        @torch.library.register_fake("hybrid::decode_mlp_cluster")
        def _decode_mlp_cluster_fake(x, w1, b1, w2, barrier, relu=True, cluster=8, pdl=False, stamps=None):
            return x.new_empty((w1.shape[0] // (64 * cluster), x.shape[0], x.shape[1]), dtype=torch.float32)

        @torch.library.register_fake("hybrid::decode_mlp")
        def _decode_mlp_fake(x, w1, b1, w2, barrier, relu=True, k_splits=0, pdl=False, stamps=None, prefetch=-1,
                             flow=False):
            s = k_splits or 1  # the real split count depends on the device; tracing needs a shape
            return x.new_empty((s, x.shape[0], x.shape[1]), dtype=torch.float32)
    except Exception as exc:  # already registered, or an older torch without register_fake
        log.debug("hybrid CUDA ops: no fake kernels registered (%s)", exc)


def _import_or_build(verbose: bool) -> str:
    """Makes the ops available; returns where they came from."""
    if _ops_registered():
        return "already registered"
    try:
        if extra_nvcc_flags():  # an experiment's flags: never the prebuilt default
            raise ImportError("HYBRID_NVCC_EXTRA is set")
        import hybrid._C  # noqa: F401 - registers torch.ops.hybrid.*

        return "hybrid._C (setup.py build)"
    except (ImportError, OSError) as exc:
        log.debug("hybrid._C not importable (%s); JIT-building csrc/", exc)
    from torch.utils.cpp_extension import CUDA_HOME, load

    if CUDA_HOME is None:
        raise RuntimeError("nvcc not found (CUDA_HOME unset) and hybrid._C not built")
    build_dir = build_directory()
    log.info("hybrid CUDA ops: building %d sources in %s (first build takes about a minute)%s",
             len(sources()), build_dir, f", extra nvcc flags {extra_nvcc_flags()}" if extra_nvcc_flags() else "")
    start = time.perf_counter()
    load(
        name=EXTENSION_NAME,
        sources=[str(p) for p in sources()],
        extra_cflags=["-O3"],
        extra_cuda_cflags=NVCC_FLAGS + arch_flags() + extra_nvcc_flags(),
        build_directory=build_dir,
        verbose=verbose,
    )
    return f"JIT build in {build_dir} ({time.perf_counter() - start:.1f} s)"


def load(verbose: bool = False) -> bool:
    """Loads (building if needed) the extension once per process. False, with load_error() set,
    where it cannot: no CUDA device, a CPU-only torch, no nvcc, or a failed build."""
    global _loaded, _error, _origin
    if _loaded:
        return True
    with _lock:
        if _loaded:
            return True
        if _error is not None:
            return False
        try:
            if torch.version.cuda is None:
                raise RuntimeError(f"torch {torch.__version__} is built without CUDA")
            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA device visible")
            _origin = _import_or_build(verbose)
            if not _ops_registered():
                raise RuntimeError("extension loaded but torch.ops.hybrid.* is missing")
        except Exception as exc:  # noqa: BLE001 - available() must never raise
            _error = f"{type(exc).__name__}: {exc}"
            log.info("hybrid CUDA ops unavailable: %s", _error)
            return False
        _register_fakes()
        _loaded = True
        log.info("hybrid CUDA ops loaded from %s", _origin)
        return True


def available() -> bool:
    """True when the CUDA ops can run in this process (loads or builds them on first call)."""
    try:
        return load()
    except Exception:  # noqa: BLE001
        return False


def loaded() -> bool:
    """True once the CUDA ops are loaded in this process (never builds or loads them)."""
    return _loaded


def load_error() -> str | None:
    """Why load() failed (None if it succeeded or was not tried)."""
    return _error


def origin() -> str | None:
    """Where the ops came from: hybrid._C, a JIT build, or already registered."""
    return _origin


def _require() -> None:
    if not load():
        raise RuntimeError(f"hybrid CUDA ops unavailable: {_error}")


DECODE_HEAD_SIZES = (32, 64, 80, 96, 128, 256)
"""Head sizes with a compiled decode kernel (csrc/launch.h HYBRID_DECODE_HEAD_SIZES)."""
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _vec(dtype: torch.dtype) -> int:
    return 4 if dtype == torch.float32 else 8  # elements in one 16-byte access


def decode_fits(dtype: torch.dtype, head_size: int, heads_per_cta: int) -> bool:
    """csrc/launch.h decode_fits: q and accumulator registers <= 64 floats per thread."""
    chunks = head_size // _vec(dtype)
    tpt = 16 if chunks > 8 else 8 if chunks > 4 else 4 if chunks > 2 else 2 if chunks > 1 else 1
    return heads_per_cta * -(-chunks // tpt) * _vec(dtype) <= 64


def _aligned16(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def decode_unsupported(query, key_cache, value_cache, block_tables, seq_lens, num_splits: int = 0,
                       heads_per_cta: int = 0) -> str | None:
    """Why csrc/'s paged_decode_attention cannot take these inputs (None: it can).

    The same checks as csrc/ops.cpp, done in Python first: a failed TORCH_CHECK must never be the
    only guard (an exception thrown across the op boundary crashed the process on the device)."""
    if not (query.is_cuda and key_cache.is_cuda):
        return "query and caches must be CUDA tensors"
    if query.dim() != 3 or key_cache.dim() != 4:
        return (f"query must be [batch, num_heads, head_size] and key_cache [num_blocks, block_size, "
                f"num_kv_heads, head_size], got {tuple(query.shape)} / {tuple(key_cache.shape)}")
    if value_cache.shape != key_cache.shape:
        return f"value_cache {tuple(value_cache.shape)} != key_cache {tuple(key_cache.shape)}"
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        return "caches must be contiguous"
    if query.dtype not in DTYPES:
        return f"unsupported dtype {query.dtype} (bfloat16, float16 or float32)"
    if key_cache.dtype != query.dtype or value_cache.dtype != query.dtype:
        return f"query and caches must share a dtype ({query.dtype} vs {key_cache.dtype})"
    if any(t.device != query.device for t in (key_cache, value_cache, block_tables, seq_lens)):
        return f"all tensors must be on {query.device}"
    batch, num_heads, head_size = query.shape
    _, block_size, num_kv_heads, cache_head_size = key_cache.shape
    if cache_head_size != head_size:
        return f"cache head_size {cache_head_size} != query head_size {head_size}"
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        return f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}"
    if head_size not in DECODE_HEAD_SIZES:
        return f"no decode kernel for head_size {head_size} {DECODE_HEAD_SIZES}"
    if block_size <= 0 or block_size & (block_size - 1):
        return "block_size must be a power of two"
    if (block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.dtype != torch.int32
            or (block_tables.shape[1] > 1 and block_tables.stride(1) != 1)):
        return f"block_tables must be [batch, max_blocks] int32, got {tuple(block_tables.shape)} {block_tables.dtype}"
    if seq_lens.dim() != 1 or seq_lens.shape[0] != batch or seq_lens.dtype != torch.int32 \
            or not seq_lens.is_contiguous():
        return "seq_lens must be [batch] int32 contiguous"
    if batch > 65535 or num_splits > 65535:
        return f"batch {batch} / num_splits {num_splits} > 65535"
    if not (_aligned16(key_cache) and _aligned16(value_cache)):
        return "caches must be 16-byte aligned"
    if heads_per_cta:
        group = num_heads // num_kv_heads
        if heads_per_cta not in (1, 2, 4, 8):
            return f"heads_per_cta must be 1, 2, 4 or 8, got {heads_per_cta}"
        if group % heads_per_cta:
            return f"heads_per_cta {heads_per_cta} does not divide the GQA group {group}"
        if not decode_fits(query.dtype, head_size, heads_per_cta):
            return f"heads_per_cta {heads_per_cta} needs too many registers at head_size {head_size}"
    return None


def write_unsupported(key, value, key_cache, value_cache, slot_mapping) -> str | None:
    """Why csrc/'s write_kv_cache cannot take these inputs (None: it can); csrc/ops.cpp's checks."""
    if not (key.is_cuda and key_cache.is_cuda):
        return "key and caches must be CUDA tensors"
    if key.dim() != 3 or value.shape != key.shape:
        return f"key/value must be [num_tokens, num_kv_heads, head_size], got {tuple(key.shape)} / {tuple(value.shape)}"
    if key_cache.dim() != 4 or key_cache.shape[2:] != key.shape[1:] or value_cache.shape != key_cache.shape:
        return f"caches {tuple(key_cache.shape)} / {tuple(value_cache.shape)} do not hold key rows {tuple(key.shape)}"
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        return "caches must be contiguous"
    if key_cache.dtype not in DTYPES:
        return f"unsupported dtype {key_cache.dtype} (bfloat16, float16 or float32)"
    if not (key.dtype == value.dtype == value_cache.dtype == key_cache.dtype):
        return "key, value and caches must share a dtype"
    if (slot_mapping.dim() != 1 or slot_mapping.shape[0] != key.shape[0]
            or slot_mapping.dtype != torch.int64 or not slot_mapping.is_contiguous()):
        return "slot_mapping must be [num_tokens] int64 contiguous"
    if any(t.device != key.device for t in (value, key_cache, value_cache, slot_mapping)):
        return f"all tensors must be on {key.device}"
    if key.shape[0] > 2**31 - 1:
        return "too many tokens"
    return None


def append_unsupported(query, key, value, key_cache, value_cache, slot_mapping, block_tables, seq_lens,
                       num_splits: int = 0, heads_per_cta: int = 0) -> str | None:
    """Why csrc/'s paged_decode_attention_append cannot take these inputs (None: it can): the
    decode checks plus csrc/ops.cpp's checks of key / value / slot_mapping."""
    why = decode_unsupported(query, key_cache, value_cache, block_tables, seq_lens, num_splits,
                             heads_per_cta)
    if why is not None:
        return why
    if not key.is_cuda:
        return "key must be a CUDA tensor"
    if key.dim() != 3 or key.shape[0] != query.shape[0] or value.shape != key.shape:
        return (f"key/value must be [batch, num_kv_heads, head_size], got {tuple(key.shape)} / "
                f"{tuple(value.shape)} for query {tuple(query.shape)}")
    if tuple(key_cache.shape[2:]) != tuple(key.shape[1:]):
        return f"key_cache {tuple(key_cache.shape)} does not hold key rows {tuple(key.shape)}"
    if key.dtype != query.dtype or value.dtype != query.dtype:
        return "query, key and value must share a dtype"
    if (slot_mapping.dim() != 1 or slot_mapping.shape[0] != key.shape[0]
            or slot_mapping.dtype != torch.int64 or not slot_mapping.is_contiguous()):
        return "slot_mapping must be [batch] int64 contiguous"
    if any(t.device != query.device for t in (key, value, slot_mapping)):
        return f"all tensors must be on {query.device}"
    return None


def paged_decode_attention(
    query: torch.Tensor,  # [batch, num_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    block_tables: torch.Tensor,  # [batch, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [batch] int32
    scale: float,
    *,
    num_splits: int = 0,
    heads_per_cta: int = 0,
) -> torch.Tensor:  # [batch, num_heads, head_size]
    """One query token per row against its paged KV cache (see reference.paged_decode_attention).

    num_splits: flash-decoding splits of each row's context (0 = chosen from host-known shapes,
    graph-safe). heads_per_cta: query heads of one kv group per CTA (0 = the most that fit).
    """
    _require()
    why = decode_unsupported(query, key_cache, value_cache, block_tables, seq_lens, int(num_splits),
                             int(heads_per_cta))
    if why is not None:
        raise RuntimeError(f"hybrid: {why}")
    return torch.ops.hybrid.paged_decode_attention(
        query, key_cache, value_cache, block_tables, seq_lens, float(scale), int(num_splits),
        int(heads_per_cta),
    )


def paged_decode_attention_append(
    query: torch.Tensor,  # [batch, num_heads, head_size]
    key: torch.Tensor,  # [batch, num_kv_heads, head_size]: the step's keys
    value: torch.Tensor,  # [batch, num_kv_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size], written in place
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size], written in place
    slot_mapping: torch.Tensor,  # [batch] int64; < 0 skips the write
    block_tables: torch.Tensor,  # [batch, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [batch] int32, counting the current token
    scale: float,
    *,
    num_splits: int = 0,
    heads_per_cta: int = 0,
) -> torch.Tensor:  # [batch, num_heads, head_size]
    """write_kv_cache + paged_decode_attention in one launch (see
    reference.paged_decode_attention_append); the knobs are paged_decode_attention's."""
    _require()
    why = append_unsupported(query, key, value, key_cache, value_cache, slot_mapping, block_tables,
                             seq_lens, int(num_splits), int(heads_per_cta))
    if why is not None:
        raise RuntimeError(f"hybrid: {why}")
    return torch.ops.hybrid.paged_decode_attention_append(
        query, key, value, key_cache, value_cache, slot_mapping, block_tables, seq_lens, float(scale),
        int(num_splits), int(heads_per_cta),
    )


def write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; < 0 skips the token
) -> None:
    """Scatters the step's keys and values into the caches in place (see reference.write_kv_cache)."""
    _require()
    why = write_unsupported(key, value, key_cache, value_cache, slot_mapping)
    if why is not None:
        raise RuntimeError(f"hybrid: {why}")
    torch.ops.hybrid.write_kv_cache(key, value, key_cache, value_cache, slot_mapping)


def decode_num_splits(
    batch: int, num_heads: int, num_kv_heads: int, head_size: int, max_len: int,
    dtype: torch.dtype, heads_per_cta: int = 0, device_index: int | None = None,
) -> int:
    """The split count paged_decode_attention picks for these shapes (max_len = blocks * block_size)."""
    _require()
    if num_kv_heads <= 0 or num_heads % num_kv_heads or head_size not in DECODE_HEAD_SIZES \
            or dtype not in DTYPES:
        raise RuntimeError(f"hybrid: no decode kernel for heads {num_heads}/{num_kv_heads}, "
                           f"head_size {head_size}, dtype {dtype}")
    if heads_per_cta and (heads_per_cta not in (1, 2, 4, 8) or (num_heads // num_kv_heads) % heads_per_cta
                          or not decode_fits(dtype, head_size, heads_per_cta)):
        raise RuntimeError(f"hybrid: heads_per_cta {heads_per_cta} is not valid here")
    if device_index is None:
        device_index = torch.cuda.current_device()
    return int(torch.ops.hybrid.paged_decode_num_splits(
        batch, num_heads, num_kv_heads, head_size, max_len, dtype, heads_per_cta, device_index,
    ))


# ---- skinny (decode) GEMM ---------------------------------------------------------------------
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
    c = _skinny_norm_counters.get(device)
    if c is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("hybrid: skinny_gemm_norm's counter must be created outside CUDA-graph capture; "
                               "run the op once eagerly first")
        c = _skinny_norm_counters[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return c


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


_checked: dict[tuple, str | None] = {}


def _selfcheck(name: str, device, dtype: torch.dtype, check) -> str | None:
    """Runs check(device, dtype, generator) -> None or why not, once per (name, device, dtype) and
    process, on the device's current CUDA index; any exception counts as a failure. Callers offer
    the kernel only where this returns None."""
    device = torch.device(device)
    if device.type != "cuda":
        return "not a CUDA device"
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (name, str(device), dtype)
    if key in _checked:
        return _checked[key]
    try:
        if not load():
            raise RuntimeError(f"hybrid CUDA ops unavailable: {_error}")
        with torch.no_grad():
            why = check(device, dtype, torch.Generator(device=device).manual_seed(0))
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - a failing kernel is simply never offered
        why = f"{type(exc).__name__}: {exc}"[:300]
    if why is not None:
        log.warning("hybrid %s disabled on %s %s: %s", name, device, dtype, why)
    _checked[key] = why
    return why


def _max_error(got: torch.Tensor, ref: torch.Tensor, rel: float, abs_: float) -> str | None:
    """None if |got - ref| <= rel * max|ref| + abs_ everywhere (NaN fails), else the numbers."""
    err = (got.float() - ref).abs().max().item()
    tol = rel * ref.abs().max().item() + abs_
    return None if err <= tol else f"max error {err:.3g} > {tol:.3g}"


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


def l2_prefetch(t: torch.Tensor, nbytes: int = 0, mode: int = 0) -> None:
    """Hint the L2 to fetch the first nbytes (0: all) of contiguous CUDA tensor t from DRAM
    (csrc/l2_prefetch.cu; mode 0 bulk cp.async.bulk.prefetch.L2, sm_90+; 1 per 128-byte line,
    evict-last). Writes nothing; CUDA-graph capturable."""
    # checked here, not only in ops.cpp: an exception thrown across the op boundary crashed the
    # process on the device (see skinny_gemm_unsupported)
    if not t.is_cuda:
        raise ValueError("l2_prefetch needs a CUDA tensor")
    if not t.is_contiguous():
        raise ValueError("l2_prefetch needs a contiguous tensor")
    if mode not in (0, 1):
        raise ValueError(f"l2_prefetch mode must be 0 (bulk) or 1 (per line), got {mode}")
    if t.data_ptr() % 16:
        raise ValueError("l2_prefetch needs a 16-byte aligned tensor")
    if mode == 0 and torch.cuda.get_device_capability(t.device)[0] < 9:
        raise ValueError("l2_prefetch mode 0 (bulk) needs sm_90+")
    _require()
    torch.ops.hybrid.l2_prefetch(t, int(nbytes), int(mode))


def set_decode_prefetch(on: bool) -> bool:
    """With PDL launch: the decode attention loads each warp's first KV tile before waiting for the
    previous kernel (csrc/paged_attention.cuh). Only valid inside the runner's decode step, whose
    earlier kernels write nothing the attention reads but position seq_len - 1 and seq_lens; the
    runner sets it around the step (decode_prefetch). False where the extension lacks the switch."""
    try:
        torch.ops.hybrid.set_decode_prefetch(bool(on))
    except (AttributeError, RuntimeError):
        return False
    return True


def set_decode_pdl_launch(on: bool) -> bool:
    """Programmatic dependent launch of the decode attention kernel (csrc, sm_90+). False where the
    loaded extension predates the switch (nothing changes then)."""
    try:
        torch.ops.hybrid.set_decode_pdl_launch(bool(on))
    except (AttributeError, RuntimeError):
        return False
    return True
