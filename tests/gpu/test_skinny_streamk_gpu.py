"""csrc/skinny_streamk.cu (the stream-K skinny GEMM: TMA ring + wgmma, every SM an equal share of the
weight) on the GPU, built for sm_90a: correctness against an fp64 reference with the other skinny
GEMMs' bound (twice cuBLAS' own error, or 1% of the output scale) over M 1-64 at the OPT-1.3B /
LLaMA-7B projection shapes; grids from 1 CTA to one per unit (tiles whole in a CTA, split over 2-33
CTAs, odd unit counts); fp16, bias / ReLU; bit-identical repeats and PDL graph replays; the tile
counters left zero. Then a timing table (no pass/fail on speed) at 1-64 rows against cuBLAS and
the mma.sync / wgmma skinny GEMMs, CUDA graphs over rotating weights larger than L2: printed and
appended to $OUT/skinny_streamk.jsonl when $OUT is set.

    python3 -m pytest -q -s -m gpu tests/gpu/test_skinny_streamk_gpu.py -p no:cacheprovider
"""
import json
import os

import pytest
import torch

from bench.hardware import measure_copy_bandwidth
from hybrid.ops import cuda_backend as cb
from hybrid.ops import cuda_skinny as cs
from hybrid.ops import cuda_streamk as sk
from hybrid.ops import linear as L
from hybrid.ops.testing import assert_pdl_chain_replays_equal, check_projection, projection_cases, time_projections

pytestmark = pytest.mark.gpu

S = L.LinearShape
CASES = projection_cases()
DT = torch.bfloat16


@pytest.fixture(scope="module", autouse=True)
def _ext():
    assert cb.available(), cb.load_error()
    if not sk.available():
        pytest.skip("the extension was not built for sm_90a")
    yield
    assert int(sk.counters(torch.device("cuda", torch.cuda.current_device())).abs().sum()) == 0, \
        "a launch left a tile counter non-zero"


def _op(x, w, b, relu, k_splits=0, **kw):  # check_projection's calling convention
    return sk.skinny_gemm_streamk(x, w, b, relu, **kw)


def _check(shape, m, dtype=DT, has_bias=None, act="shape", seed=0, **kw):
    check_projection(_op, shape, m, dtype, has_bias=has_bias, act=act, seed=seed, poison=True, **kw)


@pytest.mark.parametrize("m", [1, 7, 16, 33, 64])
@pytest.mark.parametrize("model,label,shape", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_matches_fp64_reference(model, label, shape, m):
    _check(shape, m, seed=m)


@pytest.mark.parametrize("ctas", [1, 2, 5, 31, 64, 87, 88, 100, 132])
@pytest.mark.parametrize("m", [3, 64])
def test_every_grid(ctas, m):
    """N = 512, K = 704: 8 tiles of 11 units (88 units), so 1-88 CTAs give tiles whole in one CTA,
    tiles split over 2-11 CTAs with uneven shares, and 100 / 132 CTAs clamp to one per unit.
    N = 1024, K = 8192 (2048 units, 128 per tile) at 31-132 CTAs: a tile split over 2-8 CTAs."""
    _check(S(512, 704, True, "relu"), m, ctas=ctas, seed=ctas)
    if ctas >= 8:
        _check(S(1024, 8192, True), m, ctas=ctas, seed=100 + ctas)


@pytest.mark.parametrize("m", [8, 40, 64])
def test_fp16_bias_relu_and_pdl(m):
    for has_bias in (False, True):
        for act in (None, "relu"):
            _check(S(1024, 640), m, dtype=torch.float16, has_bias=has_bias, act=act)
            _check(S(1024, 640), m, dtype=torch.bfloat16, has_bias=has_bias, act=act, pdl=True)


def test_repeats_are_bit_identical_and_counters_stay_zero():
    """The split tiles' sums run in contributor order, so the arrival order never shows."""
    g = torch.Generator(device="cuda").manual_seed(1)
    w = torch.randn(6144, 2048, device="cuda", dtype=DT, generator=g) * 2048 ** -0.5
    x = torch.randn(16, 2048, device="cuda", dtype=DT, generator=g)
    first = sk.skinny_gemm_streamk(x, w, None, False, ctas=100)
    for _ in range(20):
        assert torch.equal(sk.skinny_gemm_streamk(x, w, None, False, ctas=100), first)
    torch.cuda.synchronize()
    assert int(sk.counters(x.device).abs().sum()) == 0


def test_pdl_chain_in_a_graph_equals_eager():
    """Three PDL launches, each reading the previous output, captured and replayed: equal to the
    plain launches (W boxes load before the wait; x boxes, the workspace and counters only after)."""
    assert_pdl_chain_replays_equal(sk.skinny_gemm_streamk, 48)


def test_refuses_bad_shapes():
    x = torch.randn(8, 100, device="cuda", dtype=DT)
    with pytest.raises(RuntimeError):
        sk.skinny_gemm_streamk(x, torch.randn(64, 100, device="cuda", dtype=DT))  # K % 64 != 0
    with pytest.raises(RuntimeError):
        sk.skinny_gemm_streamk(torch.randn(65, 128, device="cuda", dtype=DT), torch.randn(64, 128, device="cuda", dtype=DT))
    with pytest.raises(RuntimeError):  # one CTA over 64 tiles: more than its bias stage holds
        sk.skinny_gemm_streamk(torch.randn(4, 128, device="cuda", dtype=DT), torch.randn(4096, 128, device="cuda",
                                                                                       dtype=DT), ctas=1)


def test_linear_variant_runs_it():
    """hybrid.ops.linear's forced-only variants cuda_streamk / cuda_streamk_pdl (bias + ReLU)."""
    g = torch.Generator(device="cuda").manual_seed(3)
    w = torch.randn(8192, 2048, device="cuda", dtype=DT, generator=g) * 2048 ** -0.5
    b = torch.randn(8192, device="cuda", dtype=DT, generator=g)
    x = torch.randn(64, 2048, device="cuda", dtype=DT, generator=g)
    want = sk.skinny_gemm_streamk(x, w, b, True)
    for v in ("cuda_streamk", "cuda_streamk_pdl"):
        L.set_forced(v)
        try:
            assert torch.equal(L.linear(x, w, b, act="relu"), want), v
        finally:
            L.set_forced(None)


TIMING_MS = (1, 16, 32, 48, 64)


@torch.no_grad()
def test_timing_table_vs_cublas_and_skinny():
    name = torch.cuda.get_device_name()
    bw = measure_copy_bandwidth(torch.device("cuda"))

    def variants(x, shape):
        relu = shape.act == "relu"
        return {"cublas": lambda w, b: L._cublas(x, w, b, shape.act),
                "skinny_pdl": lambda w, b: cs.skinny_gemm(x, w, b, relu, pdl=True),
                "wgmma_pdl": lambda w, b: cs.skinny_gemm_wgmma(x, w, b, relu, pdl=True),
                "streamk": lambda w, b: sk.skinny_gemm_streamk(x, w, b, relu),
                "streamk_pdl": lambda w, b: sk.skinny_gemm_streamk(x, w, b, relu, pdl=True)}

    rows = time_projections(CASES, TIMING_MS, variants, DT)
    for r in rows:
        wbytes = r["weight_bytes"]
        r.update(bench="skinny_streamk", device=name, copy_bandwidth_tb_s=round(bw / 1e12, 3),
                 pct_copy_bw={v: round(100 * wbytes / (t * 1e-6) / bw, 1) for v, t in r["us"].items()},
                 floor_us=round(wbytes / bw * 1e6, 3), git_commit=os.environ.get("HYBRID_RLHF_GIT_COMMIT"))
    cols = ["cublas", "skinny_pdl", "wgmma_pdl", "streamk", "streamk_pdl"]
    print(f"\nstream-K skinny GEMM vs cuBLAS and the skinny GEMMs on {name}, bf16 (us per call in CUDA graphs "
          f"over rotating weights; copy bandwidth {bw / 1e12:.2f} TB/s)")
    print(f"{'model':<10}{'proj':<8}{'N x K':>13}{'M':>4}{'floor':>7}" + "".join(f"{c:>12}" for c in cols))
    for r in rows:
        print(f"{r['model']:<10}{r['proj']:<8}{r['n']:>7}x{r['k']:<5}{r['m']:>4}{r['floor_us']:>7.2f}"
              + "".join(f"{r['us'][c]:>12.2f}" for c in cols))
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "skinny_streamk.jsonl"), "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, sort_keys=True) + "\n")
    assert len(rows) == len(CASES) * len(TIMING_MS)
