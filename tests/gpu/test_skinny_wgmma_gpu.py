"""csrc/skinny_wgmma.cu (the skinny GEMM on Hopper warpgroup MMA, for 33-64 rows) on the GPU, built
for sm_90a: correctness against an fp64 reference with the mma.sync kernel's bound (twice cuBLAS'
own error, or 1% of the output scale) over M 1-64 at the OPT-1.3B / LLaMA-7B projection shapes,
every cluster K split incl. half stages and splits with no K, fp16, bias / ReLU, PDL chains and a
CUDA graph. Then a timing table (no pass/fail on speed) at 33-64 rows against cuBLAS and the
mma.sync skinny GEMM, CUDA graphs over rotating weights larger than L2: printed and appended to
$OUT/skinny_wgmma.jsonl when $OUT is set.

    python3 -m pytest -q -s -m gpu tests/gpu/test_skinny_wgmma_gpu.py -p no:cacheprovider
"""
import json
import os

import pytest
import torch

from bench.hardware import measure_copy_bandwidth
from hybrid.ops import cuda_backend as cb
from hybrid.ops import cuda_skinny as cs
from hybrid.ops import linear as L
from hybrid.ops.testing import assert_pdl_chain_replays_equal, check_projection, projection_cases, time_projections

pytestmark = pytest.mark.gpu

S = L.LinearShape
CASES = projection_cases()
DT = torch.bfloat16


@pytest.fixture(scope="module", autouse=True)
def _ext():
    assert cb.available(), cb.load_error()
    if not cs.skinny_gemm_wgmma_available():
        pytest.skip("the extension was not built for sm_90a")
    yield


def _check(shape, m, dtype=DT, k_splits=0, has_bias=None, act="shape", seed=0, pdl=False):
    check_projection(cs.skinny_gemm_wgmma, shape, m, dtype, k_splits=k_splits, has_bias=has_bias, act=act,
                     seed=seed, poison=True, pdl=pdl)


@pytest.mark.parametrize("m", [1, 16, 33, 48, 49, 64])
@pytest.mark.parametrize("model,label,shape", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_matches_fp64_reference(model, label, shape, m):
    _check(shape, m, seed=m)


@pytest.mark.parametrize("m", [17, 64])
@pytest.mark.parametrize("k_splits", [1, 2, 3, 5, 8])
def test_every_k_split_and_half_stages(k_splits, m):
    """K = 8192 in 1-8 splits; K = 192 (a full and a half stage, and with 5 or 8 splits CTAs that
    own no K and still join the cluster sum) and K = 576 (5 stages through the 3-slot ring)."""
    _check(S(2048, 8192), m, k_splits=k_splits, has_bias=True, act="relu", seed=k_splits)
    _check(S(128, 192), m, k_splits=k_splits, has_bias=True, act="relu", seed=10 + k_splits)
    _check(S(192, 576), m, k_splits=k_splits, has_bias=False, act=None, seed=20 + k_splits)


@pytest.mark.parametrize("m", [40, 64])
def test_fp16_bias_relu_and_pdl(m):
    for has_bias in (False, True):
        for act in (None, "relu"):
            _check(S(1024, 640), m, dtype=torch.float16, has_bias=has_bias, act=act)
            _check(S(1024, 640), m, dtype=torch.bfloat16, has_bias=has_bias, act=act, pdl=True)


def test_pdl_chain_in_a_graph_equals_eager():
    """Three PDL launches, each reading the previous output, captured and replayed: equal to the
    plain launches (the W prologue runs before the wait; x only after it)."""
    assert_pdl_chain_replays_equal(cs.skinny_gemm_wgmma, 64)


def test_refuses_bad_shapes():
    x = torch.randn(8, 100, device="cuda", dtype=DT)
    with pytest.raises(RuntimeError):
        cs.skinny_gemm_wgmma(x, torch.randn(64, 100, device="cuda", dtype=DT))  # K % 64 != 0
    with pytest.raises(RuntimeError):
        cs.skinny_gemm_wgmma(torch.randn(65, 128, device="cuda", dtype=DT), torch.randn(64, 128, device="cuda", dtype=DT))


TIMING_MS = (33, 48, 49, 64)


@torch.no_grad()
def test_timing_table_vs_cublas_and_mma_sync():
    name = torch.cuda.get_device_name()
    bw = measure_copy_bandwidth(torch.device("cuda"))

    def variants(x, shape):
        relu = shape.act == "relu"
        return {"cublas": lambda w, b: L._cublas(x, w, b, shape.act),
                "skinny": lambda w, b: cs.skinny_gemm(x, w, b, relu),
                "skinny_pdl": lambda w, b: cs.skinny_gemm(x, w, b, relu, pdl=True),
                "wgmma": lambda w, b: cs.skinny_gemm_wgmma(x, w, b, relu),
                "wgmma_pdl": lambda w, b: cs.skinny_gemm_wgmma(x, w, b, relu, pdl=True)}

    rows = time_projections(CASES, TIMING_MS, variants, DT)
    for r in rows:
        wbytes = r["weight_bytes"]
        r.update(bench="skinny_wgmma", device=name, copy_bandwidth_tb_s=round(bw / 1e12, 3),
                 pct_copy_bw={v: round(100 * wbytes / (t * 1e-6) / bw, 1) for v, t in r["us"].items()},
                 auto_k_splits=cs.skinny_gemm_k_splits(r["m"], r["n"], r["k"], DT),
                 floor_us=round(wbytes / bw * 1e6, 3), git_commit=os.environ.get("HYBRID_RLHF_GIT_COMMIT"))
    cols = ["cublas", "skinny", "skinny_pdl", "wgmma", "wgmma_pdl"]
    print(f"\nwgmma skinny GEMM vs cuBLAS and the mma.sync kernel on {name}, bf16 (us per call in CUDA graphs "
          f"over rotating weights; copy bandwidth {bw / 1e12:.2f} TB/s)")
    print(f"{'model':<10}{'proj':<8}{'N x K':>13}{'M':>4}{'floor':>7}" + "".join(f"{c:>11}" for c in cols))
    for r in rows:
        print(f"{r['model']:<10}{r['proj']:<8}{r['n']:>7}x{r['k']:<5}{r['m']:>4}{r['floor_us']:>7.2f}"
              + "".join(f"{r['us'][c]:>11.2f}" for c in cols))
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "skinny_wgmma.jsonl"), "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, sort_keys=True) + "\n")
    assert len(rows) == len(CASES) * len(TIMING_MS)
