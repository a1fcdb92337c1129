"""Fixed pool of KV-cache block ids with reference counts (pure Python, no torch).

A block holds `block_size` tokens' keys and values for every layer; the pool only hands out ids.
Reference counts let several sequences (the n answers sampled from one prompt) share the prompt's
blocks: a block returns to the free list when its last owner lets it go.
"""
from __future__ import annotations

from collections import deque


class NoFreeBlocksError(RuntimeError):
    """Raised when an allocation asks for more blocks than the pool has free."""


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts: list[int] = [0] * num_blocks
        # FIFO free list: recently freed blocks are reused last, which keeps the tables of
        # long-lived sequences spread over the pool (no effect on speed, helps debugging).
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self) -> int:
        """One free block with reference count 1."""
        if not self._free:
            raise NoFreeBlocksError(f"all {self.num_blocks} KV-cache blocks are in use")
        block = self._free.popleft()
        self.ref_counts[block] = 1
        return block

    def allocate_n(self, n: int) -> list[int]:
        """n free blocks at once, or none (raises) if fewer than n are free."""
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        return [self.allocate() for _ in range(n)]

    def incref(self, block: int) -> None:
        """One more owner of an allocated block (fork)."""
        if self.ref_counts[block] <= 0:
            raise ValueError(f"incref of free block {block}")
        self.ref_counts[block] += 1

    def decref(self, block: int) -> bool:
        """One owner lets the block go; returns True when that freed it."""
        if self.ref_counts[block] <= 0:
            raise ValueError(f"double free of block {block}")
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self._free.append(block)
            return True
        return False

    def free_all(self, blocks: list[int]) -> None:
        for block in blocks:
            self.decref(block)

    def check_invariants(self) -> None:
        """Asserts that free ids are unique, exactly the zero-refcount blocks, and that
        free + used == total. Used by the property tests and debug runs."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        zero = {b for b, r in enumerate(self.ref_counts) if r == 0}
        assert free == zero, "free list and zero reference counts disagree"
        assert all(r >= 0 for r in self.ref_counts), "negative reference count"
        assert self.num_free + self.num_used == self.num_blocks
