"""csrc/skinny_gemm.cu (v2: cp.async ring of W + x in shared memory, ldmatrix, mma.sync) on the GPU:
correctness against an fp64 reference (no worse than twice cuBLAS' own error, or 1% of the output
scale) over M in 1, 3, 16, 33, 64 at the OPT-1.3B and LLaMA-7B projection shapes, bias / ReLU, every
cluster K split (incl. half stages and splits with no K at all) and fp16; CUDA-graph capture; the
wrapper refusing unsupported inputs; the auto k_splits rule (which also proves 2 CTAs per SM); the
autotune candidate being offered. Then a timing table (no pass/fail on speed: autotune decides): us
per call of cuBLAS (the engine's own call) and of the kernel with auto / explicit k_splits, CUDA
graphs over >= 8 rotating weight copies of > 2x L2 in total, % of the copy bandwidth that
bench/hardware.py measures (eager copy, read + write bytes) for the weight bytes. Printed and
appended to $OUT/skinny_gemm.jsonl when $OUT is set.

    python3 -m pytest -q -s -m gpu tests/gpu/test_skinny_gemm_gpu.py -p no:cacheprovider
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from bench.hardware import measure_copy_bandwidth
from hybrid.ops import cuda_backend as cb
from hybrid.ops import cuda_skinny as cs
from hybrid.ops import linear as L
from hybrid.ops.testing import check_projection, projection_cases, time_projections

pytestmark = pytest.mark.gpu

S = L.LinearShape
CASES = projection_cases()
SHAPES = {model: {label: shape for mm, label, shape in CASES if mm == model} for model, _, _ in CASES}
DT = torch.bfloat16


@pytest.fixture(scope="module", autouse=True)
def _ext():
    assert cb.available(), cb.load_error()
    yield


def _check(shape, m, dtype=DT, k_splits=0, has_bias=None, act="shape", seed=0):
    check_projection(cs.skinny_gemm, shape, m, dtype, k_splits=k_splits, has_bias=has_bias, act=act, seed=seed)


@pytest.mark.parametrize("m", [1, 3, 16, 33, 64])
@pytest.mark.parametrize("model,label,shape", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_matches_fp64_reference(model, label, shape, m):
    _check(shape, m)


@pytest.mark.parametrize("m", [1, 17, 64])
@pytest.mark.parametrize("k_splits", [1, 2, 3, 4, 5, 8])
def test_every_k_split(k_splits, m):
    _check(S(2048, 8192), m, k_splits=k_splits, has_bias=True, act="relu", seed=k_splits)


@pytest.mark.parametrize("m", [1, 40, 64])
@pytest.mark.parametrize("k_splits", [1, 2, 3, 5, 8])
def test_half_stages_and_empty_splits(k_splits, m):
    """K = 192 is 3 blocks of 64: a full and a half stage, and with 5 or 8 splits CTAs that own no
    K at all and still take part in the cluster reduction. K = 576 walks 5 stages through the ring."""
    _check(S(128, 192), m, k_splits=k_splits, has_bias=True, act="relu", seed=10 + k_splits)
    _check(S(192, 576), m, k_splits=k_splits, has_bias=False, act=None, seed=20 + k_splits)


@pytest.mark.parametrize("m", [2, 40])
def test_fp16_and_bias_relu_combinations(m):
    for has_bias in (False, True):
        for act in (None, "relu"):
            _check(S(1024, 640), m, dtype=torch.float16, has_bias=has_bias, act=act)
            _check(S(1024, 640), m, dtype=torch.bfloat16, has_bias=has_bias, act=act)


def test_cuda_graph_capture_and_replay():
    w = torch.randn(6144, 2048, device="cuda", dtype=DT) * 2048 ** -0.5
    b = torch.randn(6144, device="cuda", dtype=DT)
    x = torch.randn(16, 2048, device="cuda", dtype=DT)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cs.skinny_gemm(x, w, b, True)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = cs.skinny_gemm(x, w, b, True)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        ref = F.linear(x.float(), w.float(), b.float()).relu()
        assert (y.float() - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()


def test_unsupported_inputs_raise_before_the_op():
    w = torch.randn(2048, 2048, device="cuda", dtype=DT)
    for x, why in [(torch.randn(65, 2048, device="cuda", dtype=DT), "M <="),
                   (torch.randn(16, 4096, device="cuda", dtype=DT)[:, ::2], "[M, K]|contiguous"),
                   (torch.randn(16, 2048, device="cuda", dtype=torch.float32), "bfloat16 or float16")]:
        with pytest.raises(RuntimeError, match=why.replace("[", r"\[").replace("]", r"\]")):
            cs.skinny_gemm(x, w)
    unaligned = torch.randn(16 * 2048 + 4, device="cuda", dtype=DT)[4:].view(16, 2048)
    with pytest.raises(RuntimeError, match="aligned"):
        cs.skinny_gemm(unaligned, w)
    # linear's variant sends what the kernel cannot take to cuBLAS instead of raising
    y = L.run_variant("cuda_skinny", unaligned, w, None, None)
    assert torch.allclose(y.float(), F.linear(unaligned, w).float(), atol=1e-2, rtol=1e-2)


def test_auto_k_splits_rule():
    """csrc/ops.cpp skinny_k_splits_for: the most splits s whose N/64 clusters of s CTAs are all
    resident at once (cudaOccupancyMaxActiveClusters) with >= 512 of K per split. v2 is sized for 2
    CTAs per SM at every M (<= 96 KB shared, <= 128 registers), so at most SMs x 2 CTAs; clusters of
    2 and 4 always pack, so OPT qkv / o / fc1 must get exactly that bound (132 SMs: 2 / 4 / 2; fc1's
    2 needs the 2 CTAs per SM). Clusters of 5-8 may pack worse across GPCs: only the bound there."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    got = {}
    for m in (1, 16, 33, 64):
        for n, k in [(6144, 2048), (2048, 2048), (8192, 2048), (2048, 8192), (12288, 4096), (4096, 11008)]:
            tiles = n // 64
            bound = max([1] + [s for s in range(2, 9) if tiles * s <= 2 * sms and k // s >= 512])
            ks = cs.skinny_gemm_k_splits(m, n, k, DT)
            got[(m, n, k)] = ks
            assert 1 <= ks <= bound, (m, n, k, ks, bound)
            if k == 2048:
                assert ks == bound, (m, n, k, ks, bound)
    print(f"\nauto k_splits on {sms} SMs (m, n, k): {got}")


def test_offered_to_autotune(monkeypatch):
    assert cs.skinny_gemm_selfcheck("cuda", DT) is None
    assert cs.skinny_gemm_selfcheck("cuda", torch.float16) is None
    dev = torch.device("cuda")
    monkeypatch.delenv("HYBRID_SKINNY_GEMM", raising=False)
    assert L.skinny_offered(), "offered by default (EngineConfig.skinny_gemm)"
    assert "cuda_skinny_pdl" in L.candidates(S(6144, 2048, True), dev, 16, DT)
    monkeypatch.setenv("HYBRID_SKINNY_GEMM", "0")  # the environment overrides the switch
    assert "cuda_skinny" not in L.candidates(S(6144, 2048, True), dev, 16, DT)
    monkeypatch.setenv("HYBRID_SKINNY_GEMM", "1")
    L.set_skinny_offered(False)
    try:
        assert "cuda_skinny" in L.candidates(S(6144, 2048, True), dev, 16, DT)
        monkeypatch.delenv("HYBRID_SKINNY_GEMM")
        assert "cuda_skinny" not in L.candidates(S(6144, 2048, True), dev, 16, DT)
    finally:
        L.set_skinny_offered(True)
    monkeypatch.setenv("HYBRID_SKINNY_GEMM", "1")
    assert "cuda_skinny" not in L.candidates(S(6144, 2048, True), dev, 128, DT)
    assert "cuda_skinny" not in L.candidates(S(50272, 2048), dev, 16, DT)  # N % 64 != 0
    for m in (1, 16, 64):
        ks = cs.skinny_gemm_k_splits(m, 2048, 2048, DT)
        assert 1 <= ks <= cs.SKINNY_MAX_K_SPLITS


# HYBRID_SKINNY_TIMING_MS="32,33,48,49,64" times other row counts (e.g. to separate the x traffic,
# which grows with the real rows, from the m16-tile count, which steps at 17 / 33 / 49)
TIMING_MS = tuple(int(m) for m in os.environ.get("HYBRID_SKINNY_TIMING_MS", "1,16,32,64").split(","))
SPLITS = (1, 2, 4, 8)


@torch.no_grad()
def test_timing_table_vs_cublas():
    name = torch.cuda.get_device_name()
    # bench/hardware.py's eager-copy probe (4.25 TB/s on an H200); linear.copy_bandwidth's
    # graph-captured copy read 2.7 TB/s on the same card, which made every % here 1.6x too high.
    bw = measure_copy_bandwidth(torch.device("cuda"))

    def variants(x, shape):
        relu = shape.act == "relu"
        fns = {"cublas": lambda w, b: L._cublas(x, w, b, shape.act),
               "skinny": lambda w, b: cs.skinny_gemm(x, w, b, relu),
               "skinny_pdl": lambda w, b: cs.skinny_gemm(x, w, b, relu, pdl=True)}
        for s in SPLITS:
            fns[f"ks{s}"] = lambda w, b, s=s: cs.skinny_gemm(x, w, b, relu, k_splits=s)
        return fns

    rows = time_projections(CASES, TIMING_MS, variants, DT)
    for r in rows:
        us, wbytes = r["us"], r["weight_bytes"]
        r.update(bench="skinny_gemm", device=name, pct_copy_bw={v: round(100 * wbytes / (t * 1e-6) / bw, 1)
                                                                for v, t in us.items()},
                 auto_k_splits=cs.skinny_gemm_k_splits(r["m"], r["n"], r["k"], DT),
                 speedup_vs_cublas=round(us["cublas"] / us["skinny"], 3),
                 speedup_pdl_vs_cublas=round(us["cublas"] / us["skinny_pdl"], 3),
                 copy_bandwidth_tb_s=round(bw / 1e12, 3), kernel="v2", floor_us=round(wbytes / bw * 1e6, 3))

    cols = ["cublas", "skinny", "skinny_pdl", *[f"ks{s}" for s in SPLITS]]
    print(f"\nskinny_gemm vs cuBLAS on {name}, bf16, copy bandwidth {bw / 1e12:.2f} TB/s (us per call in CUDA "
          "graphs over rotating weights; % = weight bytes / time / copy bandwidth; ks = explicit k_splits)")
    print(f"{'model':<10}{'proj':<8}{'N x K':>13}{'M':>4}{'floor':>7}" + "".join(f"{c:>9}" for c in cols)
          + f"{'auto':>5}{'%bw cub':>8}{'%bw sk':>7}{'x cub':>7}")
    for r in rows:
        print(f"{r['model']:<10}{r['proj']:<8}{r['n']:>7}x{r['k']:<5}{r['m']:>4}{r['floor_us']:>7.2f}"
              + "".join(f"{r['us'][c]:>9.2f}" for c in cols)
              + f"{r['auto_k_splits']:>5}{r['pct_copy_bw']['cublas']:>7.0f}%{r['pct_copy_bw']['skinny']:>6.0f}%"
              f"{r['speedup_vs_cublas']:>7.2f}")
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "skinny_gemm.jsonl"), "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, sort_keys=True) + "\n")
    assert len(rows) == len(CASES) * len(TIMING_MS)


@pytest.mark.parametrize("m", [1, 17, 64])
def test_pdl_launch_equals_plain_launch(m):
    """Programmatic dependent launch changes when the W prologue starts, never the result; a chain
    of PDL launches where each reads the previous output (inside a CUDA graph too) stays exact."""
    shape = SHAPES["opt-1.3b"]["o"]
    g = torch.Generator(device="cuda").manual_seed(m)
    ws = [torch.randn(shape.n, shape.k, device="cuda", dtype=DT, generator=g) * shape.k ** -0.5 for _ in range(4)]
    x = torch.randn(m, shape.k, device="cuda", dtype=DT, generator=g)

    def chain(pdl):
        h = x
        for w in ws:  # each GEMM's x is the previous GEMM's output: the wait must hold
            h = cs.skinny_gemm(h, w, None, True, pdl=pdl)
        return h

    want = chain(False)
    assert torch.equal(chain(True), want)
    static = torch.empty_like(want)
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        chain(True)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        static.copy_(chain(True))
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, want)


@torch.no_grad()
def test_layer_chain_timing():
    """The decode layer's four GEMMs back to back over 24 layers of distinct OPT-1.3B weights, one
    CUDA graph: cuBLAS vs skinny vs skinny with programmatic dependent launch (its W prologue
    overlapping the previous GEMM's tail). us per layer; printed and written to $OUT."""
    name = torch.cuda.get_device_name()
    shapes = list(SHAPES["opt-1.3b"].values())
    layers = 24
    ws = [[torch.empty(sh.n, sh.k, device="cuda", dtype=DT).normal_(0, sh.k ** -0.5) for sh in shapes]
          for _ in range(layers)]
    bs = [[torch.empty(sh.n, device="cuda", dtype=DT).normal_() for sh in shapes] for _ in range(layers)]
    floor_us = sum(sh.n * sh.k * 2 for sh in shapes) / measure_copy_bandwidth(torch.device("cuda")) * 1e6
    rows = []
    for m in (1, 16, 32, 64):
        xs = [torch.randn(m, sh.k, device="cuda", dtype=DT) for sh in shapes]
        variants = {"cublas": lambda x, w, b, sh: L._cublas(x, w, b, sh.act),
                    "skinny": lambda x, w, b, sh: cs.skinny_gemm(x, w, b, sh.act == "relu"),
                    "skinny_pdl": lambda x, w, b, sh: cs.skinny_gemm(x, w, b, sh.act == "relu", pdl=True)}
        us = {}
        for v, fn in variants.items():
            calls = [lambda x=x, w=w, b=b, sh=sh, fn=fn: fn(x, w, b, sh)
                     for lw, lb in zip(ws, bs) for x, w, b, sh in zip(xs, lw, lb, shapes)]
            us[v] = L.graph_us(calls, reps=1) * len(shapes)  # per layer
        rows.append(dict(bench="skinny_layer_chain", model="opt-1.3b", device=name, m=m, layers=layers,
                         us_per_layer={v: round(t, 2) for v, t in us.items()}, floor_us_per_layer=round(floor_us, 2),
                         git_commit=os.environ.get("HYBRID_RLHF_GIT_COMMIT", "")))
        print(f"layer chain M={m}: " + "  ".join(f"{v} {t:.1f} us" for v, t in us.items())
              + f"  (weight floor {floor_us:.1f} us per layer)")
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "skinny_gemm.jsonl"), "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, sort_keys=True) + "\n")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k_splits,pdl", [(1, 0, False), (5, 1, True), (16, 0, True), (33, 3, False), (64, 0, True)])
def test_kv_cache_write_in_the_epilogue(m, k_splits, pdl, dtype):
    """skinny_gemm(kv=...): the output is bit-equal to the plain call, and columns [h, 2h) / [2h, 3h)
    land in the key / value caches at each row's slot exactly as write_kv_cache stores them; rows
    with slot -1 (graph padding) and every other slot stay untouched."""
    from hybrid import ops

    g = torch.Generator(device="cuda").manual_seed(m)
    heads, d, h = 8, 64, 512
    x = torch.randn(m, h, device="cuda", dtype=dtype, generator=g)
    w = torch.randn(3 * h, h, device="cuda", dtype=dtype, generator=g) * h ** -0.5
    b = torch.randn(3 * h, device="cuda", dtype=dtype, generator=g)
    blocks, bs = 40, 16
    kc = torch.full((blocks, bs, heads, d), float("nan"), device="cuda", dtype=dtype)
    vc = torch.full_like(kc, float("nan"))
    perm = torch.randperm(blocks * bs, device="cuda", generator=g)[:m]
    slots = perm.to(torch.int64)
    slots[::3] = -1  # padding rows
    y = cs.skinny_gemm(x, w, b, k_splits=k_splits, pdl=pdl, kv=(kc, vc, slots, h))
    assert torch.equal(y, cs.skinny_gemm(x, w, b, k_splits=k_splits, pdl=pdl))
    kr = torch.full_like(kc, float("nan"))
    vr = torch.full_like(vc, float("nan"))
    ops.write_kv_cache(y[:, h:2 * h].view(m, heads, d), y[:, 2 * h:].view(m, heads, d), kr, vr, slots)
    assert torch.equal(kc.nan_to_num(7.0), kr.nan_to_num(7.0)) and torch.equal(vc.nan_to_num(7.0), vr.nan_to_num(7.0))
    assert int((~kc.isnan()).sum()) == int((slots >= 0).sum()) * heads * d


def test_kv_cache_write_rejects_bad_inputs_before_the_op():
    x = torch.randn(4, 512, device="cuda", dtype=DT)
    w = torch.randn(1536, 512, device="cuda", dtype=DT)
    kc = torch.zeros(8, 16, 8, 64, device="cuda", dtype=DT)
    slots = torch.zeros(4, device="cuda", dtype=torch.int64)
    for kv, msg in (((kc, kc, slots, 1024 + 2), "within N"), ((kc, kc, slots.int(), 512), "int64"),
                    ((kc, kc.float(), slots, 512), "dtype"), ((kc, kc[:4], slots, 512), "equal shapes")):
        with pytest.raises(RuntimeError, match=msg):
            cs.skinny_gemm(x, w, kv=kv)


@pytest.mark.parametrize("variant", ["cuda_skinny", "cuda_skinny_pdl"])
def test_engine_gemm_kv_write_equals_separate_write(variant, monkeypatch):
    """OPT (bf16) with the qkv projection forced onto the skinny GEMM: greedy tokens with the k / v
    cache write in the GEMM's epilogue equal those with the separate write_kv_cache launch, in CUDA
    graphs, and the separate write is really skipped."""
    from tests.gpu.test_engine_gpu import batch, engine, tiny

    import hybrid.engine
    from hybrid.config import SamplingParams
    from hybrid.models import base

    monkeypatch.delenv("HYBRID_GEMM_KV_WRITE", raising=False)
    monkeypatch.setattr(hybrid.engine.linear_ops, "autotune_linears", lambda *a, **k: [])  # keep the forced table
    model = tiny("opt").to(torch.bfloat16)
    ids, mask = batch(model, [37, 5, 19, 64, 2, 23, 150, 90], seed=3)
    outs, writes = {}, {}
    real = base.ops.write_kv_cache
    for on in (False, True):
        eng = engine(dtype="bfloat16", max_num_seqs=8, gemm_kv_write=on, decode_steps_per_sync=11)
        eng.load_weights(model)
        L.clear_choices()
        for shape in eng.model.linear_shapes():
            for m in eng.runner.buckets:
                L.set_choice(shape, torch.bfloat16, m, variant)
        calls = []
        monkeypatch.setattr(base.ops, "write_kv_cache", lambda *a, **k: calls.append(1) or real(*a, **k))
        outs[on] = eng.generate(ids, mask, SamplingParams(max_new_tokens=30))
        writes[on] = len(calls)
        assert eng.stats.capture_s > 0
        del eng
    L.clear_choices()
    assert torch.equal(outs[True], outs[False])
    assert writes[True] < writes[False]  # prefill still writes; the decode steps did not
