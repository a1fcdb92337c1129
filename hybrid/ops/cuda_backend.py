"""CUDA C++ backend (csrc/): loads the extension and wraps its torch ops.

The kernels register as `torch.ops.hybrid.paged_decode_attention` / `torch.ops.hybrid.write_kv_cache`
(csrc/bindings.cpp). They come either from `hybrid._C`, built by setup.py where a CUDA torch is
installed, or JIT-built from csrc/ with ninja on first use (about a minute; cached under
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
    """-gencode for the current device (sm_90 on H100/H200), unless TORCH_CUDA_ARCH_LIST decides."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    major, minor = torch.cuda.get_device_capability()
    cc = f"{major}{minor}"
    return [f"-gencode=arch=compute_{cc},code=sm_{cc}"]


def build_directory() -> str:
    """$TORCH_EXTENSIONS_DIR/hybrid_C_<torch>_<cuda>: one build per torch / CUDA pair."""
    from torch.utils.cpp_extension import get_default_build_root

    tag = re.sub(r"[^A-Za-z0-9]+", "_", f"{torch.__version__}_cu{torch.version.cuda}")
    path = os.path.join(get_default_build_root(), f"{EXTENSION_NAME}_{tag}")
    os.makedirs(path, exist_ok=True)
    return path


def _ops_registered() -> bool:
    try:
        torch.ops.hybrid.paged_decode_attention  # noqa: B018 - lookup raises if not registered
        torch.ops.hybrid.write_kv_cache  # noqa: B018
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

        @torch.library.register_fake("hybrid::write_kv_cache")
        def _write_kv_cache_fake(key, value, key_cache, value_cache, slot_mapping):
            return None
    except Exception as exc:  # already registered, or an older torch without register_fake
        log.debug("hybrid CUDA ops: no fake kernels registered (%s)", exc)


def _import_or_build(verbose: bool) -> str:
    """Makes the ops available; returns where they came from."""
    if _ops_registered():
        return "already registered"
    try:
        import hybrid._C  # noqa: F401 - registers torch.ops.hybrid.*

        return "hybrid._C (setup.py build)"
    except (ImportError, OSError) as exc:
        log.debug("hybrid._C not importable (%s); JIT-building csrc/", exc)
    from torch.utils.cpp_extension import CUDA_HOME, load

    if CUDA_HOME is None:
        raise RuntimeError("nvcc not found (CUDA_HOME unset) and hybrid._C not built")
    build_dir = build_directory()
    log.info("hybrid CUDA ops: building %d sources in %s (first build takes about a minute)",
             len(sources()), build_dir)
    start = time.perf_counter()
    load(
        name=EXTENSION_NAME,
        sources=[str(p) for p in sources()],
        extra_cflags=["-O3"],
        extra_cuda_cflags=NVCC_FLAGS + arch_flags(),
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


def load_error() -> str | None:
    """Why load() failed (None if it succeeded or was not tried)."""
    return _error


def origin() -> str | None:
    """Where the ops came from: hybrid._C, a JIT build, or already registered."""
    return _origin


def _require() -> None:
    if not load():
        raise RuntimeError(f"hybrid CUDA ops unavailable: {_error}")


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
    return torch.ops.hybrid.paged_decode_attention(
        query, key_cache, value_cache, block_tables, seq_lens, float(scale), int(num_splits),
        int(heads_per_cta),
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
    torch.ops.hybrid.write_kv_cache(key, value, key_cache, value_cache, slot_mapping)


def decode_num_splits(
    batch: int, num_heads: int, num_kv_heads: int, head_size: int, max_len: int,
    dtype: torch.dtype, heads_per_cta: int = 0, device_index: int | None = None,
) -> int:
    """The split count paged_decode_attention picks for these shapes (max_len = blocks * block_size)."""
    _require()
    if device_index is None:
        device_index = torch.cuda.current_device()
    return int(torch.ops.hybrid.paged_decode_num_splits(
        batch, num_heads, num_kv_heads, head_size, max_len, dtype, heads_per_cta, device_index,
    ))
