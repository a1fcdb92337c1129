"""Block pool: random allocate / incref / decref sequences never leak or double-own a block."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid.kv_cache.block_pool import BlockPool, NoFreeBlocksError

ops = st.lists(
    st.tuples(st.sampled_from(["alloc", "alloc_n", "incref", "decref"]), st.integers(0, 10**6)),
    max_size=200,
)


@settings(max_examples=150, deadline=None)
@given(num_blocks=st.integers(1, 24), ops=ops)
def test_random_ops_keep_pool_consistent(num_blocks, ops):
    pool = BlockPool(num_blocks)
    owners: dict[int, int] = {}  # model: block -> reference count
    for op, r in ops:
        held = sorted(owners)
        if op == "alloc":
            if len(owners) == num_blocks:
                with pytest.raises(NoFreeBlocksError):
                    pool.allocate()
            else:
                b = pool.allocate()
                assert b not in owners, "handed out a block that is in use"
                owners[b] = 1
        elif op == "alloc_n":
            n = r % 5
            if n > num_blocks - len(owners):
                before = pool.num_free
                with pytest.raises(NoFreeBlocksError):
                    pool.allocate_n(n)
                assert pool.num_free == before, "failed allocate_n must take nothing"
            else:
                blocks = pool.allocate_n(n)
                assert len(set(blocks)) == n and not set(blocks) & set(owners)
                owners.update({b: 1 for b in blocks})
        elif op == "incref" and held:
            b = held[r % len(held)]
            pool.incref(b)
            owners[b] += 1
        elif op == "decref" and held:
            b = held[r % len(held)]
            freed = pool.decref(b)
            owners[b] -= 1
            assert freed == (owners[b] == 0)
            if owners[b] == 0:
                del owners[b]
        pool.check_invariants()
        assert pool.num_used == len(owners)
        assert pool.num_free + pool.num_used == num_blocks
        assert all(pool.ref_counts[b] == c for b, c in owners.items())


def test_double_free_and_incref_of_free_block_raise():
    pool = BlockPool(3)
    b = pool.allocate()
    assert pool.decref(b)
    with pytest.raises(ValueError):
        pool.decref(b)
    with pytest.raises(ValueError):
        pool.incref(b)
    pool.check_invariants()
    assert pool.num_free == 3
