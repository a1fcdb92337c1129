"""What every inference model shares: attention metadata, the paged attention call, weight buffers.

Inference models hold their weights as plain buffers (no autograd, no Parameters), allocated once
in the inference dtype; `load_weights` fills them in place with copy_ so every later re-sync keeps
the same addresses (CUDA graphs captured against them stay valid).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hybrid import ops


@dataclass
class AttentionMetadata:
    """Per-step metadata, shared by every layer of one forward."""

    is_prefill: bool
    slot_mapping: torch.Tensor
    """[num_tokens] int64: cache slot each token's key/value is written to (-1 skips)."""
    cu_seqlens: torch.Tensor | None = None
    """Prefill: [num_seqs + 1] int32 prefix sums of the packed sequence lengths."""
    max_seqlen: int = 0
    """Prefill: longest packed sequence."""
    prefill_lens: list[int] | None = None
    """Prefill: the sequence lengths on the host (for the per-sequence SDPA path)."""
    block_tables: torch.Tensor | None = None
    """Decode: [batch, max_blocks_per_seq] int32."""
    seq_lens: torch.Tensor | None = None
    """Decode: [batch] int32 tokens each row attends to (0 for padding rows)."""


PREFILL_IMPLS = ("ops", "sdpa", "flash")
_prefill_impl = "ops"


_fuse_kv_write = False
_gemm_kv_write = False


def set_gemm_kv_write(on: bool) -> None:
    """EngineConfig.gemm_kv_write: decode steps of models with a fused qkv projection and no rotary
    (OPT) let the projection store k / v in the paged cache (hybrid.ops.linear.linear_kv) where
    the CUDA skinny GEMM runs it, instead of a separate write_kv_cache launch."""
    global _gemm_kv_write
    _gemm_kv_write = bool(on)


def gemm_kv_write() -> bool:
    return _gemm_kv_write


def set_fuse_kv_write(on: bool) -> None:
    """True: decode steps call ops.paged_decode_attention_append (the cache write fused into the
    attention launch) instead of write_kv_cache + paged_decode_attention (EngineConfig.fuse_kv_write).
    Read at trace time, so CUDA graphs captured before a change keep what they captured."""
    global _fuse_kv_write
    _fuse_kv_write = bool(on)


def set_prefill_impl(name: str) -> None:
    """"ops": hybrid.ops.prefill_attention (Triton varlen kernel); "sdpa": PyTorch SDPA, one call
    per run of equal-length sequences; "flash": torch.nn.attention.varlen.varlen_attn (PyTorch's
    FlashAttention varlen kernel; CUDA only, falls back to "ops" where it is missing)."""
    global _prefill_impl
    if name not in PREFILL_IMPLS:
        raise ValueError(f"prefill attention {name!r}: choose from {PREFILL_IMPLS}")
    _prefill_impl = name


def _sdpa_varlen(q, k, v, lens: list[int], scale: float) -> torch.Tensor:
    """Causal SDPA per run of consecutive sequences of one length, batched: [n, H, L, D]."""
    out = torch.empty_like(q)  # [T, H, D]
    group = q.shape[1] // k.shape[1]
    start, i = 0, 0
    while i < len(lens):
        n, j = lens[i], i
        while j < len(lens) and lens[j] == n:
            j += 1
        rows, end = j - i, start + (j - i) * n

        def part(t):  # [rows * n, h, D] -> [rows, h, n, D]
            return t[start:end].unflatten(0, (rows, n)).transpose(1, 2)
        qs, ks, vs = part(q), part(k), part(v)
        if group > 1:
            ks, vs = ks.repeat_interleave(group, 1), vs.repeat_interleave(group, 1)  # [rows, H, n, D]
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)  # [rows, H, n, D]
        out[start:end] = o.transpose(1, 2).flatten(0, 1)
        start, i = end, j
    return out


def flash_varlen_available(q: torch.Tensor, k: torch.Tensor) -> bool:
    """PyTorch's varlen FlashAttention runs this call: CUDA, 16-bit, and GQA only where the installed
    torch takes enable_gqa."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    fn = _flash_fn()
    return fn is not None and (q.shape[1] == k.shape[1] or "enable_gqa" in fn[1])


_flash: list = []


def _flash_fn():
    if not _flash:
        try:
            import inspect

            from torch.nn.attention.varlen import varlen_attn
            _flash.append((varlen_attn, set(inspect.signature(varlen_attn).parameters)))
        except (ImportError, AttributeError):
            _flash.append(None)
    return _flash[0]


def _flash_varlen(q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float) -> torch.Tensor:
    fn, params = _flash_fn()
    kw = {"scale": scale}
    if "is_causal" in params:  # the first releases' signature
        kw["is_causal"] = True
    else:
        kw["window_size"] = (-1, 0)  # causal
    if q.shape[1] != k.shape[1]:
        kw["enable_gqa"] = True
    return fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kw)


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    key_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    value_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    meta: AttentionMetadata,
    scale: float,
    kv_written: bool = False,
) -> torch.Tensor:  # [T, H, D]
    """Writes this step's keys/values into the paged cache, then attends: a prefill over its own
    packed tokens (causal varlen), a decode step over each row's cached tokens (with
    set_fuse_kv_write(True), both in one launch: one token per row, seq_lens counting it).
    kv_written: the projection already stored k / v in the cache (linear_kv), so no write here."""
    if _fuse_kv_write and not meta.is_prefill and not kv_written:
        return ops.paged_decode_attention_append(q, k, v, key_cache, value_cache, meta.slot_mapping,
                                                 meta.block_tables, meta.seq_lens, scale)
    if not kv_written:
        ops.write_kv_cache(k, v, key_cache, value_cache, meta.slot_mapping)
    if meta.is_prefill:
        if _prefill_impl == "sdpa" and meta.prefill_lens is not None:
            return _sdpa_varlen(q, k, v, meta.prefill_lens, scale)
        if _prefill_impl == "flash" and flash_varlen_available(q, k):
            return _flash_varlen(q, k, v, meta.cu_seqlens, meta.max_seqlen, scale)
        return ops.prefill_attention(q, k, v, meta.cu_seqlens, meta.max_seqlen, scale)
    return ops.paged_decode_attention(q, key_cache, value_cache, meta.block_tables, meta.seq_lens, scale)


LinearReader = Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]
"""module -> (weight [out, in], bias [out] | None, LoRA delta [out, in] | None) of a training-side
linear (or embedding) module, with any ZeRO-3 partitions already gathered."""


@torch.no_grad()
def copy_weight(dst: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor | None = None) -> None:
    """dst <- weight (+ delta), cast to dst's dtype/device, in place."""
    if delta is None:
        dst.copy_(weight, non_blocking=True)
        return
    # sum in fp32 and round once, like a merged-then-cast model
    dst.copy_(weight.to(device=dst.device, dtype=torch.float32, non_blocking=True)
              + delta.to(device=dst.device, dtype=torch.float32, non_blocking=True))


class InferenceModel(nn.Module):
    """Base of the per-family inference models."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.dtype, self.device = dtype, torch.device(device)

    def _buf(self, name: str, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = torch.empty(*shape, dtype=dtype or self.dtype, device=self.device)
        self.register_buffer(name, t, persistent=False)
        return t

    gathered_only: tuple[str, ...] = ()
    """Buffers a decode step only gathers a few rows of (position / untied input embeddings)."""

    def weight_bytes(self) -> int:
        """Bytes a decode step reads for weights: each distinct buffer once, except the tables
        it only gathers rows of."""
        skip = {getattr(self, n).data_ptr() for n in self.gathered_only}
        seen, total = set(skip), 0
        for b in self.buffers():
            if b.data_ptr() not in seen:
                seen.add(b.data_ptr())
                total += b.numel() * b.element_size()
        return total

    def forward(self, input_ids, positions, kv_caches, meta):  # pragma: no cover - abstract
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def load_globals(self, hf_model: nn.Module, read: LinearReader) -> None:  # pragma: no cover
        raise NotImplementedError

    def load_layer(self, i: int, hf_layer: nn.Module, read: LinearReader) -> None:  # pragma: no cover
        raise NotImplementedError
