"""hybrid.ops.linear on CPU: every GEMM variant equals F.linear (fp32), split-K reads the weight in
place, the Triton split-K reduce (interpreter) equals the torch one, the choice table's bucket rule,
and the engine's greedy output with a forced split-K table equals HF's."""
import pytest
import torch
import torch.nn.functional as F

from hybrid import ops
from hybrid.config import SamplingParams
from hybrid.ops import linear as L


@pytest.fixture(autouse=True)
def _clean_table():
    L.clear_choices()
    L.set_enabled(True)
    yield
    L.clear_choices()
    L.set_enabled(True)


def _ref(x, w, b, act):
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    return (y.relu() if act == "relu" else y).float()


@pytest.mark.parametrize("variant", ["cublas", "splitk2", "splitk4", "splitk8"])
@pytest.mark.parametrize("m,n,k", [(1, 37, 64), (3, 50, 192), (17, 129, 512), (5, 3, 8)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("act", [None, "relu"])
def test_variant_matches_f_linear(variant, m, n, k, bias, act):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) * k ** -0.5
    b = torch.randn(n, generator=g) if bias else None
    y = L.run_variant(variant, x, w, b, act)
    assert y.shape == (m, n) and y.dtype == torch.float32
    torch.testing.assert_close(y, _ref(x, w, b, act), rtol=1e-5, atol=1e-5)
    if act == "relu":
        assert (y >= 0).all()


def test_splitk_views_share_the_weight_storage():
    x, w = torch.randn(4, 256), torch.randn(96, 256)
    for s in (2, 4, 8):
        a, bm = L.splitk_views(x, w, s)
        assert a.shape == (s, 4, 256 // s) and bm.shape == (s, 256 // s, 96)
        assert a.data_ptr() == x.data_ptr() and bm.data_ptr() == w.data_ptr()
        # one of the two matrix dims has unit stride: cuBLAS takes it without a copy
        assert 1 in bm.stride()[1:] and 1 in a.stride()[1:]
        for i in range(s):
            torch.testing.assert_close(bm[i], w[:, i * 256 // s:(i + 1) * 256 // s].t())


def test_splitk_rejects_indivisible_k():
    with pytest.raises(ValueError):
        L.run_variant("splitk4", torch.randn(2, 66), torch.randn(8, 66), None, None)


@pytest.mark.parametrize("bias,act", [(False, None), (True, None), (True, "relu"), (False, "relu")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_splitk_reduce_matches_torch(bias, act, dtype):
    pytest.importorskip("triton")
    if not ops.triton_usable(torch.device("cpu")):
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")
    g = torch.Generator().manual_seed(7)
    part = torch.randn(4, 5, 1100, generator=g)  # 5500 outputs: several programs, a masked tail
    b = torch.randn(1100, generator=g).to(dtype) if bias else None
    got = L.splitk_reduce_triton(part, b, act, dtype)
    want = L.splitk_reduce_torch(part, b, act, dtype)
    assert got.dtype == dtype
    # bf16: one unit in the last place (the interpreter's fp32 -> bf16 cast may round differently)
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)


def test_candidates_follow_alignment_rule():
    cpu = torch.device("cpu")
    assert L.candidates(L.LinearShape(6144, 2048), cpu) == ["cublas", "splitk2", "splitk4", "splitk8"]
    assert L.candidates(L.LinearShape(2048, 128), cpu) == ["cublas", "splitk2"]
    assert L.candidates(L.LinearShape(2048, 192), cpu) == ["cublas"]  # 96, 48, 24: not whole tiles
    assert L.candidates(L.LinearShape(8, 11008), cpu) == ["cublas", "splitk2", "splitk4"]  # 1376 = 64 * 21.5


def test_choice_uses_smallest_tuned_bucket_at_or_above_m():
    shape, dt = L.LinearShape(64, 128, True, "relu"), torch.float32
    L.set_choice(shape, dt, 16, "splitk4")
    L.set_choice(shape, dt, 4, "splitk2")
    L.set_choice(shape, dt, 64, "cublas")
    pick = lambda m, **kw: L.choice(m, 64, 128, kw.get("dtype", dt), kw.get("bias", True),  # noqa: E731
                                    kw.get("act", "relu"))
    assert [pick(m) for m in (1, 4, 5, 16, 17, 64, 65, 4096)] == [
        "splitk2", "splitk2", "splitk4", "splitk4", "cublas", "cublas", "cublas", "cublas"]
    assert pick(0) == "cublas"  # empty batches never reach a split
    # the key is the whole (shape, dtype, bias, act): anything else is untuned -> cuBLAS
    assert pick(3, dtype=torch.bfloat16) == "cublas"
    assert pick(3, bias=False) == "cublas" and pick(3, act=None) == "cublas"
    assert L.choice(3, 65, 128, dt, True, "relu") == "cublas"
    L.set_choice(shape, dt, 4, "splitk8")  # re-tuning a bucket replaces its entry
    assert pick(2) == "splitk8"
    L.set_enabled(False)
    assert pick(2) == "cublas"
    with pytest.raises(ValueError):
        L.set_choice(shape, dt, 8, "nope")


def test_linear_dispatches_through_the_table(monkeypatch):
    calls = []
    real = L.splitk
    monkeypatch.setattr(L, "splitk", lambda *a: calls.append(a[-1]) or real(*a))
    x, w, b = torch.randn(3, 256), torch.randn(40, 256) / 16, torch.randn(40)
    L.set_choice(L.LinearShape(40, 256, True, None), torch.float32, 4, "splitk4")
    torch.testing.assert_close(L.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert calls == [4]
    L.linear(torch.randn(5, 256), w, b)  # 5 rows: past the largest tuned bucket -> cuBLAS
    L.linear(x, w)  # no bias: another key
    assert calls == [4]
    # leading dims are flattened and restored
    x3 = torch.randn(2, 2, 256)
    torch.testing.assert_close(L.linear(x3, w, b), F.linear(x3, w, b), rtol=1e-5, atol=1e-5)
    assert calls == [4, 4]


def test_autotune_is_a_no_op_on_cpu():
    assert L.autotune_linears([L.LinearShape(64, 128)], [1, 2], "cpu", torch.float32) == []
    assert L.choice(1, 64, 128, torch.float32, False, None) == "cublas"


@pytest.mark.parametrize("family", ["opt", "opt-350m-style", "llama"])
def test_engine_greedy_with_forced_splitk_table_matches_hf(family, monkeypatch):
    from tests.hybrid.test_engine_cpu import batch, engine, hf_greedy, tiny

    model = tiny(family)
    ids, mask = batch(model, [9, 5, 7, 2, 11])
    eng = engine(decode_steps_per_sync=3)
    eng.load_weights(model)
    shapes = eng.model.linear_shapes()
    assert len(shapes) == (7 if family == "opt-350m-style" else 5)
    # every projection, every bucket: a split that divides K (the tiny dims are not 64-aligned, the
    # functional rule only needs K % S == 0); prefill (> 8 rows) stays on cuBLAS
    for shape in shapes:
        s = next(s for s in (4, 2) if shape.k % s == 0)
        for m in eng.runner.buckets:
            L.set_choice(shape, torch.float32, m, f"splitk{s}")
    used = []
    real = L.splitk
    monkeypatch.setattr(L, "splitk", lambda *a: used.append((a[1].shape, a[-1])) or real(*a))
    out = eng.generate(ids, mask, SamplingParams(max_new_tokens=14))
    assert torch.equal(out, hf_greedy(model, ids, mask, 14))
    assert {tuple(sh) for sh, _ in used} == {(s.n, s.k) for s in shapes}, "every projection went split-K"


def test_engine_flag_off_bypasses_the_table(monkeypatch):
    from tests.hybrid.test_engine_cpu import batch, engine, tiny

    model = tiny("opt")
    eng = engine(autotune_linear=False)
    eng.load_weights(model)
    for shape in eng.model.linear_shapes():
        L.set_choice(shape, torch.float32, 8, "splitk2")
    monkeypatch.setattr(L, "splitk", lambda *a: pytest.fail("split-K ran with autotune_linear=False"))
    ids, mask = batch(model, [4, 3])
    eng.generate(ids, mask, SamplingParams(max_new_tokens=3))


def test_forced_variant_overrides_the_table_up_to_max_m(monkeypatch):
    calls = []
    real = L.splitk
    monkeypatch.setattr(L, "splitk", lambda *a: calls.append(a[-1]) or real(*a))
    x, w = torch.randn(3, 256), torch.randn(40, 256) / 16
    try:
        L.set_forced("splitk2", max_m=4)
        assert L.choice(4, 40, 256, torch.float32, False, None) == "splitk2"
        assert L.choice(5, 40, 256, torch.float32, False, None) == "cublas"  # past max_m: the table
        torch.testing.assert_close(L.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
        assert calls == [2]
        L.set_forced("cuda_skinny", max_m=64)  # fp32 is not a skinny dtype: the table decides
        assert L.choice(3, 64, 256, torch.float32, False, None) == "cublas"
        assert L.choice(3, 64, 256, torch.bfloat16, False, None) == "cuda_skinny"
        assert L.choice(3, 40, 256, torch.bfloat16, False, None) == "cublas"  # N % 64 != 0
        with pytest.raises(ValueError):
            L.set_forced("nope")
    finally:
        L.set_forced(None)
    assert L.choice(4, 40, 256, torch.float32, False, None) == "cublas"


def test_weight_copies_outgrow_twice_the_l2():
    ws, bs = L.weight_copies(64, 128, True, "cpu", torch.float32, l2=1 << 20, min_copies=2)
    assert len(ws) == len(bs) == 64  # 2 MiB / 32 KiB
    assert len({w.data_ptr() for w in ws}) == 64 and all(b.shape == (64,) for b in bs)
    ws, bs = L.weight_copies(64, 128, False, "cpu", torch.float32, l2=1 << 30, min_copies=2)
    assert len(ws) == L.MAX_COPIES and bs == [None] * L.MAX_COPIES


def test_skinny_offer_switch_and_timings_follow_it(monkeypatch):
    """EngineConfig.skinny_gemm sets what the autotune is offered (the environment overrides it),
    and per-process timings made under another offer are dropped before the next autotune."""
    from hybrid.ops import linear_norm as LN

    monkeypatch.delenv("HYBRID_SKINNY_GEMM", raising=False)
    before = L.skinny_offered()
    try:
        L.set_skinny_offered(True)
        assert L.skinny_offered()
        monkeypatch.setenv("HYBRID_SKINNY_GEMM", "0")
        assert not L.skinny_offered()
        monkeypatch.delenv("HYBRID_SKINNY_GEMM")
        L.timings_match_offer()
        L._timings[("dev", "k", 1)] = "x"
        LN._timings[("dev", "k", 1)] = "y"
        L.timings_match_offer()  # same offer: kept
        assert ("dev", "k", 1) in L._timings and ("dev", "k", 1) in LN._timings
        L.set_skinny_offered(False)
        L.timings_match_offer()  # another offer: both caches dropped
        assert ("dev", "k", 1) not in L._timings and ("dev", "k", 1) not in LN._timings
    finally:
        L.set_skinny_offered(before)
        L._timings.pop(("dev", "k", 1), None)
        LN._timings.pop(("dev", "k", 1), None)
        L._timed_with_skinny = None


def test_engine_config_defaults_pdl_and_skinny_on():
    from hybrid.config import EngineConfig

    cfg = EngineConfig()
    assert cfg.pdl_launch and cfg.skinny_gemm and cfg.attn_prefetch and not cfg.cublaslt_gemm


def test_lt_variant_names_and_cpu_fallback(monkeypatch):
    """"lt{i}" names cuBLASLt heuristic candidate i: a known variant the table and the forced switch
    take; on the CPU (no cuBLASLt) it computes F.linear, and the autotune is not offered it."""
    from hybrid.ops import cublaslt

    assert L.known_variant("lt0") and L.known_variant("lt7") and L.known_variant("lt")
    assert not L.known_variant("ltx") and not L.known_variant("lt-1") and not L.known_variant("splitk")
    assert not cublaslt.available()
    g = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(4, 64, generator=g), torch.randn(32, 64, generator=g), torch.randn(32, generator=g)
    for act in (None, "relu"):
        torch.testing.assert_close(L.run_variant("lt3", x, w, b, act), _ref(x, w, b, act), rtol=1e-5, atol=1e-5)
    shape = L.LinearShape(32, 64, True)
    L.set_choice(shape, torch.float32, 4, "lt1")
    assert L.choice(4, 32, 64, torch.float32, True, None) == "lt1"
    torch.testing.assert_close(L.linear(x, w, b), _ref(x, w, b, None), rtol=1e-5, atol=1e-5)
    assert not any(v.startswith("lt") and v != "lt" for v in L.candidates(shape, torch.device("cpu"), 4, torch.float32))
    with pytest.raises(ValueError, match="unknown linear variant"):
        L.set_choice(shape, torch.float32, 4, "lt_x")


def test_cublaslt_plan_refuses_clearly_without_cuda():
    from hybrid.ops import cublaslt

    with pytest.raises(RuntimeError, match="cuBLASLt is not available"):
        cublaslt.Plan(16, 64, 64, torch.bfloat16, True, None, 0)


def test_lt_offer_switch_and_timings_follow_it(monkeypatch):
    """EngineConfig.cublaslt_gemm sets the lt offer (HYBRID_LT_GEMM overrides it), and a change of
    offer drops the per-process timings like the skinny switch does."""
    monkeypatch.delenv("HYBRID_LT_GEMM", raising=False)
    before = L.lt_offered()
    try:
        L.set_lt_offered(True)
        assert L.lt_offered()
        monkeypatch.setenv("HYBRID_LT_GEMM", "0")
        assert not L.lt_offered()
        monkeypatch.delenv("HYBRID_LT_GEMM")
        L.timings_match_offer()
        L._timings[("dev", "k", 2)] = "x"
        L.set_lt_offered(False)
        L.timings_match_offer()
        assert ("dev", "k", 2) not in L._timings
    finally:
        L.set_lt_offered(before)
        L._timings.pop(("dev", "k", 2), None)
        L._timed_with_skinny = None


def test_linear_kv_falls_back_on_cpu_and_checks_mirror_ops_cpp():
    """linear_kv on the CPU (or any variant but the skinny GEMM) is linear() and reports that the
    cache is not written; the Python checks of the epilogue write name what is wrong."""
    from hybrid.ops import cuda_skinny as cs

    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(4, 64, generator=g), torch.randn(192, 64, generator=g), torch.randn(192, generator=g)
    kc = torch.zeros(4, 16, 1, 64)
    slots = torch.zeros(4, dtype=torch.int64)
    L.set_choice(L.LinearShape(192, 64, True), torch.float32, 4, "cuda_skinny_pdl")
    y, written = L.linear_kv(x, w, b, kc, kc.clone(), slots, 64)
    assert not written
    torch.testing.assert_close(y, _ref(x, w, b, None), rtol=1e-5, atol=1e-5)
    assert cs.skinny_kv_unsupported(x, w, kc, kc, slots, 64) is None
    assert "within N" in cs.skinny_kv_unsupported(x, w, kc, kc, slots, 130)
    assert "even" in cs.skinny_kv_unsupported(x, w, kc, kc, slots, 63)
    assert "int64" in cs.skinny_kv_unsupported(x, w, kc, kc, slots.int(), 64)
    assert "equal shapes" in cs.skinny_kv_unsupported(x, w, kc, kc[:2], slots, 64)
    assert "dtype" in cs.skinny_kv_unsupported(x, w, kc.double(), kc.double(), slots, 64)


def test_paged_attention_skips_the_write_when_the_projection_wrote(monkeypatch):
    from hybrid.models import base

    calls = []
    monkeypatch.setattr(base.ops, "write_kv_cache", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(base.ops, "paged_decode_attention", lambda q, *a, **k: q)
    meta = base.AttentionMetadata(False, torch.zeros(2, dtype=torch.int64), block_tables=torch.zeros(2, 1, dtype=torch.int32),
                                  seq_lens=torch.ones(2, dtype=torch.int32))
    q = torch.zeros(2, 1, 4)
    base.paged_attention(q, q, q, None, None, meta, 1.0, kv_written=True)
    assert calls == []
    base.paged_attention(q, q, q, None, None, meta, 1.0)
    assert calls == [1]


def test_forced_variant_can_target_one_weight_shape():
    """set_forced(V, only_n=N): only projections with N output features run V (decode_knockout
    --linear-variant V@N); the rest keep the table's choice."""
    from hybrid.ops import linear as L

    try:
        L.set_forced("splitk2", only_n=6144)
        assert L.choice(16, 6144, 2048, torch.bfloat16, True, None) == "splitk2"
        assert L.choice(16, 2048, 2048, torch.bfloat16, True, None) == "cublas"  # untuned: the default
        assert L.choice(65, 6144, 2048, torch.bfloat16, True, None) == "cublas"  # past max_m
        L.set_forced("splitk2")
        assert L.choice(16, 2048, 2048, torch.bfloat16, True, None) == "splitk2"
        with pytest.raises(ValueError):
            L.set_forced("splitk2", only_n=0)
    finally:
        L.set_forced(None)
