"""hybrid.ops.linear_norm on the GPU (bf16): the fused split-K reduce + bias + residual + LayerNorm /
RMSNorm equals the unfused path with the same split (split-K linear, then add_layernorm /
add_rmsnorm) at OPT-1.3B and LLaMA-7B shapes; autotune against the unfused path (linear()'s own
choice + the norm launch) per decode bucket, the table printed and one JSON row per (shape, M)
appended to $OUT/linear_norm.jsonl; the engine with a forced fused table decodes in CUDA graphs
exactly like HF (tiny fp32 models).

    python3 -m pytest -q -s -m gpu tests/gpu/test_linear_norm_gpu.py -p no:cacheprovider
"""
import json
import os

import pytest
import torch

from hybrid.config import SamplingParams
from hybrid.ops import linear as L
from hybrid.ops import linear_norm as LN

pytestmark = pytest.mark.gpu

S = LN.LinearNormShape
SHAPES = {
    "opt-1.3b": {"o": (S(2048, 2048, True, "layer"), L.LinearShape(2048, 2048, True)),
                 "fc2": (S(2048, 8192, True, "layer"), L.LinearShape(2048, 8192, True))},
    "llama-7b": {"o": (S(4096, 4096, False, "rms"), L.LinearShape(4096, 4096)),
                 "down": (S(4096, 11008, False, "rms"), L.LinearShape(4096, 11008))},
}
MS = (1, 16, 32, 64, 128, 256)
DT = torch.bfloat16


@pytest.fixture(autouse=True)
def _clean_tables():
    L.clear_choices()
    LN.clear_choices()
    L.set_enabled(True)
    yield
    L.clear_choices()
    LN.clear_choices()
    L.set_enabled(True)


def _inputs(shape, m):
    x = torch.randn(m, shape.k, device="cuda", dtype=DT)
    w = torch.empty(shape.n, shape.k, device="cuda", dtype=DT).normal_(0, shape.k ** -0.5)
    b = torch.randn(shape.n, device="cuda", dtype=DT) if shape.has_bias else None
    res = torch.randn(m, shape.n, device="cuda", dtype=DT)
    nw = torch.empty(shape.n, device="cuda", dtype=DT).normal_(1.0, 0.1)
    nb = torch.randn(shape.n, device="cuda", dtype=DT) if shape.norm == "layer" else None
    return x, w, b, res, nw, nb


@pytest.mark.parametrize("m", [1, 16, 64, 256])
@pytest.mark.parametrize("model,proj", [(m, p) for m in SHAPES for p in SHAPES[m]])
def test_fused_equals_unfused_same_split(model, proj, m):
    shape, lshape = SHAPES[model][proj]
    x, w, b, res, nw, nb = _inputs(shape, m)
    for s in (2, 4, 8):
        if shape.k % s:
            continue
        L.set_choice(lshape, DT, 4096, f"splitk{s}")  # the unfused path's linear: the same split
        want_n, want_r = LN.run_variant("unfused", x, w, b, res, nw, nb, 1e-5)
        got_n, got_r = LN.run_variant(f"splitk{s}", x, w, b, res, nw, nb, 1e-5)
        assert torch.equal(got_r, want_r), f"splitk{s}: residual_out differs"
        # the row statistics may sum in another order than the norm kernel's: 1 bf16 ulp at most
        diff = (got_n.float() - want_n.float()).abs()
        ulp = want_n.float().abs().clamp_min(1e-3) * 2 ** -7
        assert bool((diff <= ulp).all()), f"splitk{s}: normed off by {diff.max().item():.3g}"


@pytest.mark.parametrize("model", list(SHAPES))
def test_autotune_real_shapes(model):
    lshapes = [ls for _, ls in SHAPES[model].values()]
    L.autotune_linears(lshapes, MS, "cuda", DT)
    rows = LN.autotune_linear_norms([s for s, _ in SHAPES[model].values()], MS, "cuda", DT)
    assert len(rows) == len(SHAPES[model]) * len(MS)
    name = torch.cuda.get_device_name()
    print(f"\nlinear + add + norm on {name}, {model}, bf16, us per call in CUDA graphs over rotating weights")
    cols = ("unfused", "splitk2", "splitk4", "splitk8") + LN.SKINNY_NORM_VARIANTS
    print(f"{'proj':6} {'M':>4} " + " ".join(f"{v[-8:]:>8}" for v in cols) + "  chosen")
    projs = list(SHAPES[model])
    for i, r in enumerate(rows):
        assert not r.rejected, r.rejected
        assert r.us[r.chosen] <= r.us["unfused"] * 1.001
        cells = " ".join(f"{r.us.get(v, float('nan')):8.2f}" for v in cols)
        print(f"{projs[i // len(MS)]:6} {r.m:4d} {cells}  {r.chosen}")
        if os.environ.get("OUT"):
            row = dict(r.row(), model=model, proj=projs[i // len(MS)], device=name, test="linear_norm_autotune",
                       git_commit=os.environ.get("HYBRID_RLHF_GIT_COMMIT", ""))
            os.makedirs(os.environ["OUT"], exist_ok=True)
            with open(os.path.join(os.environ["OUT"], "linear_norm.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_engine_graphs_with_forced_fused_table_equal_hf(family, monkeypatch):
    from tests.gpu.test_engine_gpu import batch, engine, hf_greedy, tiny

    import hybrid.engine

    monkeypatch.setattr(hybrid.engine.linear_ops, "autotune_linears", lambda *a, **k: [])  # keep the forced tables
    monkeypatch.setattr(LN, "autotune_linear_norms", lambda *a, **k: [])
    model = tiny(family)
    ids, mask = batch(model, [37, 5, 19, 64, 2, 23])
    eng = engine(max_num_seqs=8)
    eng.load_weights(model)
    for shape in eng.model.linear_norm_shapes():
        s = next(s for s in (4, 2) if shape.k % s == 0)
        for m in eng.runner.buckets:
            LN.set_choice(shape, torch.float32, m, f"splitk{s}")
    calls = []
    real = LN.splitk_add_norm
    monkeypatch.setattr(LN, "splitk_add_norm", lambda part, *a: calls.append(part.shape[0]) or real(part, *a))
    out = eng.generate(ids, mask, SamplingParams(max_new_tokens=40))
    assert torch.equal(out, hf_greedy(model, ids, mask, 40))
    assert eng.stats.capture_s > 0 and len(calls) > 0


def test_engine_autotune_fills_the_fused_table():
    from tests.gpu.test_engine_gpu import batch, engine, tiny

    model = tiny("opt").to(torch.bfloat16)
    eng = engine(dtype="bfloat16", max_num_seqs=32)
    eng.load_weights(model)
    ids, mask = batch(model, [9, 4])
    eng.generate(ids, mask, SamplingParams(max_new_tokens=4))
    dev = torch.cuda.get_device_name()
    for shape in eng.model.linear_norm_shapes():
        key = (shape.n, shape.k, torch.bfloat16, shape.has_bias, shape.norm)
        for m in eng.runner.buckets:
            t = LN._timings[(dev, key, m)]
            assert LN.choice(m, *key) == t.chosen and "unfused" in t.us


# ---- the CUDA block-end GEMM ("skinny_norm": csrc/skinny_gemm.cu, build kNorm) ---------------------
def _skinny_norm_reference(x, w, b, res, nw, nb, got_r, eps=1e-5):
    """(residual_out in fp32 before its rounding, normed of the kernel's own residual_out): the GEMM's
    fp32 sums may differ from any other kernel's in order, so residual_out is checked within a
    rounding, and the norm exactly on the rows the kernel stored."""
    from hybrid.ops import reference

    y = x.float() @ w.float().t()
    if b is not None:
        y = y + b.float()
    r = y.to(x.dtype).float() + (res.float() if res is not None else 0.0)
    normed = (reference.add_rmsnorm(got_r, None, nw, eps) if nb is None
              else reference.add_layernorm(got_r, None, nw, nb, eps))[0]
    return r, normed


def _check_skinny_norm(got_n, got_r, r32, want_n, what, rms=False):
    # residual_out: the projection's rounding may differ by one ulp where the sums' order differs
    tol = r32.abs().clamp_min(1.0) * 2 ** -6
    assert bool(((got_r.float() - r32).abs() <= tol).all()), f"{what}: residual_out off by {(got_r.float() - r32).abs().max().item():.3g}"
    diff = (got_n.float() - want_n.float()).abs()
    # the row sums' order: 1 ulp, 2 for RMSNorm (it rounds twice: the normalised value, then x weight)
    ulp = want_n.float().abs().clamp_min(1e-3) * 2 ** -7 * (2 if rms else 1)
    assert bool((diff <= ulp).all()), f"{what}: normed off by {diff.max().item():.3g}"


@pytest.mark.parametrize("n,k,bias,norm", [(2048, 2048, True, "layer"), (2048, 8192, True, "layer"),
                                           (4096, 4096, False, "rms"), (4096, 11008, False, "rms"),
                                           (192, 128, True, "layer"), (64, 64, False, "rms")])
@pytest.mark.parametrize("m", [1, 5, 16, 33, 64])
def test_skinny_norm_matches_reference(n, k, bias, norm, m):
    from hybrid.ops import cuda_skinny as cs

    shape = S(n, k, bias, norm)
    x, w, b, res, nw, nb = _inputs(shape, m)
    counter = cs.skinny_norm_counter(torch.device("cuda", torch.cuda.current_device()))
    for pdl in (False, True):
        got_n, got_r = cs.skinny_gemm_norm(x, w, b, res, nw, nb, 1e-5, pdl=pdl)
        r32, want_n = _skinny_norm_reference(x, w, b, res, nw, nb, got_r)
        _check_skinny_norm(got_n, got_r, r32, want_n, f"M={m} pdl={pdl}", nb is None)
        assert int(counter.item()) == 0, "the last cluster leaves the counter zero"
    # every split count (the norm rows are spread over the last cluster's CTAs) and no residual
    for ks in (1, 2, 3, 8):
        if k // ks < 64:
            continue
        got_n, got_r = cs.skinny_gemm_norm(x, w, b, None, nw, nb, 1e-5, k_splits=ks)
        r32, want_n = _skinny_norm_reference(x, w, b, None, nw, nb, got_r)
        _check_skinny_norm(got_n, got_r, r32, want_n, f"M={m} k_splits={ks} no residual", nb is None)
    assert int(counter.item()) == 0


def test_skinny_norm_fp16_and_unsupported_inputs():
    from hybrid.ops import cuda_skinny as cs

    shape = S(2048, 2048, True, "layer")
    x, w, b, res, nw, nb = (t.half() if t is not None else None for t in _inputs(shape, 16))
    got_n, got_r = cs.skinny_gemm_norm(x, w, b, res, nw, nb, 1e-5, pdl=True)
    r32, want_n = _skinny_norm_reference(x, w, b, res, nw, nb, got_r)
    _check_skinny_norm(got_n, got_r, r32, want_n, "fp16")
    wide = torch.zeros(4160, 2048, device="cuda", dtype=torch.half)
    with pytest.raises(RuntimeError, match="N <= 4096"):
        cs.skinny_gemm_norm(x, wide, None, None, torch.ones(4160, device="cuda", dtype=torch.half), None, 1e-5)
    with pytest.raises(RuntimeError, match="residual"):
        cs.skinny_gemm_norm(x, w, b, res.t().contiguous().t(), nw, nb, 1e-5)
    # linear_norm's variant takes what the kernel does not through the unfused path
    strided = torch.randn(16, 4096, device="cuda", dtype=torch.half)[:, :2048]
    got = LN.run_variant("skinny_norm", x, w, b, strided, nw, nb, 1e-5)
    want = LN.run_variant("unfused", x, w, b, strided, nw, nb, 1e-5)
    assert torch.allclose(got[1].float(), want[1].float(), atol=0.05, rtol=0.02)


def test_skinny_norm_pdl_chain_in_graph_replays_bit_identical():
    """Four block ends chained (each one's normed rows and residual feed the next), PDL-launched,
    captured in one CUDA graph and replayed 50 times: every replay equals the eager chain to the
    bit, and the counter is zero after."""
    from hybrid.ops import cuda_skinny as cs

    shape = S(2048, 2048, True, "layer")
    x0, _, _, res0, _, _ = _inputs(shape, 16)
    layers = [_inputs(shape, 16)[1:] for _ in range(4)]

    def chain():
        x, res = x0, res0
        for w, b, _, nw, nb in layers:
            x, res = cs.skinny_gemm_norm(x, w, b, res, nw, nb, 1e-5, pdl=True)
        return x, res

    from tests.gpu.test_decode_mlp_gpu import _captured

    want = chain()
    graph, out = _captured(chain)
    for _ in range(50):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
    assert int(cs.skinny_norm_counter(x0.device).item()) == 0


def test_engine_with_forced_skinny_norm_equals_unfused_and_hf(monkeypatch):
    """The engine (bf16 tiny OPT, CUDA graphs) with every out_proj / fc2 block end forced to
    skinny_norm_pdl: tokens as with the unfused path and as HF, up to bf16 near-ties."""
    from hybrid.ops import cuda_skinny as cs
    from hybrid.ops import mlp as MLP
    from tests.gpu.test_engine_gpu import batch, engine, hf_greedy, tiny

    import hybrid.engine

    monkeypatch.setattr(hybrid.engine.linear_ops, "autotune_linears", lambda *a, **k: [])
    monkeypatch.setattr(LN, "autotune_linear_norms", lambda *a, **k: [])
    monkeypatch.setattr(MLP, "autotune_mlps", lambda *a, **k: [])
    model = tiny("opt").to(torch.bfloat16)
    ids, mask = batch(model, [37, 5, 19, 64, 2, 23])
    want = {}
    for variant in ("unfused", "skinny_norm_pdl"):
        eng = engine(dtype="bfloat16", max_num_seqs=8)
        eng.load_weights(model)
        for shape in eng.model.linear_norm_shapes():
            for m in eng.runner.buckets:
                LN.set_choice(shape, torch.bfloat16, m, variant)
        calls = []
        real = cs.skinny_gemm_norm
        monkeypatch.setattr(cs, "skinny_gemm_norm", lambda *a, **k: calls.append(k.get("pdl")) or real(*a, **k))
        want[variant] = eng.generate(ids, mask, SamplingParams(max_new_tokens=40))
        monkeypatch.setattr(cs, "skinny_gemm_norm", real)
        assert (True in calls) == (variant != "unfused") and eng.stats.capture_s > 0, calls[:4]
        LN.clear_choices()
        del eng
    new = slice(ids.shape[1], None)
    agree = (want["skinny_norm_pdl"][:, new] == want["unfused"][:, new]).float().mean().item()
    assert agree > 0.95, agree
    hf = hf_greedy(model, ids, mask, 40)
    assert (want["skinny_norm_pdl"][:, new] == hf[:, new]).float().mean().item() > 0.9
