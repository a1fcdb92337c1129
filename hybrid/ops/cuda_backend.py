"""CUDA C++ backend (csrc/): loads the extension and wraps its attention and cache ops.

The kernels register as `torch.ops.hybrid.paged_decode_attention`, `..._append` and
`torch.ops.hybrid.write_kv_cache` (csrc/bindings.cpp); the GEMM and MLP ops of the same extension
are wrapped by hybrid.ops.cuda_skinny, cuda_streamk and cuda_mlp, which use the loader, the
self-check harness and the checks' helpers here. They come either from `hybrid._C`, built by
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


def persistent_zeros(cache: dict, key, shape: tuple, dtype: torch.dtype, device: torch.device,
                     what: str) -> torch.Tensor:
    """cache[key], created zeroed on first use: the counters and sums the kernels keep between
    launches (each launch leaves them zero again). Created outside any CUDA-graph capture (a tensor
    from the graph's pool would be freed with the graph); inside one it is an error naming `what`."""
    t = cache.get(key)
    if t is None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"hybrid: {what} must be created outside CUDA-graph capture; run the op once "
                               "eagerly first")
        t = cache[key] = torch.zeros(shape, dtype=dtype, device=device)
    return t


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
