"""csrc/skinny_gemm.cu (v2) transliterated lane by lane in numpy, no GPU: the CTA's K slice in
64-wide blocks, the cp.async ring (chunk ownership, swizzled 256-byte shared rows, zero-filled x
rows past M, commit groups and wait depth), the ldmatrix lane addresses and the fragments they
deliver, the warp grid, the per-warp partial tiles, the warp sum and the cluster epilogue. Fed with
small integers in float64, so every product and sum is exact and the result must equal
x @ w.T (+ bias, ReLU) bit for bit.

The hardware pieces are modelled from the PTX ISA, independently of the kernel's choices:
- ldmatrix.m8n8.x4: lanes 8j..8j+7 give the row addresses of matrix j (16 bytes each); lane l gets
  in register j the elements (row l/4, cols 2(l%4), 2(l%4)+1) of matrix j.
- mma.m16n8k16 fragment tables (A rows g / g+8, k 2t.. / 2t+8..; B k rows, col g; C rows g / g+8).
- cp.async: a chunk's content is undefined (NaN here) from issue until its group completes;
  cp.async.wait_group N completes all but the newest N committed groups.
So a wrong register order, swizzle, ring depth or stage bound shows up as a wrong result or a NaN.
"""
import numpy as np
import pytest

TILE_N = 64
TILE_K = 64
WARPS = 8
THREADS = WARPS * 32
STAGE_K = 128
CHUNKS = STAGE_K * 2 // 16  # 16-byte chunks per shared row
ROW_BYTES = CHUNKS * 16
RED_LD = TILE_N + 8
SMEM_PER_SM = 228 * 1024


def config(mt):
    """csrc/skinny_gemm.cu Config<MT>."""
    wn = 1 if mt <= 2 else 2
    wk = WARPS // wn
    nt = TILE_N // 8 // wn
    stages = 4 if mt <= 2 else 3
    w_bytes = TILE_N * ROW_BYTES
    x_bytes = mt * 16 * ROW_BYTES
    smem = stages * (w_bytes + x_bytes)
    red = wk * mt * 16 * RED_LD * 4
    return dict(wn=wn, wk=wk, nt=nt, stages=stages, w_bytes=w_bytes, stage_bytes=w_bytes + x_bytes, smem=smem,
                red=red)


def swizzle(row, chunk):
    return row * ROW_BYTES + ((chunk ^ (row & 7)) << 4)


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
    d = a @ b  # a NaN operand (undefined shared memory) poisons the result
    out = [[0.0] * 4 for _ in range(32)]
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        for i in range(4):
            out[lane][i] = c[lane][i] + d[g + (8 if i >= 2 else 0), t * 2 + (i & 1)]
    return out


class Smem:
    """A CTA's shared memory as 16-byte chunks of 8 values, with cp.async commit groups."""

    def __init__(self, nbytes):
        assert nbytes % 16 == 0
        self.chunks = np.full((nbytes // 16, 8), np.nan)
        self.open = []
        self.groups = []

    def cp_async(self, dst, src8):
        assert dst % 16 == 0 and 0 <= dst // 16 < len(self.chunks)
        self.chunks[dst // 16] = np.nan  # undefined until the group completes
        self.open.append((dst // 16, np.array(src8, dtype=float)))

    def commit(self):
        self.groups.append(self.open)
        self.open = []

    def wait_group(self, n):
        while len(self.groups) > n:
            for idx, vals in self.groups.pop(0):
                self.chunks[idx] = vals

    def ldmatrix_x4(self, addrs):
        """addrs[32] byte addresses -> regs[32 lanes][4][2]. Also asserts each matrix's 8 rows hit 8
        different 16-byte bank quads (one conflict-free shared wavefront per matrix)."""
        assert len(addrs) == 32 and all(a % 16 == 0 for a in addrs)
        mats = []
        for j in range(4):
            rows = addrs[8 * j:8 * j + 8]
            assert len({(a // 16) % 8 for a in rows}) == 8, f"bank conflict in matrix {j}: {rows}"
            mats.append([self.chunks[a // 16] for a in rows])
        return [[(mats[j][l // 4][2 * (l % 4)], mats[j][l // 4][2 * (l % 4) + 1]) for j in range(4)]
                for l in range(32)]


def skinny_gemm_model(x, w, bias, relu, k_splits, *, read_swizzled=True, wait_depth=None, b_order=(0, 1, 2, 3)):
    """The kernel for every CTA of the grid (N/64, k_splits). Keyword knobs break one piece on
    purpose (negative controls): read without the swizzle, wait for fewer stages, permute the B
    ldmatrix registers."""
    m, k = x.shape
    n = w.shape[0]
    mt_count = (m + 15) // 16
    cfg = config(mt_count)
    wn_count, wk_count, nt_count, stages = cfg["wn"], cfg["wk"], cfg["nt"], cfg["stages"]
    assert cfg["red"] <= cfg["smem"] and 2 * (cfg["smem"] + 1024) <= SMEM_PER_SM
    assert (STAGE_K // 16) % wk_count == 0 and nt_count % 2 == 0
    wait_n = stages - 2 if wait_depth is None else wait_depth
    xf, wf = x.reshape(-1), w.reshape(-1)
    blocks = k // TILE_K
    y = np.full((m, n), np.nan)
    for tile in range(n // TILE_N):
        n_cta = tile * TILE_N
        reds = []
        for rank in range(k_splits):  # blockIdx.y == cluster rank
            b0, b1 = blocks * rank // k_splits, blocks * (rank + 1) // k_splits
            nstages = (b1 - b0 + 1) // 2
            sm = Smem(cfg["smem"])
            acc = {warp: [[[[0.0] * 4 for _ in range(32)] for _ in range(nt_count)] for _ in range(mt_count)]
                   for warp in range(WARPS)}

            def load_stage(st, parts=("w", "x")):
                ws = (st % stages) * cfg["stage_bytes"]
                xs = ws + cfg["w_bytes"]
                valid = min(CHUNKS, (b1 - b0 - 2 * st) * (CHUNKS // 2))
                seen = set()
                for thread in range(THREADS):
                    for i in range(TILE_N * CHUNKS // THREADS if "w" in parts else 0):
                        idx = thread + i * THREADS
                        row, ch = idx // CHUNKS, idx % CHUNKS
                        if ch < valid:
                            src = (n_cta + row) * k + b0 * TILE_K + st * STAGE_K + ch * 8
                            sm.cp_async(ws + swizzle(row, ch), wf[src:src + 8])
                            seen.add(("w", row, ch))
                    for i in range(mt_count * 16 * CHUNKS // THREADS if "x" in parts else 0):
                        idx = thread + i * THREADS
                        row, ch = idx // CHUNKS, idx % CHUNKS
                        if ch < valid:
                            src = min(row, m - 1) * k + b0 * TILE_K + st * STAGE_K + ch * 8
                            sm.cp_async(xs + swizzle(row, ch), xf[src:src + 8] if row < m else np.zeros(8))
                            seen.add(("x", row, ch))
                want = {("w", r, c) for r in range(TILE_N) for c in range(valid)} if "w" in parts else set()
                want |= {("x", r, c) for r in range(mt_count * 16) for c in range(valid)} if "x" in parts else set()
                assert seen == want, "every chunk of the stage loaded exactly once"

            def compute(st):
                ws = (st % stages) * cfg["stage_bytes"]
                xs = ws + cfg["w_bytes"]
                k16 = min(STAGE_K // 16, (b1 - b0 - 2 * st) * (TILE_K // 16))
                sw = swizzle if read_swizzled else (lambda row, ch: row * ROW_BYTES + ch * 16)
                for warp in range(WARPS):
                    wn, wk = warp % wn_count, warp // wn_count
                    for j in range(STAGE_K // 16 // wk_count):
                        kk = wk + j * wk_count
                        if kk >= k16:
                            continue
                        a = []
                        for mt in range(mt_count):
                            addrs = [xs + sw(mt * 16 + ((l >> 3) & 1) * 8 + (l & 7), kk * 2 + ((l >> 3) >> 1))
                                     for l in range(32)]
                            a.append(sm.ldmatrix_x4(addrs))
                        b = [None] * nt_count
                        for np_ in range(nt_count // 2):
                            addrs = [ws + sw((wn * nt_count + 2 * np_ + ((l >> 3) >> 1)) * 8 + (l & 7),
                                             kk * 2 + ((l >> 3) & 1)) for l in range(32)]
                            regs = sm.ldmatrix_x4(addrs)
                            regs = [[r[o] for o in b_order] for r in regs]
                            b[2 * np_] = [[r[0], r[1]] for r in regs]
                            b[2 * np_ + 1] = [[r[2], r[3]] for r in regs]
                        for mt in range(mt_count):
                            for nt in range(nt_count):
                                acc[warp][mt][nt] = mma_m16n8k16(a[mt], b[nt], acc[warp][mt][nt])

            # prologue as in the kernel: every prologue stage's W first (before griddepcontrol.wait,
            # all landing in group 0), then x stage by stage, one commit per stage
            for s in range(stages - 1):
                if s < nstages:
                    load_stage(s, ("w",))
            for s in range(stages - 1):
                if s < nstages:
                    load_stage(s, ("x",))
                sm.commit()
            for st in range(nstages):
                sm.wait_group(wait_n)
                # __syncthreads: every warp finished compute(st - 1), whose slot is refilled now
                if st + stages - 1 < nstages:
                    assert (st + stages - 1) % stages != st % stages
                    load_stage(st + stages - 1)
                sm.commit()
                compute(st)
            sm.wait_group(0)

            # partial tiles: slab wk, row mt*16 + g (+8), col (wn*NT + nt)*8 + 2t; the ring is reused
            slab = mt_count * 16 * RED_LD
            red = np.full(cfg["red"] // 4, np.nan)
            for warp in range(WARPS):
                wn, wk = warp % wn_count, warp // wn_count
                for mt in range(mt_count):
                    for nt in range(nt_count):
                        for lane in range(32):
                            g, t = lane >> 2, lane & 3
                            at = wk * slab + (mt * 16 + g) * RED_LD + (wn * nt_count + nt) * 8 + 2 * t
                            hi = at + 8 * RED_LD
                            assert np.isnan(red[at:at + 2]).all() and np.isnan(red[hi:hi + 2]).all(), "overlap"
                            red[at:at + 2] = acc[warp][mt][nt][lane][0:2]
                            red[hi:hi + 2] = acc[warp][mt][nt][lane][2:4]
            reds.append(red)

        pairs_per_row = TILE_N // 2
        pairs = m * pairs_per_row

        def offset(i):
            return (i // pairs_per_row) * RED_LD + 2 * (i % pairs_per_row)

        def warp_sum(red, i):
            return sum(red[wk * slab + offset(i):wk * slab + offset(i) + 2] for wk in range(wk_count))

        def store(i, v, thread):
            row, col = i // pairs_per_row, n_cta + 2 * (i % pairs_per_row)
            if bias is not None:  # the pair the thread loaded before the PDL wait: bias[n_cta/2 + thread % 32]
                pre = n_cta + 2 * (thread % pairs_per_row)
                v = v + bias[pre:pre + 2]
            if relu:
                v = np.maximum(v, 0.0)
            assert np.isnan(y[row, col:col + 2]).all(), "stored twice"
            y[row, col:col + 2] = v

        if k_splits > 1:
            summed = []
            for red in reds:  # each thread sums its own pairs in place (slab 0)
                red = red.copy()
                for thread in range(THREADS):
                    for i in range(thread, pairs, THREADS):
                        red[offset(i):offset(i) + 2] = warp_sum(red, i)
                summed.append(red)
            for rank in range(k_splits):  # cluster.sync, then rank r takes every k_splits-th block
                for thread in range(THREADS):
                    for i in range(rank * THREADS + thread, pairs, k_splits * THREADS):
                        store(i, sum(r[offset(i):offset(i) + 2] for r in summed), thread)
        else:
            for thread in range(THREADS):
                for i in range(thread, pairs, THREADS):
                    store(i, warp_sum(reds[0], i), thread)
    return y


def _case(m, n, k, has_bias, relu, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-4, 5, size=(m, k)).astype(np.float64)
    w = rng.integers(-4, 5, size=(n, k)).astype(np.float64)
    bias = rng.integers(-50, 50, size=n).astype(np.float64) if has_bias else None
    ref = x @ w.T + (bias if bias is not None else 0.0)
    if relu:
        ref = np.maximum(ref, 0.0)
    return x, w, bias, ref


@pytest.mark.parametrize("m,n,k,k_splits,has_bias,relu", [
    (1, 64, 64, 1, False, False),      # one half stage
    (3, 128, 384, 2, True, False),     # 3 blocks per split: a full and a half stage
    (16, 64, 1280, 1, True, True),     # 10 stages through a 4-deep ring
    (17, 64, 320, 3, False, True),     # MT=2, uneven splits (1, 2, 2 blocks)
    (33, 64, 768, 2, True, False),     # MT=3: 2 x 4 warps, 3-deep ring
    (64, 128, 576, 1, False, True),    # MT=4, 5 stages (last one half) through 3 slots
    (40, 64, 128, 8, False, False),    # more splits than blocks: empty CTAs still reduce
    (64, 64, 320, 5, True, True),      # MT=4, 5-CTA cluster of one block each
])
def test_v2_model_is_exact(m, n, k, k_splits, has_bias, relu):
    x, w, bias, ref = _case(m, n, k, has_bias, relu, seed=m * 1000 + n + k)
    y = skinny_gemm_model(x, w, bias, relu, k_splits)
    np.testing.assert_array_equal(y, ref)


def test_shared_budget_fits_two_ctas_per_sm():
    for mt in (1, 2, 3, 4):
        cfg = config(mt)
        assert cfg["red"] <= cfg["smem"] <= 96 * 1024, (mt, cfg)
        # W in flight per SM (2 CTAs, stages - 1 ahead): the 32-64 KB target or more
        assert 2 * (cfg["stages"] - 1) * cfg["w_bytes"] >= 64 * 1024


def test_swizzle_is_a_permutation_within_each_row():
    for row in range(64):
        got = sorted(swizzle(row, c) - row * ROW_BYTES for c in range(CHUNKS))
        assert got == [16 * c for c in range(CHUNKS)]


# Negative controls: each breaks one piece of the kernel's math and must be caught.
def test_unswizzled_reads_are_caught():
    x, w, bias, ref = _case(16, 64, 128, False, False, seed=1)
    with pytest.raises(AssertionError, match="bank conflict"):
        skinny_gemm_model(x, w, bias, False, 1, read_swizzled=False)


def test_shallow_wait_is_caught():
    """wait_group(STAGES-1) would compute on a stage still in flight: NaN in the output."""
    x, w, bias, ref = _case(16, 64, 1280, False, False, seed=2)
    y = skinny_gemm_model(x, w, bias, False, 1, wait_depth=config(1)["stages"] - 1)
    assert np.isnan(y).any()


def test_swapped_b_registers_are_caught():
    x, w, bias, ref = _case(8, 64, 256, False, False, seed=3)
    y = skinny_gemm_model(x, w, bias, False, 1, b_order=(0, 2, 1, 3))
    assert not np.array_equal(y, ref)


# ---- csrc/skinny_wgmma.cu: the wgmma operand layout ------------------------------------------
WG_HALF_BYTES = 64 * 128  # 64 rows x 64 k of 2-byte elements


def wg_swizzle(row, chunk):
    """skinny_wgmma.cu wg_swizzle: byte offset of 16-byte chunk `chunk` (0..15) of tile row `row`."""
    return (chunk >> 3) * WG_HALF_BYTES + row * 128 + (((chunk & 7) ^ (row & 7)) << 4)


def wgmma_sw128_address(start, row, k):
    """Where wgmma reads element (row, k) of a K-major operand from a descriptor whose start address
    is `start` (128-byte swizzle, 8-row groups 1024 bytes apart, k < 16 per instruction): the
    unswizzled address start + row * 128 + 2 k, with its 16-byte chunk bits [4, 7) XORed by the
    row-in-atom bits [7, 10) of the address (the PTX ISA's 128B swizzle; atoms 1024-byte aligned)."""
    lin = start + row * 128 + 2 * k
    return lin ^ (((lin >> 7) & 7) << 4)


@pytest.mark.parametrize("ring_base", [0, 1024, 33 * 1024])
def test_wgmma_descriptors_read_what_the_loader_wrote(ring_base):
    """Every (row, k) of a 128-k stage tile, written by the cp.async loader at wg_swizzle, is where
    the kernel's descriptor for its k16 step (half h = k // 64, start = tile + h * 8 KB + 32 * j for
    j = (k % 64) // 16) makes wgmma read it; and the loader's 16-byte chunks of one row never
    collide. Negative control: an unswizzled loader (chunk at row * 128 + 16 c) is read wrong."""
    for row in range(64):
        seen = set()
        for k in range(128):
            chunk = k // 8
            written = ring_base + wg_swizzle(row, chunk) + 2 * (k % 8)
            half, j, kk = k // 64, (k % 64) // 16, k % 16
            start = ring_base + half * WG_HALF_BYTES + 32 * j
            assert wgmma_sw128_address(start, row, kk) == written, (row, k)
            seen.add(written // 16)
        assert len(seen) == 16
    wrong = sum(wgmma_sw128_address(ring_base + 32 * (k // 16), row, k % 16) != ring_base + row * 128 + 2 * k
                for row in range(64) for k in range(64))
    assert wrong > 0
