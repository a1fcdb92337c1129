"""The KV-cache pool tensors: one allocation for all layers, sized from a memory budget.

Layout per layer: key_cache / value_cache [num_blocks, block_size, num_kv_heads, head_size]
(vLLM's flash layout; a slot's heads are one contiguous run, which the write kernel relies on).
"""
from __future__ import annotations

import logging

import torch

from hybrid.config import CacheConfig

log = logging.getLogger(__name__)


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_size: int,
                    dtype: torch.dtype) -> int:
    """Bytes one block takes over all layers, keys and values."""
    return 2 * num_layers * block_size * num_kv_heads * head_size * torch.empty((), dtype=dtype).element_size()


def num_blocks_for_budget(cache: CacheConfig, block_bytes: int, device: torch.device,
                          reserve_bytes: int = 0) -> int:
    """Pool size in blocks: CacheConfig.num_blocks if set, else what fits under
    gpu_memory_utilization * total device memory once everything already in use (this process's
    weights and caches, other processes) and `reserve_bytes` (activations) are counted."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError("on CPU, set CacheConfig.num_blocks (no device memory to size the pool from)")
    free, total = torch.cuda.mem_get_info(device)
    budget = cache.gpu_memory_utilization * total - (total - free) - reserve_bytes
    return max(0, int(budget // block_bytes))


class KVCacheStorage:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_size: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.block_bytes = bytes_per_block(num_layers, block_size, num_kv_heads, head_size, dtype)
        # zeros, not empty: the torch reference attention multiplies masked (zero-probability)
        # slots too, and 0 * NaN from uninitialised memory would poison it
        self.kv = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_size,
                              dtype=dtype, device=device)  # [L, 2, N, bs, Hkv, D]
        self.kv_caches = [(self.kv[i, 0], self.kv[i, 1]) for i in range(num_layers)]
        log.info("KV pool: %d blocks x %d tokens, %.2f GiB", num_blocks, block_size,
                 self.nbytes / 2**30)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: block dst <- block src in every layer, keys and values."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.kv.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.kv.device)
        self.kv[:, :, dst] = self.kv[:, :, src]
