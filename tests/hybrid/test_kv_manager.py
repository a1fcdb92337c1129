"""KV-cache manager: random allocate / reserve / fork / free sequences keep block tables, reference
counts and copy-on-write consistent. A fake storage (slot -> tag of who wrote it) checks that every
sequence reads back exactly its own tokens after any sharing and copying."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid.kv_cache.manager import KVCacheManager, NoFreeBlocksError

ops = st.lists(
    st.tuples(st.sampled_from(["new", "grow", "fork", "free"]), st.integers(0, 10**6),
              st.integers(0, 40)),
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(num_blocks=st.integers(1, 30), block_size=st.sampled_from([1, 2, 4, 16]),
       watermark=st.sampled_from([0.0, 0.1]), ops=ops)
def test_random_ops_keep_tables_and_contents_consistent(num_blocks, block_size, watermark, ops):
    mgr = KVCacheManager(num_blocks, block_size, watermark)
    storage: dict[int, tuple] = {}  # slot -> (writer seq, position, token tag)
    expected: dict[int, list] = {}  # seq -> tag at each written position
    next_id = 0

    def write(seq, start, stop):
        for pos in range(start, stop):
            tag = (seq, pos)
            storage[mgr.slot(seq, pos)] = tag
            expected[seq].append(tag)

    def apply_copies(copies):
        for src, dst in copies:
            for off in range(block_size):
                if src * block_size + off in storage:
                    storage[dst * block_size + off] = storage[src * block_size + off]

    for op, r, n in ops:
        live = sorted(mgr.block_tables)
        if op == "new":
            if mgr.blocks_for(n) > mgr.num_free_blocks:
                with pytest.raises(NoFreeBlocksError):
                    mgr.allocate(next_id, n)
            else:
                admit = mgr.can_admit(n)
                assert admit == (mgr.blocks_for(n) <= mgr.num_free_blocks - mgr.watermark_blocks)
                mgr.allocate(next_id, n)
                expected[next_id] = []
                write(next_id, 0, n)
            next_id += 1
        elif op == "grow" and live:
            seq = live[r % len(live)]
            old, new = mgr.num_slots[seq], mgr.num_slots[seq] + n
            free_before, need = mgr.num_free_blocks, mgr.blocks_to_reserve(seq, new)
            if need > free_before:
                with pytest.raises(NoFreeBlocksError):
                    mgr.reserve(seq, new)
                assert mgr.num_free_blocks == free_before
            else:
                copies = mgr.reserve(seq, new)
                assert mgr.num_free_blocks == free_before - need
                apply_copies(copies)
                write(seq, old, new)
        elif op == "fork" and live:
            parent = live[r % len(live)]
            mgr.fork(parent, next_id)
            expected[next_id] = list(expected[parent])
            next_id += 1
        elif op == "free" and live:
            seq = live[r % len(live)]
            mgr.free(seq)
            del expected[seq]
        mgr.check_invariants()
        for seq, tags in expected.items():
            assert len(tags) == mgr.num_slots[seq]
            got = [storage.get(mgr.slot(seq, p)) for p in range(len(tags))]
            assert got == tags, f"sequence {seq} reads back someone else's keys/values"
    for seq in list(mgr.block_tables):
        mgr.free(seq)
    mgr.check_invariants()
    assert mgr.num_free_blocks == num_blocks


def test_fork_shares_full_blocks_and_copies_partial_block_on_write():
    mgr = KVCacheManager(num_blocks=10, block_size=4)
    mgr.allocate(0, 10)  # 3 blocks, last one half full
    mgr.fork(0, 1)
    mgr.fork(0, 2)
    assert mgr.num_free_blocks == 7, "forks must not take blocks"
    shared_tail = mgr.block_tables[0][2]
    copies = mgr.reserve(1, 11)
    assert copies == [(shared_tail, mgr.block_tables[1][2])]
    assert mgr.block_tables[1][:2] == mgr.block_tables[0][:2]
    assert mgr.reserve(2, 12) != []  # tail still shared with seq 0
    assert mgr.reserve(0, 11) == [], "last owner writes in place"
    assert mgr.pool.ref_counts[shared_tail] == 1
    mgr.check_invariants()
