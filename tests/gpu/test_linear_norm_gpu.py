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
    print(f"{'proj':6} {'M':>4} {'unfused':>8} {'splitk2':>8} {'splitk4':>8} {'splitk8':>8}  chosen")
    projs = list(SHAPES[model])
    for i, r in enumerate(rows):
        assert not r.rejected, r.rejected
        assert r.us[r.chosen] <= r.us["unfused"] * 1.001
        cells = " ".join(f"{r.us.get(v, float('nan')):8.2f}" for v in ("unfused", "splitk2", "splitk4", "splitk8"))
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
