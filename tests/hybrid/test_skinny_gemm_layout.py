"""csrc/skinny_gemm.cu's index math, transliterated lane by lane in numpy (no GPU): the permuted-k
A/B fragments, the warp / CTA / cluster split of K, the clamped x rows past M, the accumulator ->
shared partial tile mapping and the cluster epilogue. Fed with small integers in float64, so every
product and sum is exact and the result must equal x @ w.T (+ bias, ReLU) bit for bit.

The mma itself is modelled from the PTX ISA's m16n8k16 fragment tables (independent of the kernel's
permutation), so a wrong register order in the kernel shows up here as a wrong result.
"""
import numpy as np
import pytest

TILE_N = 64
WARPS = 8
LOADS_IN_FLIGHT = 16


def mma_m16n8k16(a_regs, b_regs, c):
    """PTX mma.m16n8k16.row.col: a_regs [32 lanes][4 regs][2], b_regs [32][2][2], c [32][4].

    ISA tables: groupID g = lane >> 2, t = lane % 4. A: a0..a7 = regs (0: a0 a1, 1: a2 a3,
    2: a4 a5, 3: a6 a7); row g for a0,a1,a4,a5 and g+8 for a2,a3,a6,a7; col t*2 + (i & 1), + 8 for
    i >= 4. B: b0..b3 (reg 0: b0 b1, reg 1: b2 b3); row (k) t*2 + (i & 1), + 8 for i >= 2; col g.
    C/D: c0..c3; row g (i < 2) or g+8; col t*2 + (i & 1)."""
    a = np.full((16, 16), np.nan)
    b = np.full((16, 8), np.nan)
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        for i in range(8):
            row = g + (8 if i in (2, 3, 6, 7) else 0)
            col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
            a[row, col] = a_regs[lane][i // 2][i % 2]
        for i in range(4):
            b[t * 2 + (i & 1) + (8 if i >= 2 else 0), g] = b_regs[lane][i // 2][i % 2]
    assert not np.isnan(a).any() and not np.isnan(b).any(), "a fragment slot was never written"
    d = a @ b
    out = [[0.0] * 4 for _ in range(32)]
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        for i in range(4):
            out[lane][i] = c[lane][i] + d[g + (8 if i >= 2 else 0), t * 2 + (i & 1)]
    return out


def pairs(v8):
    """A 16-byte load of 8 values as the kernel's uint4: .x .y .z .w = value pairs."""
    return [(v8[0], v8[1]), (v8[2], v8[3]), (v8[4], v8[5]), (v8[6], v8[7])]


def skinny_gemm_model(x, w, bias, relu, k_splits):
    """The kernel, lane by lane, for every CTA of the grid (N/64, k_splits)."""
    m, k = x.shape
    n = w.shape[0]
    mt_count = (m + 15) // 16
    nt_count = 2 if mt_count <= 2 else 4
    wn_count = TILE_N // (8 * nt_count)
    wk_count = WARPS // wn_count
    unroll = LOADS_IN_FLIGHT // nt_count
    ld = TILE_N + 4
    steps = k // 32
    slices = k_splits * wk_count
    xf, wf = x.reshape(-1), w.reshape(-1)
    y = np.zeros((m, n))
    for tile in range(n // TILE_N):
        n_cta = tile * TILE_N
        parts = []
        for rank in range(k_splits):  # blockIdx.y == cluster rank
            part = np.full(mt_count * 16 * ld, np.nan)
            accs = {}
            for warp in range(WARPS):
                wn, wk = warp % wn_count, warp // wn_count
                slice_ = rank * wk_count + wk
                s0, s1 = steps * slice_ // slices, steps * (slice_ + 1) // slices
                acc = [[[[0.0] * 4 for _ in range(32)] for _ in range(nt_count)] for _ in range(mt_count)]

                def compute(wv, s):
                    kb = s * 32
                    for mt in range(mt_count):
                        xa, xb = [], []
                        for lane in range(32):
                            q, r = lane & 3, lane >> 2
                            o0 = min(mt * 16 + r, m - 1) * k + q * 8 + kb
                            o1 = min(mt * 16 + r + 8, m - 1) * k + q * 8 + kb
                            xa.append(pairs(xf[o0:o0 + 8]))
                            xb.append(pairs(xf[o1:o1 + 8]))
                        for nt in range(nt_count):
                            a1 = [[xa[l][0], xb[l][0], xa[l][1], xb[l][1]] for l in range(32)]
                            b1 = [[wv[nt][l][0], wv[nt][l][1]] for l in range(32)]
                            acc[mt][nt] = mma_m16n8k16(a1, b1, acc[mt][nt])
                            a2 = [[xa[l][2], xb[l][2], xa[l][3], xb[l][3]] for l in range(32)]
                            b2 = [[wv[nt][l][2], wv[nt][l][3]] for l in range(32)]
                            acc[mt][nt] = mma_m16n8k16(a2, b2, acc[mt][nt])

                def load_w(s):
                    out = []
                    for nt in range(nt_count):
                        lanes = []
                        for lane in range(32):
                            q, r = lane & 3, lane >> 2
                            off = (n_cta + wn * nt_count * 8 + r) * k + q * 8 + nt * 8 * k + s * 32
                            lanes.append(pairs(wf[off:off + 8]))
                        out.append(lanes)
                    return out

                s = s0
                while s + unroll <= s1:
                    wv = [load_w(s + u) for u in range(unroll)]
                    for u in range(unroll):
                        compute(wv[u], s + u)
                    s += unroll
                while s < s1:
                    compute(load_w(s), s)
                    s += 1
                accs[warp] = (wn, wk, acc)

            def at(wn, mt, nt, half, lane):
                q, r = lane & 3, lane >> 2
                return (mt * 16 + r + 8 * half) * ld + wn * nt_count * 8 + nt * 8 + 2 * q

            for j in range(wk_count):  # wk 0 stores, then the other K warps add in turn
                for wn, wk, acc in accs.values():
                    if wk != j:
                        continue
                    for mt in range(mt_count):
                        for nt in range(nt_count):
                            for lane in range(32):
                                for half in (0, 1):
                                    o = at(wn, mt, nt, half, lane)
                                    vals = acc[mt][nt][lane][2 * half:2 * half + 2]
                                    if j == 0:
                                        part[o:o + 2] = vals
                                    else:
                                        part[o:o + 2] += vals
            parts.append(part)
        written = set()
        for rank in range(k_splits):  # cluster epilogue: rank takes every k_splits-th thread block
            for thread in range(256):
                i = rank * 256 + thread
                while i < m * (TILE_N // 2):
                    row, cp = i // (TILE_N // 2), i % (TILE_N // 2)
                    off = row * ld + 2 * cp
                    v = sum(p[off:off + 2] for p in parts)
                    col = n_cta + 2 * cp
                    if bias is not None:
                        v = v + bias[col:col + 2]
                    if relu:
                        v = np.maximum(v, 0.0)
                    assert not np.isnan(v).any(), f"unwritten partial at row {row} col {col}"
                    assert (row, col) not in written
                    written.add((row, col))
                    y[row, col:col + 2] = v
                    i += k_splits * 256
        assert len(written) == m * TILE_N // 2
    return y


@pytest.mark.parametrize("m,n,k,k_splits,has_bias,relu", [
    (1, 64, 64, 1, False, False),
    (3, 128, 128, 2, True, False),
    (16, 64, 192, 1, True, True),
    (17, 64, 128, 3, False, True),   # MT=2, uneven K slices (4 steps over 6 warp slices)
    (33, 64, 256, 2, True, False),   # MT=3 -> NT=4 warp tiles, 2 x 4 warps
    (64, 128, 64, 1, False, True),   # MT=4, fewer k32 steps than K warps
    (40, 64, 1024, 1, False, False),  # unrolled blocks of U=4 plus a tail
])
def test_fragment_model_is_exact(m, n, k, k_splits, has_bias, relu):
    rng = np.random.default_rng(m * 1000 + n + k)
    x = rng.integers(-4, 5, size=(m, k)).astype(np.float64)
    w = rng.integers(-4, 5, size=(n, k)).astype(np.float64)
    bias = rng.integers(-50, 50, size=n).astype(np.float64) if has_bias else None
    ref = x @ w.T + (bias if bias is not None else 0.0)
    if relu:
        ref = np.maximum(ref, 0.0)
    y = skinny_gemm_model(x, w, bias, relu, k_splits)
    np.testing.assert_array_equal(y, ref)


def test_unpermuted_fragments_would_be_wrong():
    """The permutation matters: reading x at the mma's own (unpermuted) k slots instead of the W
    load's physical offsets gives a wrong product, so the model above is really checking it."""
    rng = np.random.default_rng(0)
    x = rng.integers(-4, 5, size=(16, 32)).astype(np.float64)
    w = rng.integers(-4, 5, size=(8, 32)).astype(np.float64)
    acc = [[0.0] * 4 for _ in range(32)]
    for mma_i in range(2):
        a_regs, b_regs = [], []
        for lane in range(32):
            q, r = lane & 3, lane >> 2
            wv = pairs(w[r, q * 8:q * 8 + 8])
            b_regs.append([wv[2 * mma_i], wv[2 * mma_i + 1]])
            ks = [mma_i * 16 + q * 2, mma_i * 16 + q * 2 + 8]  # ISA slots, no permutation
            a_regs.append([tuple(x[r, ks[0]:ks[0] + 2]), tuple(x[r + 8, ks[0]:ks[0] + 2]),
                           tuple(x[r, ks[1]:ks[1] + 2]), tuple(x[r + 8, ks[1]:ks[1] + 2])])
        acc = mma_m16n8k16(a_regs, b_regs, acc)
    y = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        y[g, 2 * t:2 * t + 2] = acc[lane][0:2]
        y[g + 8, 2 * t:2 * t + 2] = acc[lane][2:4]
    assert not np.array_equal(y, x @ w.T)
