"""hybrid.ops.linear_norm on CPU: the fused split-K reduce + bias + residual add + LayerNorm /
RMSNorm equals the unfused path (linear() then add_layernorm / add_rmsnorm), through the torch
reference and the Triton kernel (interpreter); the choice table; the engine's greedy output with
every out_proj / fc2 / o_proj / down_proj forced through the fused variant equals HF's."""
import pytest
import torch
import torch.nn.functional as F

from hybrid import ops
from hybrid.config import SamplingParams
from hybrid.ops import linear as L
from hybrid.ops import linear_norm as LN
from hybrid.ops import reference


@pytest.fixture(autouse=True)
def _clean_tables():
    L.clear_choices()
    LN.clear_choices()
    L.set_enabled(True)
    yield
    L.clear_choices()
    LN.clear_choices()
    L.set_enabled(True)


def _inputs(m, n, k, bias, residual, norm, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + m * 7 + n + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    res = torch.randn(m, n, generator=g).to(dtype) if residual else None
    nw = (1 + 0.1 * torch.randn(n, generator=g)).to(dtype)
    nb = torch.randn(n, generator=g).to(dtype) if norm == "layer" else None
    return x, w, b, res, nw, nb


def _expected(x, w, b, res, nw, nb, eps=1e-5):
    """Straight from the definitions, in float64 (the unfused path's math)."""
    h = F.linear(x.double(), w.double(), None if b is None else b.double())
    if res is not None:
        h = h + res.double()
    if nb is None:
        normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * nw.double()
    else:
        normed = F.layer_norm(h, (h.shape[-1],), nw.double(), nb.double(), eps)
    return normed.float(), h.float()


@pytest.mark.parametrize("variant", ["unfused", "splitk2", "splitk4", "splitk8"])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("bias,residual", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (5, 100, 256), (17, 48, 64)])
def test_every_variant_matches_the_definition(variant, norm, bias, residual, m, n, k):
    x, w, b, res, nw, nb = _inputs(m, n, k, bias, residual, norm)
    normed, res_out = LN.run_variant(variant, x, w, b, res, nw, nb, 1e-5)
    want_n, want_r = _expected(x, w, b, res, nw, nb)
    assert normed.shape == res_out.shape == (m, n) and normed.dtype == torch.float32
    torch.testing.assert_close(res_out, want_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(normed, want_n, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias,residual", [(True, True), (False, False)])
def test_triton_kernel_matches_torch_reference(norm, dtype, bias, residual):
    pytest.importorskip("triton")
    if not ops.triton_usable(torch.device("cpu")):
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")
    g = torch.Generator().manual_seed(3)
    s, m, n = 4, 6, 1100  # n not a power of two: a masked tail in the row
    part = torch.randn(s, m, n, generator=g)
    _, _, b, res, nw, nb = _inputs(m, n, 8, bias, residual, norm, dtype)
    got = LN.splitk_add_norm(part, b, res, nw, nb, 1e-5, dtype)
    want = LN.splitk_add_norm_torch(part, b, res, nw, nb, 1e-5, dtype)
    # bf16: the interpreter truncates fp32 -> bf16 casts (the GPU rounds to nearest), and the fused
    # reduce rounds twice (projection, then the residual sum): up to two units in the last place
    tol = dict(rtol=0, atol=2e-5) if dtype == torch.float32 else dict(rtol=2 ** -6, atol=4e-2)
    for gt, wt, what in zip(got, want, ("normed", "residual_out")):
        assert gt.dtype == dtype, what
        torch.testing.assert_close(gt.float(), wt.float(), **tol, msg=what)


@pytest.mark.parametrize("triton_path", [True, False])
def test_zero_part_reads_then_zeroes_the_partials(triton_path):
    """zero_part=True (the accumulate MLP's sum buffer): the same outputs as without, and every
    partial is zero afterwards, through the Triton kernel (interpreter) and the torch fallback."""
    if triton_path:
        pytest.importorskip("triton")
        if not ops.triton_usable(torch.device("cpu")):
            pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")
    g = torch.Generator().manual_seed(5)
    s, m, n = 2, 5, 300
    part = torch.randn(s, m, n, generator=g)
    _, _, b, res, nw, nb = _inputs(m, n, 8, True, True, "layer")
    want = LN.splitk_add_norm(part.clone(), b, res, nw, nb, 1e-5, torch.float32)
    if not triton_path:
        import hybrid.ops

        orig = hybrid.ops.triton_usable
        hybrid.ops.triton_usable = lambda device: False
    try:
        got = LN.splitk_add_norm(part, b, res, nw, nb, 1e-5, torch.float32, zero_part=True)
    finally:
        if not triton_path:
            hybrid.ops.triton_usable = orig
    for gt, wt in zip(got, want):
        torch.testing.assert_close(gt, wt, rtol=1e-5, atol=1e-5)
    assert not part.any(), "every partial read is zeroed"
    with pytest.raises(ValueError, match="contiguous"):
        LN.splitk_add_norm(torch.zeros(m, s, n).transpose(0, 1), b, res, nw, nb, 1e-5, torch.float32, zero_part=True)


def test_bf16_rounding_steps_equal_the_unfused_path():
    """bf16: the fused reduce rounds the projection, then the sum, like linear() + add_layernorm."""
    x, w, b, res, nw, nb = _inputs(3, 96, 256, True, True, "layer", torch.bfloat16)
    part = L.splitk_partials(x, w, 4)
    fused = LN.splitk_add_norm_torch(part, b, res, nw, nb, 1e-5, torch.bfloat16)
    y = L.splitk_reduce_torch(part, b, None, torch.bfloat16)
    unfused = reference.add_layernorm(y, res, nw, nb, 1e-5)
    assert torch.equal(fused[1], unfused[1]) and torch.equal(fused[0], unfused[0])
    # and the residual really is y + res rounded once more (not the fp32 sum of partials + res)
    assert torch.equal(fused[1], (y.float() + res.float()).to(torch.bfloat16))


def test_choice_table_and_dispatch(monkeypatch):
    shape, dt = LN.LinearNormShape(48, 256, True, "layer"), torch.float32
    LN.set_choice(shape, dt, 4, "splitk4")
    LN.set_choice(shape, dt, 16, "unfused")
    pick = lambda m, norm="layer": LN.choice(m, 48, 256, dt, True, norm)  # noqa: E731
    assert [pick(m) for m in (0, 1, 4, 5, 16, 17)] == ["unfused", "splitk4", "splitk4", "unfused",
                                                       "unfused", "unfused"]
    assert pick(2, "rms") == "unfused"  # another key
    with pytest.raises(ValueError):
        LN.set_choice(shape, dt, 8, "cublas")
    with pytest.raises(ValueError):
        LN.set_choice(LN.LinearNormShape(48, 256, True, "batch"), dt, 8, "splitk2")
    seen = []
    real = LN.splitk_add_norm
    monkeypatch.setattr(LN, "splitk_add_norm", lambda part, *a: seen.append(part.shape[0]) or real(part, *a))
    x, w, b, res, nw, nb = _inputs(3, 48, 256, True, True, "layer")
    got = LN.linear_add_norm(x, w, b, res, nw, nb, 1e-5)
    torch.testing.assert_close(got[0], _expected(x, w, b, res, nw, nb)[0], rtol=1e-4, atol=1e-4)
    assert seen == [4]
    L.set_enabled(False)  # EngineConfig.autotune_linear=False: the table is bypassed
    LN.linear_add_norm(x, w, b, res, nw, nb, 1e-5)
    assert seen == [4]


def test_autotune_is_a_no_op_on_cpu():
    assert LN.autotune_linear_norms([LN.LinearNormShape(64, 128, True, "rms")], [1], "cpu",
                                    torch.float32) == []


def test_candidates_follow_linears_alignment_rule():
    assert LN.candidates(LN.LinearNormShape(2048, 8192, True, "layer")) == [
        "unfused", "splitk2", "splitk4", "splitk8"]
    assert LN.candidates(LN.LinearNormShape(2048, 192, True, "layer")) == ["unfused"]
    # the CUDA block-end GEMM only on a CUDA device (no CPU device, no extension here)
    assert LN.candidates(LN.LinearNormShape(2048, 2048, True, "layer"), torch.device("cpu"), 16,
                         torch.bfloat16) == ["unfused", "splitk2", "splitk4", "splitk8"]


def test_skinny_norm_variant_falls_back_to_unfused_where_the_kernel_cannot_run():
    """set_choice takes the CUDA block-end variants; on tensors the kernel does not take (here: CPU)
    run_variant computes the unfused path's result."""
    shape = LN.LinearNormShape(64, 128, True, "layer")
    LN.set_choice(shape, torch.float32, 8, "skinny_norm_pdl")
    try:
        assert LN.choice(8, 64, 128, torch.float32, True, "layer") == "skinny_norm_pdl"
        x, w, b = torch.randn(8, 128), torch.randn(64, 128), torch.randn(64)
        res, nw, nb = torch.randn(8, 64), torch.randn(64), torch.randn(64)
        for v in LN.SKINNY_NORM_VARIANTS:
            got = LN.run_variant(v, x, w, b, res, nw, nb, 1e-5)
            want = LN.run_variant("unfused", x, w, b, res, nw, nb, 1e-5)
            assert all(torch.equal(g, t) for g, t in zip(got, want))
    finally:
        LN.clear_choices()
    with pytest.raises(ValueError, match="unknown"):
        LN.set_choice(shape, torch.float32, 8, "skinny_nrm")


@pytest.mark.parametrize("family", ["opt", "opt-350m-style", "llama"])
def test_engine_greedy_with_forced_fused_table_matches_hf(family, monkeypatch):
    from tests.hybrid.test_engine_cpu import batch, engine, hf_greedy, tiny

    model = tiny(family)
    ids, mask = batch(model, [9, 5, 7, 2, 11])
    eng = engine(decode_steps_per_sync=3)
    eng.load_weights(model)
    shapes = eng.model.linear_norm_shapes()
    assert [s.norm for s in shapes] == (["rms"] * 2 if family == "llama" else ["layer"] * 2)
    for shape in shapes:
        s = next(s for s in (4, 2) if shape.k % s == 0)
        for m in eng.runner.buckets:
            LN.set_choice(shape, torch.float32, m, f"splitk{s}")
    used = []
    real = LN.splitk_add_norm
    monkeypatch.setattr(LN, "splitk_add_norm", lambda part, *a: used.append(part.shape[2]) or real(part, *a))
    out = eng.generate(ids, mask, SamplingParams(max_new_tokens=14))
    assert torch.equal(out, hf_greedy(model, ids, mask, 14))
    layers = eng.model.num_layers
    steps = 14 - 1  # decode steps after the prefill (prefill rows exceed every bucket: unfused)
    assert len(used) >= 2 * layers * (steps // 3), "the decode steps went through the fused reduce"
    assert set(used) == {eng.model.hidden}
