"""Kernel ops of the hybrid engine, dispatched to a backend: "triton" | "cuda" | "torch" | "auto".

- triton: the kernels in this package (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
- cuda:   csrc/'s paged_decode_attention(_append) and write_kv_cache (torch.ops.hybrid.*, through
          hybrid/ops/cuda_backend.py); every other op goes to triton.
- torch:  the pure-PyTorch reference (hybrid/ops/reference.py).
- auto:   cuda for the ops in the auto-cuda set when the extension is available and the tensors are
          on CUDA, else triton when usable, else torch. The auto-cuda set is configurable by
          set_auto_cuda_ops() or HYBRID_AUTO_CUDA_OPS ("none", "all" or a comma list of op
          names; default "all"), and pick_decode_backends() (autoselect.py) sets it by timing
          both versions at the engine's decode shapes, per decode batch bucket (call it before
          capturing CUDA graphs).

The backend is module-level state (set_backend / get_backend, or HYBRID_OPS_BACKEND); resolved
implementations are cached per (op, device type), so a call costs one dict lookup.
"""
from __future__ import annotations

import bisect
import importlib
import logging
import os
from typing import Callable, Iterable

import torch

from hybrid.ops import reference

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "cuda", "torch")
CUDA_OPS = ("paged_decode_attention", "write_kv_cache", "paged_decode_attention_append")
"""Ops that csrc/ implements."""
_TRITON_MODULES = {
    "write_kv_cache": "cache_write",
    "paged_decode_attention": "paged_attention",
    "paged_decode_attention_append": "paged_attention",
    "prefill_attention": "prefill",
    "add_layernorm": "layernorm",
    "add_rmsnorm": "rmsnorm",
    "embed_layernorm": "layernorm",
    "embed_rmsnorm": "rmsnorm",
    "rotary_embedding": "rotary",
    "relu": "activations",
    "silu_and_mul": "activations",
    "decode_prepare": "decode_metadata",  # module != op name: importing it would shadow the op
    "ban_eos": "eos_ban",
    "decode_advance": "decode_state",
    "greedy_partials": "greedy",
}


def _parse_ops(spec: str) -> set[str]:
    spec = spec.strip().lower()
    if spec in ("", "none"):
        return set()
    if spec == "all":
        return set(CUDA_OPS)
    ops = {s.strip() for s in spec.split(",") if s.strip()}
    unknown = ops - set(CUDA_OPS)
    if unknown:
        raise ValueError(f"unknown CUDA ops {sorted(unknown)}; choose from {CUDA_OPS}")
    return ops


_backend: str = os.environ.get("HYBRID_OPS_BACKEND", "auto")
_auto_cuda_ops: set[str] = _parse_ops(os.environ.get("HYBRID_AUTO_CUDA_OPS", "all"))
_impls: dict[tuple[str, str], Callable] = {}


def set_backend(name: str) -> None:
    """Selects the backend for every op from now on ("auto", "triton", "cuda", "torch")."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown ops backend {name!r}; choose from {BACKENDS}")
    _backend = name
    _impls.clear()


def get_backend() -> str:
    return _backend


_auto_rows: dict[str, tuple[list[int], list[bool]]] = {}  # op -> (row buckets, CUDA? per bucket)


def set_auto_cuda_ops(ops: Iterable[str] | str, rows: dict[str, dict[int, bool]] | None = None) -> None:
    """Which CUDA_OPS "auto" sends to the CUDA extension (when it is available). rows: per op, a
    per-batch refinement {rows bucket: True = CUDA, False = Triton}: a call with r rows (the first
    tensor argument's leading dimension) takes the smallest bucket >= r, the largest past the end.
    The decode step is traced once per batch bucket (CUDA graphs), so each bucket keeps its own
    pick. Without rows (or for an op it leaves out) the op runs on CUDA at every batch."""
    global _auto_cuda_ops
    _auto_cuda_ops = _parse_ops(ops if isinstance(ops, str) else ",".join(ops))
    _auto_rows.clear()
    for op, picks in (rows or {}).items():
        if op not in CUDA_OPS:
            raise ValueError(f"unknown CUDA op {op!r}; choose from {CUDA_OPS}")
        if not picks or any(int(r) <= 0 for r in picks):
            raise ValueError(f"{op}: rows buckets must be positive, got {sorted(picks)}")
        sizes = sorted(int(r) for r in picks)
        _auto_rows[op] = (sizes, [bool(picks[r]) for r in sorted(picks, key=int)])
    _impls.clear()


def auto_cuda_for(op: str, rows: int) -> bool:
    """Whether "auto" runs op on the CUDA extension for a call of `rows` rows (ignoring whether
    the extension supports the shapes, which each call still checks)."""
    if op not in _auto_cuda_ops:
        return False
    table = _auto_rows.get(op)
    if table is None:
        return True
    sizes, cuda = table
    i = bisect.bisect_left(sizes, rows)
    return cuda[min(i, len(sizes) - 1)]


def triton_usable(device: torch.device) -> bool:
    """Triton runs CUDA tensors, and CPU tensors only through its interpreter."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def cuda_ext_available() -> bool:
    try:
        from hybrid.ops import cuda_backend
    except ImportError:
        return False
    return bool(cuda_backend.available())


def resolve_backend(op: str, device: torch.device) -> str:
    """The backend that runs `op` on tensors of `device` under the current setting."""
    name = _backend
    if name == "torch":
        return "torch"
    if name == "auto":
        if (op in CUDA_OPS and op in _auto_cuda_ops and device.type == "cuda"
                and cuda_ext_available()):
            return "cuda"
        return "triton" if triton_usable(device) else "torch"
    if name == "cuda" and op in CUDA_OPS:
        if device.type != "cuda" or not cuda_ext_available():
            raise RuntimeError(f"ops backend 'cuda' asked for {op} but the CUDA extension is not "
                               f"available for {device.type} tensors")
        return "cuda"
    if not triton_usable(device):  # "triton", or "cuda" for an op csrc/ lacks
        raise RuntimeError(f"ops backend {name!r} needs Triton for {op} on {device.type} tensors; "
                           "set TRITON_INTERPRET=1 before importing triton, or use 'torch'")
    return "triton"


def _cuda_impl(op: str) -> Callable:
    from hybrid.ops import cuda_backend

    fn = getattr(cuda_backend, op, None)
    if fn is not None:
        return fn
    raw = getattr(torch.ops.hybrid, op)
    if op == "paged_decode_attention":  # csrc/ops.h: trailing num_splits, heads_per_cta (0 = auto)
        return lambda q, kc, vc, bt, sl, scale: raw(q, kc, vc, bt, sl, scale, 0, 0)
    return raw


def get_impl(op: str, backend: str) -> Callable:
    """The implementation of `op` in one concrete backend ("triton", "cuda" or "torch"), whatever
    the current setting (benchmarks and tests compare backends side by side)."""
    if backend == "torch":
        return getattr(reference, op)
    if backend == "cuda":
        if op not in CUDA_OPS:
            raise ValueError(f"csrc/ has no {op}; it has {CUDA_OPS}")
        return _cuda_impl(op)
    if backend == "triton":
        return getattr(importlib.import_module(f"hybrid.ops.{_TRITON_MODULES[op]}"), op)
    raise ValueError(f"unknown backend {backend!r}")


def _auto_cuda_impl(op: str) -> Callable:
    """"auto"'s CUDA choice: the extension where it supports the call's shapes and dtypes
    (cuda_backend.*_unsupported, the C++ checks done in Python), Triton for the rest."""
    from hybrid.ops import cuda_backend

    triton_fn = get_impl(op, "triton")
    raw = getattr(torch.ops.hybrid, op)  # checked just before: no second check per call
    nargs = 5  # leading tensor arguments the check takes
    if op == "paged_decode_attention":
        unsupported = cuda_backend.decode_unsupported

        def cuda(q, kc, vc, bt, sl, scale):
            return raw(q, kc, vc, bt, sl, float(scale), 0, 0)
    elif op == "paged_decode_attention_append":
        unsupported, nargs = cuda_backend.append_unsupported, 8

        def cuda(q, k, v, kc, vc, slots, bt, sl, scale):
            return raw(q, k, v, kc, vc, slots, bt, sl, float(scale), 0, 0)
    else:
        unsupported, cuda = cuda_backend.write_unsupported, raw

    per_rows = op in _auto_rows  # a per-batch pick (set_auto_cuda_ops(..., rows=...)): read at trace time

    def run(*args):
        if per_rows and not auto_cuda_for(op, args[0].shape[0]):
            return triton_fn(*args)
        if unsupported(*args[:nargs]) is None:
            return cuda(*args)
        return triton_fn(*args)

    run.__name__ = f"auto_{op}"
    return run


def _impl(op: str, device: torch.device) -> Callable:
    key = (op, device.type)
    fn = _impls.get(key)
    if fn is None:
        backend = resolve_backend(op, device)
        fn = _auto_cuda_impl(op) if backend == "cuda" and _backend == "auto" else get_impl(op, backend)
        log.debug("ops: %s on %s runs on the %s backend", op, device.type, backend)
        _impls[key] = fn
    return fn


def write_kv_cache(key, value, key_cache, value_cache, slot_mapping) -> None:
    """key/value [T, Hkv, D] -> caches [num_blocks, block_size, Hkv, D] at slot_mapping [T]
    (int64; < 0 skips). In place."""
    _impl("write_kv_cache", key.device)(key, value, key_cache, value_cache, slot_mapping)


def paged_decode_attention(query, key_cache, value_cache, block_tables, seq_lens,
                           scale: float) -> torch.Tensor:
    """query [B, H, D], block_tables [B, max_blocks] int32, seq_lens [B] int32 -> [B, H, D]."""
    return _impl("paged_decode_attention", query.device)(
        query, key_cache, value_cache, block_tables, seq_lens, scale)


def paged_decode_attention_append(query, key, value, key_cache, value_cache, slot_mapping,
                                  block_tables, seq_lens, scale: float) -> torch.Tensor:
    """The decode step's write_kv_cache + paged_decode_attention in one launch: key/value
    [B, Hkv, D] (the step's rows) go to the caches at slot_mapping [B] int64 (< 0 skips) and
    query [B, H, D] attends to positions 0..seq_lens-2 of the cache plus key/value as the last
    (seq_lens counts the current token). -> [B, H, D]."""
    return _impl("paged_decode_attention_append", query.device)(
        query, key, value, key_cache, value_cache, slot_mapping, block_tables, seq_lens, scale)


def prefill_attention(query, key, value, cu_seqlens, max_seqlen: int, scale: float) -> torch.Tensor:
    """Causal varlen attention: query [T, H, D], key/value [T, Hkv, D], cu_seqlens [B+1] int32."""
    return _impl("prefill_attention", query.device)(query, key, value, cu_seqlens, max_seqlen,
                                                    scale)


def add_layernorm(x, residual, weight, bias, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (LayerNorm(x + residual), x + residual); residual may be None."""
    return _impl("add_layernorm", x.device)(x, residual, weight, bias, eps)


def add_rmsnorm(x, residual, weight, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (RMSNorm(x + residual), x + residual); residual may be None."""
    return _impl("add_rmsnorm", x.device)(x, residual, weight, eps)


def embed_layernorm(ids, table, pos_ids, pos_table, pos_offset: int, weight, bias,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> add_layernorm(table[ids], pos_table[pos_ids + pos_offset], ...) in one launch."""
    return _impl("embed_layernorm", table.device)(ids, table, pos_ids, pos_table, pos_offset, weight,
                                                  bias, eps)


def embed_rmsnorm(ids, table, weight, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> add_rmsnorm(table[ids], None, ...) in one launch."""
    return _impl("embed_rmsnorm", table.device)(ids, table, weight, eps)


def rotary_embedding(positions, query, key, cos_sin_cache, is_neox: bool = True) -> None:
    """Rotates query [T, H, D] and key [T, Hkv, D] in place by cos_sin_cache[positions]."""
    _impl("rotary_embedding", query.device)(positions, query, key, cos_sin_cache, is_neox)


def relu(x: torch.Tensor) -> torch.Tensor:
    return _impl("relu", x.device)(x)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2 * I] -> silu(x[:, :I]) * x[:, I:] as [T, I]."""
    return _impl("silu_and_mul", x.device)(x)


def decode_prepare(positions, remaining, block_tables, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode metadata from the runner's buffers: -> (slot_mapping [b] int64, -1 for rows with
    remaining <= 0; seq_lens [b] int32, 0 for them). block_tables [b, max_blocks] int32."""
    return _impl("decode_prepare", positions.device)(positions, remaining, block_tables, block_size)


def ban_eos(logits, num_generated, min_new_tokens, eos_ids) -> None:
    """logits [b, V][i, eos_ids] = -inf where num_generated[i] < min_new_tokens[i]. In place."""
    _impl("ban_eos", logits.device)(logits, num_generated, min_new_tokens, eos_ids)


def decode_advance(next_tokens, input_ids, positions, remaining, num_generated, stop_on_eos,
                   out_tokens, step_idx, eos_ids, pad_token_id: int) -> None:
    """Records a decode step's sampled tokens at out_tokens[step_idx] and advances the per-row
    buffers and step_idx in place (see reference.decode_advance)."""
    _impl("decode_advance", next_tokens.device)(
        next_tokens, input_ids, positions, remaining, num_generated, stop_on_eos, out_tokens,
        step_idx, eos_ids, pad_token_id)


def greedy_partials(logits) -> torch.Tensor:
    """Greedy argmax, first half: logits [b, V] -> int64 keys [b, S] (one per vocabulary chunk)
    that decode_advance (or reference.greedy_tokens) reduces to the argmax token ids."""
    return _impl("greedy_partials", logits.device)(logits)


def pick_decode_backends(*args, **kwargs) -> dict[str, str]:
    """See hybrid/ops/autoselect.py: times triton vs cuda at decode shapes, keeps the faster."""
    from hybrid.ops.autoselect import pick_decode_backends as pick

    return pick(*args, **kwargs)


__all__ = [
    "BACKENDS", "CUDA_OPS", "set_backend", "get_backend", "set_auto_cuda_ops", "auto_cuda_for", "resolve_backend",
    "triton_usable", "cuda_ext_available", "get_impl", "write_kv_cache", "paged_decode_attention",
    "paged_decode_attention_append",
    "prefill_attention", "add_layernorm", "add_rmsnorm", "embed_layernorm", "embed_rmsnorm", "rotary_embedding", "relu",
    "silu_and_mul", "reference", "pick_decode_backends", "decode_prepare", "ban_eos",
    "decode_advance", "greedy_partials",
]
