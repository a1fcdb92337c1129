"""hybrid.ops.linear on the GPU: autotune at OPT-1.3B and LLaMA-7B projection shapes (bf16) for decode
buckets M in 16..256. Checks: every variant matches F.linear within bf16 tolerance and none copies
the weight (autotune rejects such variants; here none may be rejected), and the chosen variant,
re-timed independently on fresh weight copies, is never more than 3% slower than cuBLAS. Prints the
table (us per variant, chosen, % of the measured copy bandwidth for the weight bytes) and appends
one JSON row per (shape, M) to $OUT/linear_autotune.jsonl when $OUT is set. Also: the engine with a
forced split-K / cuBLASLt table decodes inside CUDA graphs exactly like HF (tiny fp32 models), and
the engine's own autotune fills the table for its shapes and buckets.

    python3 -m pytest -q -s -m gpu tests/gpu/test_linear_gpu.py -p no:cacheprovider
"""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from hybrid.config import SamplingParams
from hybrid.ops import linear as L

pytestmark = pytest.mark.gpu

S = L.LinearShape
SHAPES = {
    "opt-1.3b": {"qkv": S(6144, 2048, True), "o": S(2048, 2048, True), "fc1": S(8192, 2048, True, "relu"),
                 "fc2": S(2048, 8192, True), "lm_head": S(50272, 2048)},
    "llama-7b": {"qkv": S(12288, 4096), "o": S(4096, 4096), "gate_up": S(22016, 4096), "down": S(4096, 11008),
                 "lm_head": S(32000, 4096)},
}
MS = (16, 32, 64, 128, 256)
DT = torch.bfloat16


@pytest.fixture(autouse=True)
def _clean_table():
    L.clear_choices()
    L.set_enabled(True)
    yield
    L.clear_choices()
    L.set_enabled(True)


def _weights(shape: L.LinearShape, copies: int):
    ws = [torch.empty(shape.n, shape.k, device="cuda", dtype=DT).normal_(0, shape.k ** -0.5) for _ in range(copies)]
    bs = [torch.empty(shape.n, device="cuda", dtype=DT).normal_() if shape.has_bias else None for _ in range(copies)]
    return ws, bs


def _bf16_error_ok(shape, m, variants):
    """Each variant vs an fp64 reference: no worse than twice cuBLAS' own error (bf16 output
    rounding dominates both) or 1% of the output scale."""
    ws, bs = _weights(shape, 1)
    x = torch.randn(m, shape.k, device="cuda", dtype=DT)
    ref = F.linear(x.double(), ws[0].double(), None if bs[0] is None else bs[0].double())
    if shape.act == "relu":
        ref = ref.relu()
    scale = ref.abs().max().item()
    errs = {v: (L.run_variant(v, x, ws[0], bs[0], shape.act).double() - ref).abs().max().item() for v in variants}
    bad = {v: e for v, e in errs.items() if e > max(2 * errs["cublas"], 1e-2 * scale)}
    return bad, errs


@pytest.mark.parametrize("model", list(SHAPES))
def test_autotune_real_shapes(model):
    from bench.hardware import measure_copy_bandwidth

    bw = measure_copy_bandwidth("cuda")
    name = torch.cuda.get_device_name()
    shapes = SHAPES[model]
    timings = L.autotune_linears(shapes.values(), MS, "cuda", DT)
    assert len(timings) == len(shapes) * len(MS)
    by_key = {(t.n, t.k, t.m): t for t in timings}
    l2 = torch.cuda.get_device_properties(0).L2_cache_size or (50 << 20)

    failures, rows = [], []
    for label, shape in shapes.items():
        copies = max(8, min(L.MAX_COPIES, math.ceil(2 * l2 / (shape.n * shape.k * 2))))
        ws, bs = _weights(shape, copies)  # fresh copies: an independent re-measurement
        for m in MS:
            t = by_key[(shape.n, shape.k, m)]
            assert L.choice(m, shape.n, shape.k, DT, shape.has_bias, shape.act) == t.chosen
            if t.rejected:
                failures.append(f"{label} M={m}: rejected {t.rejected}")
            bad, errs = _bf16_error_ok(shape, m, list(t.us))
            if bad:
                failures.append(f"{label} M={m}: error vs fp64 {bad} (cublas {errs['cublas']:.3g})")
            x = torch.randn(m, shape.k, device="cuda", dtype=DT)
            recheck = {}
            for v in dict.fromkeys(["cublas", t.chosen]):
                recheck[v] = L.graph_us([lambda w=w, b=b, v=v: L.run_variant(v, x, w, b, shape.act)
                                         for w, b in zip(ws, bs)])
            if recheck[t.chosen] > 1.03 * recheck["cublas"]:
                failures.append(f"{label} M={m}: chosen {t.chosen} {recheck[t.chosen]:.2f} us vs cublas "
                                f"{recheck['cublas']:.2f} us on re-timing")
            pct = {v: round(100 * t.weight_bytes / (us * 1e-6) / bw, 1) for v, us in t.us.items()}
            rows.append(dict(bench="linear_autotune", model=model, proj=label, device=name, m=m, n=shape.n,
                             k=shape.k, has_bias=shape.has_bias, act=shape.act, us=t.us, chosen=t.chosen,
                             pct_copy_bw=pct, recheck_us={v: round(u, 3) for v, u in recheck.items()},
                             speedup_vs_cublas=round(t.us["cublas"] / t.us[t.chosen], 3),
                             weight_bytes=t.weight_bytes, copies=t.copies, copy_bandwidth_tb_s=bw / 1e12,
                             max_abs_err=errs))
        del ws, bs
        torch.cuda.empty_cache()

    variants = sorted({v for r in rows for v in r["us"]}, key=lambda v: (v != "cublas", v != "lt", v))
    print(f"\n{model} linear autotune on {name}, bf16, copy bandwidth {bw / 1e12:.2f} TB/s (us per call; "
          "% = weight bytes / time / copy bandwidth)")
    print(f"{'proj':<8}{'N x K':>13}{'M':>5} " + "".join(f"{v:>10}" for v in variants) + f"  {'chosen':<9}{'%bw':>5}"
          f"{'x cublas':>9}")
    for r in rows:
        cells = "".join(f"{r['us'][v]:>10.2f}" if v in r["us"] else f"{'-':>10}" for v in variants)
        print(f"{r['proj']:<8}{r['n']:>7}x{r['k']:<5}{r['m']:>5} {cells}  {r['chosen']:<9}"
              f"{r['pct_copy_bw'][r['chosen']]:>4.0f}%{r['speedup_vs_cublas']:>8.2f}x")
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "linear_autotune.jsonl"), "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, sort_keys=True) + "\n")
    assert not failures, "\n".join(failures)


def test_splitk_does_not_copy_the_weight():
    """The strided-batched GEMM takes the weight view in place: nothing weight-sized is allocated."""
    w = torch.randn(6144, 2048, device="cuda", dtype=DT)
    x = torch.randn(16, 2048, device="cuda", dtype=DT)
    for s in L.SPLITS:
        L.run_variant(f"splitk{s}", x, w, None, None)  # warm-up (workspace, Triton compile)
        extra = L.allocated_during(lambda: L.run_variant(f"splitk{s}", x, w, None, None), w.device)
        assert extra < w.numel() * w.element_size() // 4, (s, extra)


@pytest.mark.parametrize("variant", ["splitk2", "lt"])
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_engine_graphs_with_forced_variant_equal_hf(family, variant, monkeypatch):
    from tests.gpu.test_engine_gpu import batch, engine, hf_greedy, tiny

    import hybrid.engine

    monkeypatch.setattr(hybrid.engine.linear_ops, "autotune_linears", lambda *a, **k: [])  # keep the forced table
    model = tiny(family)
    ids, mask = batch(model, [37, 5, 19, 64, 2, 23])
    eng = engine(max_num_seqs=8)
    eng.load_weights(model)
    for shape in eng.model.linear_shapes():
        for m in eng.runner.buckets:
            L.set_choice(shape, torch.float32, m, variant)
    calls = []
    real = L.run_variant
    monkeypatch.setattr(L, "run_variant", lambda v, *a: calls.append(v) or real(v, *a))
    out = eng.generate(ids, mask, SamplingParams(max_new_tokens=40))
    assert torch.equal(out, hf_greedy(model, ids, mask, 40))
    assert eng.stats.capture_s > 0 and calls.count(variant) > 0


def test_engine_autotune_fills_table_for_its_buckets():
    from tests.gpu.test_engine_gpu import batch, engine, tiny

    model = tiny("opt").to(torch.bfloat16)
    eng = engine(dtype="bfloat16", max_num_seqs=32)
    eng.load_weights(model)
    ids, mask = batch(model, [9, 4])
    eng.generate(ids, mask, SamplingParams(max_new_tokens=4))
    dev = torch.cuda.get_device_name()
    for shape in eng.model.linear_shapes():
        key = (shape.n, shape.k, torch.bfloat16, shape.has_bias, shape.act)
        for m in eng.runner.buckets:
            t = L._timings[(dev, key, m)]
            assert L.choice(m, *key) == t.chosen and "cublas" in t.us


@pytest.mark.parametrize("proj", ["qkv", "fc1", "lm_head"])
@pytest.mark.parametrize("m", [1, 16, 64])
def test_lt_candidates_match_cublas_eager_and_in_graphs(proj, m):
    """Every cuBLASLt heuristic candidate ("lt{i}") the autotune is offered: the bf16 error bound of
    _bf16_error_ok, and a CUDA-graph replay over new inputs equal to eager calls."""
    from hybrid.ops import cublaslt

    assert cublaslt.available()
    shape = SHAPES["opt-1.3b"][proj]
    before = L.lt_offered()
    L.set_lt_offered(True)  # off by default (EngineConfig.cublaslt_gemm)
    try:
        lts = [v for v in L.candidates(shape, torch.device("cuda"), m, DT) if L._lt_index(v) is not None]
    finally:
        L.set_lt_offered(before)
    assert lts, "cuBLASLt offered no candidates"
    bad, errs = _bf16_error_ok(shape, m, ["cublas", *lts])
    assert not bad, (bad, errs)
    ws, bs = _weights(shape, 1)
    x = torch.randn(m, shape.k, device="cuda", dtype=DT)
    for v in lts:
        eager = L.run_variant(v, x, ws[0], bs[0], shape.act)
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            L.run_variant(v, x, ws[0], bs[0], shape.act)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            y = L.run_variant(v, x, ws[0], bs[0], shape.act)
        x2 = torch.randn_like(x)
        x.copy_(x2)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, L.run_variant(v, x, ws[0], bs[0], shape.act)), v
        assert not torch.equal(y, eager), v  # the replay read the new input


def test_lt_falls_back_for_rows_and_operands_it_was_not_planned_for():
    """A candidate index past the plan's list, or a misaligned activation view, computes F.linear."""
    shape = SHAPES["opt-1.3b"]["qkv"]
    ws, bs = _weights(shape, 1)
    buf = torch.randn(16 * shape.k + 1, device="cuda", dtype=DT)
    x = buf[1:].view(16, shape.k)  # 2-byte offset: not 16-byte aligned
    ref = F.linear(x, ws[0], bs[0])
    for v in ("lt0", "lt63"):
        y = L.run_variant(v, x, ws[0], bs[0], None)
        assert (y.float() - ref.float()).abs().max().item() <= 2e-2 * ref.abs().max().item(), v
