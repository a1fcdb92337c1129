"""Block tables per sequence on top of the block pool (pure Python, no torch).

Vocabulary (vLLM's): a sequence's `block_table` lists its blocks in token order; token at position
p lives in slot `block_table[p // block_size] * block_size + p % block_size`. The manager tracks,
per sequence, how many token slots are reserved (`num_slots`); the runner writes keys and values
only into reserved slots.

Forks (n answers per prompt) share every block of the parent. A shared block that is only partly
filled is copied lazily, when one of its owners first writes past the shared part (copy-on-write):
`reserve` then returns the (src, dst) block copies the runner must perform before the step.
"""
from __future__ import annotations

from hybrid.kv_cache.block_pool import BlockPool, NoFreeBlocksError

__all__ = ["KVCacheManager", "NoFreeBlocksError"]


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int = 16, watermark: float = 0.01) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.watermark_blocks = int(watermark * num_blocks)
        self.block_tables: dict[int, list[int]] = {}
        self.num_slots: dict[int, int] = {}

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_admit(self, num_tokens: int) -> bool:
        """Room for a new sequence of num_tokens while keeping the watermark reserve free for the
        rows already running."""
        return self.blocks_for(num_tokens) <= self.pool.num_free - self.watermark_blocks

    def blocks_to_reserve(self, seq_id: int, num_tokens: int) -> int:
        """Free blocks `reserve(seq_id, num_tokens)` would take (new blocks plus copy-on-write)."""
        table, old = self.block_tables[seq_id], self.num_slots[seq_id]
        if num_tokens <= old:
            return 0
        need = max(0, self.blocks_for(num_tokens) - len(table))
        if old % self.block_size and self.pool.ref_counts[table[old // self.block_size]] > 1:
            need += 1
        return need

    def can_reserve(self, seq_id: int, num_tokens: int) -> bool:
        return self.blocks_to_reserve(seq_id, num_tokens) <= self.pool.num_free

    def slot(self, seq_id: int, position: int) -> int:
        table = self.block_tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size

    # ---- mutations -----------------------------------------------------------------------
    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Block table for a new sequence with num_tokens reserved slots (ignores the watermark;
        check can_admit first)."""
        if seq_id in self.block_tables:
            raise ValueError(f"sequence {seq_id} already has blocks")
        blocks = self.pool.allocate_n(self.blocks_for(num_tokens))
        self.block_tables[seq_id] = blocks
        self.num_slots[seq_id] = num_tokens
        return blocks

    def reserve(self, seq_id: int, num_tokens: int) -> list[tuple[int, int]]:
        """Grow the sequence's reserved slots to num_tokens. Returns block copies (src, dst) to run
        before the next write, when the first block written to was shared (copy-on-write).
        All-or-nothing: raises NoFreeBlocksError and changes nothing if the pool lacks room."""
        table, old = self.block_tables[seq_id], self.num_slots[seq_id]
        if num_tokens <= old:
            return []
        if self.blocks_to_reserve(seq_id, num_tokens) > self.pool.num_free:
            raise NoFreeBlocksError(f"sequence {seq_id} cannot grow to {num_tokens} tokens")
        copies = []
        if old % self.block_size:
            idx = old // self.block_size
            src = table[idx]
            if self.pool.ref_counts[src] > 1:
                dst = self.pool.allocate()
                self.pool.decref(src)
                table[idx] = dst
                copies.append((src, dst))
        extra = self.blocks_for(num_tokens) - len(table)
        if extra > 0:
            table.extend(self.pool.allocate_n(extra))
        self.num_slots[seq_id] = num_tokens
        return copies

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent (reference counts go up)."""
        if child_id in self.block_tables:
            raise ValueError(f"sequence {child_id} already has blocks")
        table = self.block_tables[parent_id]
        for block in table:
            self.pool.incref(block)
        self.block_tables[child_id] = list(table)
        self.num_slots[child_id] = self.num_slots[parent_id]

    def free(self, seq_id: int) -> None:
        """Drop the sequence's blocks (finished or preempted); no-op if it holds none."""
        table = self.block_tables.pop(seq_id, None)
        self.num_slots.pop(seq_id, None)
        if table is not None:
            self.pool.free_all(table)

    def reset(self) -> None:
        for seq_id in list(self.block_tables):
            self.free(seq_id)

    def check_invariants(self) -> None:
        """Every block's reference count equals the number of tables holding it; no table holds
        a block twice; tables are exactly as long as their reserved slots need."""
        self.pool.check_invariants()
        owners = [0] * self.pool.num_blocks
        for seq_id, table in self.block_tables.items():
            assert len(set(table)) == len(table), f"sequence {seq_id} holds a block twice"
            assert len(table) == self.blocks_for(self.num_slots[seq_id])
            for block in table:
                owners[block] += 1
        assert owners == self.pool.ref_counts, "reference counts disagree with the block tables"
