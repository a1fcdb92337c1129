"""hybrid.ops.mlp on CPU: mlp_add_norm's unfused path is exactly fc1 (+ ReLU) then linear_add_norm;
the persistent variants fall back to it where the CUDA kernel cannot run (here: no GPU) instead of
failing; the choice table validates and buckets like linear_norm's; autotune and candidates stay
CPU no-ops; and the OPT engine routes every MLP block through mlp_add_norm (greedy == HF, also
post-LN OPT-350m style, with a persistent table forced). The kernel itself runs in
tests/gpu/test_decode_mlp_gpu.py; its Python-side input checks are tested in test_cuda_backend_cpu.py."""
import pytest
import torch
import torch.nn.functional as F

from hybrid.config import SamplingParams
from hybrid.ops import linear as L
from hybrid.ops import linear_norm as LN
from hybrid.ops import mlp as MLP


@pytest.fixture(autouse=True)
def _clean_tables():
    for mod in (L, LN, MLP):
        mod.clear_choices()
    L.set_enabled(True)
    yield
    for mod in (L, LN, MLP):
        mod.clear_choices()
    L.set_enabled(True)


def _inputs(m, hidden, ffn, norm="layer", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + m)
    x = torch.randn(m, hidden, generator=g).to(dtype)
    w1 = (torch.randn(ffn, hidden, generator=g) * hidden ** -0.5).to(dtype)
    b1 = torch.randn(ffn, generator=g).to(dtype)
    w2 = (torch.randn(hidden, ffn, generator=g) * ffn ** -0.5).to(dtype)
    b2 = torch.randn(hidden, generator=g).to(dtype)
    res = torch.randn(m, hidden, generator=g).to(dtype)
    nw = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    nb = torch.randn(hidden, generator=g).to(dtype) if norm == "layer" else None
    return x, w1, b1, w2, b2, res, nw, nb


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", MLP.VARIANTS)
def test_every_variant_is_fc1_then_linear_add_norm_on_cpu(variant, dtype, norm):
    x, w1, b1, w2, b2, res, nw, nb = _inputs(5, 64, 192, norm, dtype)
    want = LN.linear_add_norm(L.linear(x, w1, b1, act="relu"), w2, b2, res, nw, nb, 1e-5)
    got = MLP.run_variant(variant, x, w1, b1, w2, b2, res, nw, nb, 1e-5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # and that is the MLP block by definition (float64)
    h = F.linear(F.linear(x.double(), w1.double(), b1.double()).relu(), w2.double(), b2.double()) + res.double()
    if nb is None:
        ref = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * nw.double()
    else:
        ref = F.layer_norm(h, (64,), nw.double(), nb.double(), 1e-5)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(got[0].double(), ref, rtol=tol, atol=tol)


def test_choice_table_validation_and_dispatch(monkeypatch):
    shape, dt = MLP.MlpShape(64, 192, True, "relu", "layer"), torch.float32
    MLP.set_choice(shape, dt, 4, "persistent")
    MLP.set_choice(shape, dt, 16, "unfused")
    assert [MLP.choice(m, shape, dt) for m in (0, 1, 4, 5, 16, 17)] == [
        "unfused", "persistent", "persistent", "unfused", "unfused", "unfused"]
    assert MLP.choice(2, MLP.MlpShape(64, 192, True, "relu", "rms"), dt) == "unfused"  # another key
    with pytest.raises(ValueError, match="unknown MLP variant"):
        MLP.set_choice(shape, dt, 8, "splitk2")
    with pytest.raises(ValueError, match="relu"):
        MLP.set_choice(MLP.MlpShape(64, 192, True, "silu", "layer"), dt, 8, "persistent")
    with pytest.raises(ValueError, match="norm"):
        MLP.set_choice(MLP.MlpShape(64, 192, True, "relu", "batch"), dt, 8, "persistent")
    with pytest.raises(ValueError, match="unknown MLP variant"):
        MLP.run_variant("fused", *_inputs(2, 64, 192), 1e-5)
    seen = []
    real = MLP.run_variant
    monkeypatch.setattr(MLP, "run_variant", lambda v, *a: seen.append(v) or real(v, *a))
    args = _inputs(3, 64, 192)
    MLP.mlp_add_norm(*args, 1e-5)
    L.set_enabled(False)  # EngineConfig.autotune_linear=False: the table is bypassed
    MLP.mlp_add_norm(*args, 1e-5)
    assert seen == ["persistent", "unfused", "unfused"]  # (no GPU: the persistent pick falls back)


def test_autotune_and_candidates_are_cpu_no_ops():
    shape = MLP.MlpShape(64, 192, True, "relu", "layer")
    assert MLP.autotune_mlps([shape], [1, 8], "cpu", torch.float32) == []
    assert MLP.candidates(shape, torch.device("cpu"), 8, torch.bfloat16) == ["unfused"]


@pytest.mark.parametrize("family", ["opt", "opt-350m-style"])
def test_engine_routes_mlp_blocks_through_mlp_add_norm(family, monkeypatch):
    from tests.hybrid.test_engine_cpu import batch, engine, hf_greedy, tiny

    model = tiny(family)
    ids, mask = batch(model, [9, 5, 7, 2, 11])
    eng = engine(decode_steps_per_sync=3, fuse_mlp=True)
    eng.load_weights(model)
    shapes = eng.model.mlp_shapes()
    assert shapes == [MLP.MlpShape(eng.model.hidden, eng.model.layers[0].fc1_w.shape[0], True, "relu", "layer")]
    for m in eng.runner.buckets:
        MLP.set_choice(shapes[0], torch.float32, m, "persistent_pdl")
    used = []
    real = MLP.run_variant
    monkeypatch.setattr(MLP, "run_variant", lambda v, *a: used.append(v) or real(v, *a))
    out = eng.generate(ids, mask, SamplingParams(max_new_tokens=14))
    assert torch.equal(out, hf_greedy(model, ids, mask, 14))
    # decode steps pick the table's variant (which falls back here: no GPU); the prefill's rows
    # exceed every bucket and go unfused directly
    assert used.count("persistent_pdl") >= eng.model.num_layers * ((14 - 1) // 3)
    assert used.count("unfused") > used.count("persistent_pdl")


def test_accum_variants_get_fc2_transposed_from_the_model():
    """wants_w2t follows the table and the forced variant; the OPT inference model then keeps fc2
    transposed ([ffn, hidden], not counted as weight bytes), load_weights keeps it current, and
    without it the accum variants run the flow schedule (here on CPU: the unfused fallback)."""
    from tests.hybrid.test_engine_cpu import batch, engine, hf_greedy, tiny

    shape, dt = MLP.MlpShape(64, 192, True, "relu", "layer"), torch.float32
    assert not MLP.wants_w2t(shape, dt)
    MLP.set_choice(shape, dt, 4, "accum_pdl")
    assert MLP.wants_w2t(shape, dt) and not MLP.wants_w2t(MLP.MlpShape(64, 192, True, "relu", "rms"), dt)
    MLP.clear_choices()
    for forced, want in (("accum", True), ("flow_pdl", False)):
        MLP.set_forced(forced)
        try:
            assert MLP.wants_w2t(shape, dt) == want
        finally:
            MLP.set_forced(None)

    model = tiny("opt")
    ids, mask = batch(model, [9, 5, 7])
    eng = engine(fuse_mlp=True)
    eng.load_weights(model)
    before = eng.model.weight_bytes()
    assert not eng.model.prepare_decode_layout() and eng.model.layers[0].fc2_wt is None
    MLP.set_forced("accum")
    try:
        assert eng.model.prepare_decode_layout()
        for lay in eng.model.layers:
            assert torch.equal(lay.fc2_wt, lay.fc2_w.t()) and lay.fc2_wt.is_contiguous()
        assert eng.model.weight_bytes() == before
        with torch.no_grad():
            model.model.decoder.layers[1].fc2.weight.mul_(-2.0)
        eng.load_weights(model)
        lay = eng.model.layers[1]
        assert torch.equal(lay.fc2_wt, lay.fc2_w.t())
        assert torch.equal(eng.generate(ids, mask, SamplingParams(max_new_tokens=6)), hf_greedy(model, ids, mask, 6))
    finally:
        MLP.set_forced(None)
