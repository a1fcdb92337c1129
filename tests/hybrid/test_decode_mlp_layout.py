"""csrc/decode_mlp.cu's bookkeeping transliterated in Python, no GPU: the grid barrier's 64-bit
counter arithmetic (barrier_arrive / barrier_wait) over any arrival order and any mix of grid sizes
across launches, and the work partition (phase-1 column tiles, phase-2 tile-major (tile, K slice)
units with uneven slices, the persistent loop u = blockIdx.x, += gridDim.x) covering every
weight block exactly once. The kernel itself runs in tests/gpu/test_decode_mlp_gpu.py."""
import random

import pytest

TILE = 64  # kMlpTile
MASK64 = (1 << 64) - 1


def barrier_arrive(counter: int, cta: int, ctas: int) -> tuple[int, int]:
    """(new counter, target) exactly as barrier_arrive: atom.add.u64 returns the old value."""
    add = (1 << 32) - (ctas - 1) if cta == 0 else 1
    old = counter
    return (old + add) & MASK64, (((old >> 32) + 1) << 32) & MASK64


def passed(counter: int, target: int) -> bool:
    """barrier_wait's test: static_cast<long long>(v - target) >= 0."""
    d = (counter - target) & MASK64
    return d < (1 << 63)


@pytest.mark.parametrize("seed", range(20))
def test_barrier_counter_any_order_any_grid_sizes(seed):
    rng = random.Random(seed)
    counter = 0
    for instance in range(12):  # launches of different grids share the counter, never reset
        ctas = rng.choice([1, 2, 3, 7, 64, 128, 132, 264])
        order = list(range(ctas))
        rng.shuffle(order)
        targets = []
        for i, cta in enumerate(order):
            counter, target = barrier_arrive(counter, cta, ctas)
            targets.append(target)
            if i < ctas - 1:  # nobody may pass before the last arrival
                assert not any(passed(counter, t) for t in targets), (instance, ctas, i)
        assert len(set(targets)) == 1, "every CTA of one instance waits for the same value"
        assert passed(counter, targets[0]) and counter == targets[0] == (instance + 1) << 32


def test_barrier_counter_wraps_safely():
    """Near 2^64 the signed-difference test still orders the instances correctly."""
    counter = MASK64 + 1 - (2 << 32)  # two instances before the wrap
    for _ in range(4):
        targets = []
        for cta in (3, 0, 2, 1):
            counter, t = barrier_arrive(counter, cta, 4)
            targets.append(t)
        assert len(set(targets)) == 1 and passed(counter, targets[0])
        assert counter == targets[0]


def partition(hidden: int, ffn: int, k_splits: int, grid: int):
    """Per CTA, its phase-1 column tiles and phase-2 (tile, split, kb0, kb1) units (decode_mlp_kernel)."""
    units1, tiles2, blocks2 = ffn // TILE, hidden // TILE, ffn // TILE
    units2 = tiles2 * k_splits
    kb0 = lambda s: blocks2 * s // k_splits  # noqa: E731 - the kernel's kb0_of
    out = []
    for first in range(grid):
        p1 = list(range(first, units1, grid))
        p2 = [(u // k_splits, u % k_splits, kb0(u % k_splits), kb0(u % k_splits + 1))
              for u in range(first, units2, grid)]
        out.append((p1, p2))
    return out


@pytest.mark.parametrize("hidden,ffn,k_splits,grid", [
    (2048, 8192, 4, 128),   # OPT-1.3B on an H200: one unit per CTA in both phases
    (1024, 4096, 8, 128),   # OPT-350m: 64 phase-1 tiles, 128 phase-2 units
    (4096, 16384, 2, 132),  # OPT-6.7B: 256 phase-1 tiles over 132 CTAs (loops)
    (192, 704, 3, 11),      # the self-check shape: 11 blocks in 3 uneven slices
    (192, 704, 5, 4),       # fewer CTAs than units in both phases
])
def test_every_weight_block_once(hidden, ffn, k_splits, grid):
    parts = partition(hidden, ffn, k_splits, grid)
    tiles1 = sorted(t for p1, _ in parts for t in p1)
    assert tiles1 == list(range(ffn // TILE)), "fc1: every 64-column tile exactly once"
    blocks = sorted((tile, kb) for _, p2 in parts for tile, _, a, b in p2 for kb in range(a, b))
    want = [(t, kb) for t in range(hidden // TILE) for kb in range(ffn // TILE)]
    assert blocks == want, "fc2: every (column tile, 64-wide K block) exactly once"
    for _, p2 in parts:
        for tile, s, a, b in p2:
            assert b - a >= 1, "no empty slice (k_splits <= ffn / 64)"
    # slices of one split have one K range whatever the tile: the partial part[s] is one K slice
    ranges = {}
    for _, p2 in parts:
        for tile, s, a, b in p2:
            assert ranges.setdefault(s, (a, b)) == (a, b)
    # tile-major: CTAs next to each other share a tile (read whole w2 rows together)
    if grid >= k_splits:
        firsts = [p2[0] for _, p2 in parts if p2]
        for i in range(0, min(len(firsts), 4 * k_splits), k_splits):
            assert len({u[0] for u in firsts[i:i + k_splits]}) == 1


class Ring:
    """The cp.async ring of one thread as decode_mlp_core.cuh's Unit drives it: commit groups, wait_group
    semantics (all but the newest N groups complete), slot contents, and every hazard the kernel must
    avoid: computing a stage whose W or x has not landed, or refilling a slot whose stage some warp
    may still read (a refill at iteration st happens after that iteration's __syncthreads, i.e. after
    every warp's compute(st - 1))."""

    def __init__(self, stages: int, wait_depth: int | None = None):
        self.S = stages
        self.wait_depth = stages - 2 if wait_depth is None else wait_depth
        self.groups: list[list[tuple]] = []  # committed groups: lists of (kind, stage)
        self.open: list[tuple] = []  # issued, not yet committed
        self.done: set[tuple] = set()
        self.slot: dict[int, int] = {}  # slot -> stage whose data it holds
        self.computed: set[int] = set()

    def issue(self, kind: str, st: int, synchronous: bool = False):
        k = st % self.S
        held = self.slot.get(k)
        if held is not None and held != st:
            assert held in self.computed, f"{kind}({st}) overwrites slot {k} holding unread stage {held}"
        self.slot[k] = st
        if synchronous:
            self.done.add((kind, st))
        else:
            self.open.append((kind, st))

    def commit(self):
        self.groups.append(self.open)
        self.open = []

    def wait(self, n: int):
        for g in self.groups[:max(0, len(self.groups) - n)]:
            self.done.update(g)

    def compute(self, st: int):
        assert ("w", st) in self.done, f"compute({st}) before W({st}) landed"
        assert ("x", st) in self.done, f"compute({st}) before x({st}) landed"
        assert self.slot[st % self.S] == st
        self.computed.add(st)

    # --- Unit's methods, transliterated
    def prologue_w(self, ns: int, frm: int = 0, to: int | None = None):
        to = self.S - 1 if to is None else to
        for s in range(self.S - 1):
            if frm <= s < to:
                if s < ns:
                    self.issue("w", s)
                self.commit()

    def prologue_x(self, ns: int):
        for s in range(self.S - 1):
            if s >= ns:
                break
            self.issue("x", s, synchronous=True)  # ld.cg + st.shared, visible after the next sync

    def run(self, ns: int):
        for st in range(ns):
            self.wait(self.wait_depth)
            if st + self.S - 1 < ns:
                self.issue("w", st + self.S - 1)
                self.issue("x", st + self.S - 1)
            self.commit()
            self.compute(st)
        self.wait(0)

    def new_unit(self):
        self.done.clear()
        self.slot.clear()
        self.computed.clear()


@pytest.mark.parametrize("stages", [4, 5, 6, 8])
def test_ring_pipeline_has_no_hazards(stages):
    for ns in range(1, 3 * stages + 2):
        for pre in (0, 1, stages - 1):
            r = Ring(stages)
            r.prologue_w(ns)  # phase-1 unit: W before griddepcontrol.wait
            r.prologue_x(ns)
            r.run(ns)
            r.new_unit()  # phase-2 unit: part of W before the barrier, the rest after it
            r.prologue_w(ns, 0, pre)
            r.prologue_w(ns, pre, stages - 1)
            r.prologue_x(ns)
            r.run(ns)
            assert len(r.computed) == ns


def test_ring_negative_control_one_stage_too_shallow():
    """Waiting one group less (wait_group<STAGES-1>) computes a stage before its W lands."""
    r = Ring(6, wait_depth=5)
    r.prologue_w(12)
    r.prologue_x(12)
    with pytest.raises(AssertionError, match="before W"):
        r.run(12)


def test_ring_negative_control_refill_one_stage_too_far():
    """Refilling stage st + STAGES (not st + STAGES - 1) overwrites a slot no warp has read yet."""
    class TooFar(Ring):
        def run(self, ns):
            for st in range(ns):
                self.wait(self.wait_depth)
                if st + self.S < ns:
                    self.issue("w", st + self.S)
                self.commit()
                self.compute(st)

    r = TooFar(6)
    r.prologue_w(12)
    r.prologue_x(12)
    with pytest.raises(AssertionError, match="overwrites slot"):
        r.run(12)


# ---- the flow schedule (DecodeMlpParams.flow): unit queue, slice counters, exit reset --------------
def flow_kb0(ffn: int, k_splits: int, s: int) -> int:
    return (ffn // TILE) * s // k_splits


def flow_cta(cta: int, grid: int, hidden: int, ffn: int, k_splits: int, mem: dict, log: list,
             need_extra: int = 0, reset_first_out: bool = False, norm_rows: int = 0, publish_per_unit: bool = False):
    """One CTA of the flow loop as a generator: every yield is one step another CTA may interleave
    with (an atomic, a poll, a store). mem holds the counters and the act tiles written. norm_rows:
    phase 3 of flow_norm for that many rows (the last min(rows, grid) CTAs out take them)."""
    units1, tiles2 = ffn // TILE, hidden // TILE
    total = units1 + tiles2 * k_splits
    fc2_units = 0

    def slice_of_block(j):
        s = 0
        while s + 1 < k_splits and j >= flow_kb0(ffn, k_splits, s + 1):
            s += 1
        return s

    u = cta  # static first unit
    while u < total:
        nxt = grid + mem["queue"]  # atomicAdd(queue, 1)
        mem["queue"] += 1
        yield
        if u >= units1:
            s = (u - units1) // tiles2
            need = flow_kb0(ffn, k_splits, s + 1) - flow_kb0(ffn, k_splits, s) + need_extra
            while mem["ready"][s] < need:  # count_wait
                yield "wait"
            a, b = flow_kb0(ffn, k_splits, s), flow_kb0(ffn, k_splits, s + 1)
            missing = [j for j in range(a, b) if j not in mem["act"]]
            log.append(("fc2", u, tuple(missing)))
            yield
            mem["part"].add(u)  # store_part
            fc2_units += 1
            if publish_per_unit:  # negative control: counted before the CTA's later units exist
                mem["stored2"] += fc2_units
                fc2_units = 0
        else:
            yield
            mem["act"].add(u)  # store_act, then the release
            log.append(("fc1", u, ()))
            yield
            mem["ready"][slice_of_block(u)] += 1
        yield
        u = nxt
    if norm_rows:
        mem["stored2"] += fc2_units  # count_release(stored2, fc2_units)
        yield
        ticket = mem["tickets"]  # count_leave(tickets)
        mem["tickets"] += 1
        yield
        workers = min(norm_rows, grid)
        w = ticket - (grid - workers)
        if w >= 0:
            while mem["stored2"] < tiles2 * k_splits:  # count_wait(stored2, units2)
                yield "wait"
            for row in range(w, norm_rows, workers):
                missing = [v for v in range(units1, total) if v not in mem["part"]]
                log.append(("norm", row, tuple(missing)))
                yield
    old = mem["left"]  # count_leave
    mem["left"] += 1
    yield
    if old == grid - 1 or (reset_first_out and old == 0):
        mem["queue"] = 0
        mem["ready"] = [0] * k_splits
        mem["stored2"] = mem["tickets"] = 0
        mem["left"] = 0


def run_flow(grid, hidden, ffn, k_splits, rng, mem=None, **kw):
    mem = mem or {"queue": 0, "left": 0, "ready": [0] * k_splits, "stored2": 0, "tickets": 0}
    mem["act"], mem["part"] = set(), set()
    log = []
    ctas = {c: flow_cta(c, grid, hidden, ffn, k_splits, mem, log, **kw) for c in range(grid)}
    idle = 0
    while ctas:
        c = rng.choice(sorted(ctas))
        try:
            r = next(ctas[c])
            idle = idle + 1 if r == "wait" else 0
        except StopIteration:
            del ctas[c]
            idle = 0
        if idle > 5000:
            return mem, log, "deadlock"
    return mem, log, None


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("hidden,ffn,k_splits,grid", [
    (2048, 8192, 8, 132),  # OPT-1.3B, 8 slices, one CTA per SM: 128 fc1 tiles + 256 fc2 units
    (2048, 8192, 4, 128),  # OPT-1.3B as launched: grid = the larger phase (128 + 128 units)
    (1024, 4096, 4, 132),  # OPT-350m
    (192, 704, 3, 11),     # the self-check shape
    (192, 704, 5, 3),      # far fewer CTAs than units
    (128, 128, 1, 2),      # more CTAs than fc1 tiles
])
def test_flow_schedule_every_unit_once_in_order_and_counters_left_zero(seed, hidden, ffn, k_splits, grid):
    rng = random.Random(seed)
    mem = None
    for launch in range(3):  # the counters carry over between launches
        mem, log, err = run_flow(grid, hidden, ffn, k_splits, rng, mem)
        assert err is None
        units1, total = ffn // TILE, ffn // TILE + hidden // TILE * k_splits
        assert sorted(u for _, u, _ in log) == list(range(total)), "every unit exactly once"
        assert all(not missing for kind, _, missing in log if kind == "fc2"), "fc2 read a missing act tile"
        assert mem["queue"] == 0 and mem["left"] == 0 and mem["ready"] == [0] * k_splits


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("hidden,ffn,k_splits,grid,rows", [
    (2048, 8192, 4, 128, 16),  # OPT-1.3B, 16 rows: the last 16 CTAs out take one row each
    (2048, 8192, 4, 128, 64),
    (192, 704, 3, 11, 33),     # more rows than CTAs: workers take several
    (192, 704, 5, 3, 1),
])
def test_flow_norm_rows_once_after_every_partial_and_counters_left_zero(seed, hidden, ffn, k_splits, grid, rows):
    rng = random.Random(seed)
    mem = None
    for launch in range(3):
        mem, log, err = run_flow(grid, hidden, ffn, k_splits, rng, mem, norm_rows=rows)
        assert err is None
        normed = [r for kind, r, _ in log if kind == "norm"]
        assert sorted(normed) == list(range(rows)), "every row exactly once"
        assert all(not missing for kind, _, missing in log if kind == "norm"), "a row read a missing partial"
        assert mem["stored2"] == mem["tickets"] == mem["left"] == mem["queue"] == 0


def test_flow_norm_per_unit_publishing_and_an_off_by_one_count():
    # publishing each partial as it is stored reaches the same count: still correct (the kernel
    # publishes once at exit only so the release never waits for an in-flight prefetch)
    rng = random.Random(3)
    mem, log, err = run_flow(11, 192, 704, 3, rng, norm_rows=8, publish_per_unit=True)
    assert err is None and all(not m for kind, _, m in log if kind == "norm")
    # a row count past what the workers wait for: a worker that waited for one partial fewer reads a
    # missing one under some interleaving
    bad = False
    for seed in range(40):
        rng = random.Random(seed)
        mem = {"queue": 0, "left": 0, "ready": [0] * 3, "stored2": 1, "tickets": 0}  # one count too many
        _, log, err = run_flow(11, 192, 704, 3, rng, mem, norm_rows=8)
        bad |= any(m for kind, _, m in log if kind == "norm")
    assert bad


def test_flow_negative_controls():
    rng = random.Random(1)
    # a slice count one too high never completes: the model sees the hang the kernel's trap ends
    assert run_flow(8, 192, 704, 3, rng, need_extra=1)[2] == "deadlock"
    # zeroing at the first CTA out instead of the last leaves counts behind, so a later launch
    # lets an fc2 unit read act tiles its fc1 CTAs have not written
    bad = False
    for seed in range(30):
        rng = random.Random(seed)
        mem = None
        for _ in range(3):
            mem, log, err = run_flow(6, 192, 704, 3, rng, mem, reset_first_out=True)
            bad |= err is not None or any(m for kind, _, m in log if kind == "fc2")
    assert bad


# ---- the cluster schedule (csrc/decode_mlp_cluster.cu), its index math in numpy

def swizzle(row: int, chunk: int) -> int:
    """tc_pipeline.cuh swizzle: byte offset of 16-byte chunk `chunk` of shared row `row`."""
    return row * 256 + ((chunk ^ (row & 7)) << 4)


def cluster_model(x, w1, b1, w2, cl):
    """Every CTA of the cluster schedule as the kernel indexes it: fc1 tile u, the act chunks pushed
    to every peer's act area (block r / 2, chunk (r % 2) * 8 + ach, swizzled), then fc2 stages
    j = 0.. of column tile r + cl * (j // sk), K block j % sk of slice c, x read back from the area
    with compute()'s chunk math (kk * 2 + half). Returns the partials [ffn / (64 cl), M, hidden]."""
    import numpy as np

    m, hidden = x.shape
    ffn = w1.shape[0]
    rows = 16 if m <= 16 else 32  # 16 * MT
    grid, sk, n2 = ffn // TILE, cl // 2, hidden // TILE // cl
    areas = [np.zeros((sk * rows * 256 // 2,)) for _ in range(grid)]  # in elements (2 bytes)
    for u in range(grid):  # fc1 + the pushes
        r, c = u % cl, u // cl
        act = np.maximum(x @ w1[u * TILE:(u + 1) * TILE].T + b1[u * TILE:(u + 1) * TILE], 0)
        for row in range(rows):
            for ach in range(TILE // 8):
                vals = act[row, ach * 8:(ach + 1) * 8] if row < m else np.zeros(8)
                off = (r // 2) * rows * 256 + swizzle(row, (r % 2) * 8 + ach)
                for q in range(cl):
                    areas[c * cl + q][off // 2:off // 2 + 8] = vals
    parts = np.zeros((grid // cl, m, hidden))
    for u in range(grid):
        r, c = u % cl, u // cl
        acc = np.zeros((rows, TILE))
        for j in range(n2 * sk):
            t, blk = r + cl * (j // sk), j % sk
            k0 = c * cl * TILE + blk * 128  # load_w: the slice's start + (j % sk) stage rows
            w = w2[t * TILE:(t + 1) * TILE, k0:k0 + 128]
            xs = np.zeros((rows, 128))
            for row in range(rows):
                for kk in range(8):
                    for half in range(2):
                        off = blk * rows * 256 + swizzle(row, kk * 2 + half)
                        xs[row, kk * 16 + half * 8:kk * 16 + half * 8 + 8] = areas[u][off // 2:off // 2 + 8]
            acc += xs @ w.T
            if j % sk == sk - 1:
                parts[c, :, t * TILE:(t + 1) * TILE] = acc[:m]
                acc = np.zeros((rows, TILE))
    return parts


@pytest.mark.parametrize("m,hidden,ffn,cl", [(3, 256, 512, 2), (16, 256, 1024, 4), (17, 512, 1024, 8),
                                             (5, 1024, 2048, 16)])
def test_cluster_schedule_index_math_gives_the_k_slice_partials(m, hidden, ffn, cl):
    import numpy as np

    rng = np.random.default_rng(0)
    x, w1, b1 = rng.normal(size=(m, hidden)), rng.normal(size=(ffn, hidden)), rng.normal(size=ffn)
    w2 = rng.normal(size=(hidden, ffn))
    parts = cluster_model(x, w1, b1, w2, cl)
    act = np.maximum(x @ w1.T + b1, 0)
    width = cl * TILE
    want = np.stack([act[:, s * width:(s + 1) * width] @ w2[:, s * width:(s + 1) * width].T
                     for s in range(ffn // width)])
    assert parts.shape == want.shape
    assert np.allclose(parts, want, atol=1e-9 * np.abs(want).max())
    assert np.allclose(parts.sum(0), act @ w2.T)
