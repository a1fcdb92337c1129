"""The stream-K skinny GEMM's partition and split-tile sums (csrc/skinny_streamk.{h,cu}), modelled on
integers and in numpy, no GPU: every unit belongs to exactly one CTA and cta_of finds it; the
workspace slots and the per-CTA bias stage hold what the kernel puts there (the header's bounds);
and the flush logic (whole tiles stored by their CTA, split tiles summed by whichever contributor
arrives last, in contributor order) gives the product, the same bits for every arrival order."""
import random

import numpy as np
import pytest

from hybrid.ops import cuda_streamk as sk

T = sk.TILE


def _shapes(count, seed):
    rnd = random.Random(seed)
    out = [(6144, 2048, 132), (2048, 8192, 132), (2048, 2048, 132), (8192, 2048, 132), (12288, 4096, 132),
           (4096, 11008, 132), (512, 704, 1), (512, 704, 88), (1024, 8192, 199)]
    while len(out) < count:
        n, k = T * rnd.randint(1, 200), T * rnd.randint(1, 200)
        out.append((n, k, rnd.randint(1, 300)))
    return out


@pytest.mark.parametrize("n,k,ctas", _shapes(60, 0))
def test_partition_covers_every_unit_once_and_cta_of_finds_it(n, k, ctas):
    units = (n // T) * (k // T)
    g = min(ctas, units)
    owner = [None] * units
    for c in range(g):
        u0, u1 = sk.unit_range(c, units, g)
        assert u1 - u0 in (units // g, units // g + 1)
        for u in range(u0, u1):
            assert owner[u] is None
            owner[u] = c
    assert all(o is not None for o in owner)
    for u in range(units):
        assert sk.cta_of(u, units, g) == owner[u]


@pytest.mark.parametrize("n,k,ctas", _shapes(60, 1))
def test_slots_and_bias_stage_bounds_hold(n, k, ctas):
    """Every split tile's contributor slot (c - first CTA of the tile) fits max_contrib slots, and no
    CTA touches more tiles than max_tiles_per_cta (the launcher refuses grids past the bias stage)."""
    kb, units = k // T, (n // T) * (k // T)
    g = min(ctas, units)
    slots = sk.max_contrib(n, k, g)
    for t in range(n // T):
        first, last = sk.cta_of(t * kb, units, g), sk.cta_of(t * kb + kb - 1, units, g)
        assert last - first + 1 <= slots
    for c in range(g):
        u0, u1 = sk.unit_range(c, units, g)
        assert (u1 - 1) // kb - u0 // kb + 1 <= sk.max_tiles_per_cta(n, k, g)


def _run(x, w, ctas, order_seed):
    """The kernel's flush logic in numpy (float32 accumulators and sums), arrivals in a random order."""
    m, k = x.shape
    n = w.shape[0]
    kb, units = k // T, (n // T) * (k // T)
    g = min(ctas, units)
    parts, y, counters = {}, np.full((m, n), np.nan, np.float32), np.zeros(n // T, np.int64)
    events = []  # (cta, tile, accumulator) in each CTA's own order
    for c in range(g):
        u0, u1 = sk.unit_range(c, units, g)
        acc = np.zeros((m, T), np.float32)
        for u in range(u0, u1):
            t, b = divmod(u, kb)
            acc += x[:, b * T:(b + 1) * T] @ w[t * T:(t + 1) * T, b * T:(b + 1) * T].T
            if b == kb - 1 or u == u1 - 1:
                events.append((c, t, acc))
                acc = np.zeros((m, T), np.float32)
    random.Random(order_seed).shuffle(events)
    for c, t, acc in events:
        first, last = t * kb, t * kb + kb - 1
        u0, u1 = sk.unit_range(c, units, g)
        if first >= u0 and last < u1:
            y[:, t * T:(t + 1) * T] = acc
            continue
        c_first = sk.cta_of(first, units, g)
        nc, slot = sk.cta_of(last, units, g) - c_first + 1, c - c_first
        assert 0 <= slot < sk.max_contrib(n, k, g)
        parts[(t, slot)] = acc
        counters[t] += 1
        if counters[t] == nc:  # the last arriver: sum in contributor order
            counters[t] = 0
            total = np.zeros((m, T), np.float32)
            for s in range(nc):
                total += acc if s == slot else parts[(t, s)]
            y[:, t * T:(t + 1) * T] = total
    assert not counters.any()
    return y


@pytest.mark.parametrize("n,k,ctas", [(512, 704, 1), (512, 704, 7), (512, 704, 88), (1024, 2048, 13),
                                      (1024, 2048, 132), (384, 4096, 50)])
def test_split_tile_sums_give_the_product_in_any_arrival_order(n, k, ctas):
    rng = np.random.default_rng(n + k + ctas)
    x = rng.standard_normal((5, k)).astype(np.float32)
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    first = _run(x, w, ctas, 0)
    np.testing.assert_allclose(first, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-4)
    for seed in (1, 2, 3):
        assert np.array_equal(_run(x, w, ctas, seed), first)
