"""csrc/decode_mlp.cu (the persistent fc1 -> ReLU -> fc2 decode launch) and hybrid.ops.mlp on the GPU:
every partial equals the fp32 reference of its K slice over all compiled variants (M 1..64, bf16 /
fp16, bias / ReLU on and off, uneven slices, more units than resident CTAs); repeated launches and
CUDA-graph replays reuse the grid barrier (which must end reset); PDL-launched chains equal plain
ones; mlp_add_norm's persistent path matches the unfused path at OPT-1.3B / 6.7B shapes; the engine
with the persistent table forced decodes like HF; and the autotune table (us per call in CUDA graphs
over rotating weights, unfused = cuBLAS fc1 + split-K fc2 + norm) is printed and appended to
$OUT/decode_mlp.jsonl.

    python3 -m pytest -q -s -m gpu tests/gpu/test_decode_mlp_gpu.py -p no:cacheprovider
"""
import json
import os

import pytest
import torch

from hybrid.config import SamplingParams
from hybrid.ops import cuda_backend as cb
from hybrid.ops import cuda_mlp as cm
from hybrid.ops import linear as L
from hybrid.ops import linear_norm as LN
from hybrid.ops import mlp as MLP

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _clean_tables():
    for mod in (L, LN, MLP):
        mod.clear_choices()
    L.set_enabled(True)
    yield
    for mod in (L, LN, MLP):
        mod.clear_choices()
    L.set_enabled(True)


@pytest.fixture(scope="module", autouse=True)
def _ext():
    if not cb.load():
        pytest.fail(f"CUDA extension did not load: {cb.load_error()}")


def _weights(hidden, ffn, dtype, bias=True, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w1 = torch.randn(ffn, hidden, device="cuda", dtype=dtype, generator=g) * hidden ** -0.5
    b1 = torch.randn(ffn, device="cuda", dtype=dtype, generator=g) if bias else None
    w2 = torch.randn(hidden, ffn, device="cuda", dtype=dtype, generator=g) * ffn ** -0.5
    return w1, b1, w2


def _reference(x, w1, b1, w2, relu, splits):
    """fp32 partial of every K slice (the kernel's slice bounds: 64-column blocks * s // S)."""
    h = torch.nn.functional.linear(x.float(), w1.float(), None if b1 is None else b1.float())
    act = (h.relu() if relu else h).to(x.dtype).float()  # rounded to the dtype, as linear() returns it
    blocks = w1.shape[0] // 64
    bounds = [64 * (blocks * s // splits) for s in range(splits + 1)]
    return torch.stack([act[:, a:b] @ w2.float()[:, a:b].t() for a, b in zip(bounds, bounds[1:])])


def _check(part, ref):
    assert part.shape == ref.shape, (part.shape, ref.shape)
    err = (part - ref).abs().max().item()
    tol = 2e-3 * ref.abs().max().item() + 1e-4  # fp32 sums of bf16 products in another order
    assert err <= tol, f"max error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 16, 17, 32, 33, 48, 64])
def test_partials_equal_reference_every_variant(m, dtype):
    for hidden, ffn in ((2048, 8192), (192, 704), (1024, 4096)):
        w1, b1, w2 = _weights(hidden, ffn, dtype)
        x = torch.randn(m, hidden, device="cuda", dtype=dtype)
        for k_splits in (0, 1, 5):
            for bias, relu in ((b1, True), (None, False)):
                part = cm.decode_mlp(x, w1, bias, w2, relu, k_splits=k_splits)
                s = k_splits or cm.decode_mlp_k_splits(m, hidden, ffn, dtype)
                _check(part, _reference(x, w1, bias, w2, relu, s))


def test_more_units_than_resident_ctas_and_auto_splits():
    """OPT-6.7B's fc1 has 256 column tiles: more than one wave of resident CTAs, so CTAs loop."""
    w1, b1, w2 = _weights(4096, 16384, torch.bfloat16)
    for m in (1, 16, 64):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        part = cm.decode_mlp(x, w1, b1, w2, True)
        _check(part, _reference(x, w1, b1, w2, True, part.shape[0]))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    s = cm.decode_mlp_k_splits(16, 2048, 8192, torch.bfloat16)
    assert 32 * s <= sms and 32 * (s + 1) > sms or s == 16, s  # one wave of phase-2 units


def _captured(fn, pdl_triton=False):
    """fn() warmed up once on a side stream, then captured in a CUDA graph: (graph, fn's outputs in
    the graph's memory). pdl_triton: the Triton kernels PDL-launched too, as in the engine's step."""
    from hybrid.ops import pdl as P

    P.set_launch(pdl_triton)
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
    finally:
        P.set_launch(False)
    return graph, out


def _pdl_chain_graph(x, w1, b1, w2, flow):
    """A chain as in a decode step: PDL-launched MLP -> PDL split-K norm -> the next MLP reads its
    output, 4 times. Returns (plain launches' result, the graph of the PDL chain, its outputs)."""
    res = torch.randn(16, 2048, device="cuda", dtype=torch.bfloat16)
    nw = torch.ones(2048, device="cuda", dtype=torch.bfloat16)
    nb = torch.zeros(2048, device="cuda", dtype=torch.bfloat16)

    def chain(pdl):
        h, r = x, res
        for _ in range(4):
            part = cm.decode_mlp(h, w1, b1, w2, True, pdl=pdl, flow=flow)
            h, r = LN.splitk_add_norm(part, None, r, nw, nb, 1e-5, h.dtype)
        return h, r

    want = chain(False)
    graph, got = _captured(lambda: chain(True), pdl_triton=True)  # the norm kernel PDL-launched too
    return want, graph, got


def test_barrier_reused_across_launches_graphs_and_pdl():
    w1, b1, w2 = _weights(2048, 8192, torch.bfloat16)
    x = torch.randn(16, 2048, device="cuda", dtype=torch.bfloat16)
    ref = cm.decode_mlp(x, w1, b1, w2, True)
    for _ in range(20):  # back to back, plain and PDL: bit-identical (the same deterministic order)
        assert torch.equal(cm.decode_mlp(x, w1, b1, w2, True), ref)
        assert torch.equal(cm.decode_mlp(x, w1, b1, w2, True, pdl=True), ref)
    bar = cm._mlp_barrier(x.device)
    torch.cuda.synchronize()
    # [2] int32 = one little-endian uint64 counter: each barrier adds exactly 2^32, so the low word
    # is back at 0 and the high word counts the barriers
    assert bar[0].item() == 0, "every barrier instance must add exactly 2^32"

    want, graph, got = _pdl_chain_graph(x, w1, b1, w2, flow=False)
    gen0 = bar[1].item()  # barrier instances so far (one per decode_mlp launch)
    for _ in range(50):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert bar[0].item() == 0 and bar[1].item() - gen0 == 50 * 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 16, 17, 33, 64])
def test_flow_schedule_partials_equal_reference(m, dtype):
    """The dataflow schedule (no grid barrier): same partials, incl. more units than CTAs (OPT-6.7B:
    256 fc1 tiles + 64 x S fc2 units), uneven slices, up to 16 slices."""
    for hidden, ffn in ((2048, 8192), (192, 704), (1024, 4096), (4096, 16384)):
        w1, b1, w2 = _weights(hidden, ffn, dtype)
        x = torch.randn(m, hidden, device="cuda", dtype=dtype)
        for k_splits in (0, 1, 5, 16):
            if k_splits > ffn // 64:
                continue
            for bias, relu in ((b1, True), (None, False)):
                part = cm.decode_mlp(x, w1, bias, w2, relu, k_splits=k_splits, flow=True)
                s = k_splits or cm.decode_mlp_k_splits(m, hidden, ffn, dtype)
                _check(part, _reference(x, w1, bias, w2, relu, s))
    torch.cuda.synchronize()
    assert not cm._mlp_barrier(x.device)[2:].any(), "every flow launch leaves its counters at zero"


def test_flow_counters_reset_across_launches_graphs_and_pdl():
    """Bit-identical over back-to-back plain / PDL launches and 50 replays of a PDL chain in a graph
    (each launch's last CTA zeroes the counters the next one starts from)."""
    w1, b1, w2 = _weights(2048, 8192, torch.bfloat16)
    x = torch.randn(16, 2048, device="cuda", dtype=torch.bfloat16)
    ref = cm.decode_mlp(x, w1, b1, w2, True, flow=True)
    _check(ref, _reference(x, w1, b1, w2, True, ref.shape[0]))
    for i in range(20):
        assert torch.equal(cm.decode_mlp(x, w1, b1, w2, True, flow=True), ref)
        assert torch.equal(cm.decode_mlp(x, w1, b1, w2, True, pdl=True, flow=True, prefetch=i % 9 - 1), ref)
    want, graph, got = _pdl_chain_graph(x, w1, b1, w2, flow=True)
    for _ in range(50):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not cm._mlp_barrier(x.device)[2:].any()


def test_flow_phase_stamps_opt_1_3b():
    """Where a flow launch spends its time at OPT-1.3B M=16, next to the barrier schedule (printed,
    appended to $OUT/decode_mlp_phases.jsonl)."""
    copies = 8
    ws = [_weights(2048, 8192, torch.bfloat16, seed=i) for i in range(copies)]
    x = torch.randn(16, 2048, device="cuda", dtype=torch.bfloat16)
    w1s, b1s, w2s = zip(*ws)
    for flow in (False, True):
        got = cm.decode_mlp_phase_stamps(x, w1s, b1s, w2s, pdl=False, flow=flow)
        print(f"\nflow={flow}", got)
        assert got["ctas"] > 0 and got["end"][2] > 0
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "decode_mlp_phases.jsonl"), "a") as f:
                f.write(json.dumps(dict(bench="decode_mlp_phases", device=torch.cuda.get_device_name(), m=16,
                                        hidden=2048, ffn=8192, flow=flow,
                                        git_commit=os.environ.get("HYBRID_RLHF_GIT_COMMIT", ""), **got)) + "\n")


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("m", [1, 5, 16, 33, 64])
def test_norm_phase_equals_the_split_k_norm_kernel(m, norm):
    """Phase 3 sums the same partials in the same order as linear_norm's reduce kernel: the
    residual stream is bit-equal, the normed rows within one bf16 ulp (row statistics order)."""
    dt = torch.bfloat16
    for hidden, ffn in ((2048, 8192), (192, 704)):
        w1, b1, w2 = _weights(hidden, ffn, dt)
        x = torch.randn(m, hidden, device="cuda", dtype=dt)
        big = torch.randn(m, 2 * hidden, device="cuda", dtype=dt)
        nw = torch.empty(hidden, device="cuda", dtype=dt).normal_(1.0, 0.1)
        nb = torch.randn(hidden, device="cuda", dtype=dt) if norm == "layer" else None
        for b2, res in ((torch.randn(hidden, device="cuda", dtype=dt), big[:, :hidden]), (None, None)):
            for flow in (False, True):  # the flow schedule's phase 3 has no grid barrier
                part = cm.decode_mlp(x, w1, b1, w2, True, flow=flow)
                want_n, want_r = LN.splitk_add_norm(part, b2, res, nw, nb, 1e-5, dt)
                got_n, got_r = cm.decode_mlp_norm(x, w1, b1, w2, b2, res, nw, nb, 1e-5, pdl=True, flow=flow)
                assert torch.equal(got_r, want_r), (hidden, flow, (got_r.float() - want_r.float()).abs().max().item())
                diff = (got_n.float() - want_n.float()).abs()
                # LayerNorm: 1 ulp; RMSNorm rounds the normalised value before the weight, so 1 ulp
                # there may become 2 of the (smaller) weighted output
                ulp = want_n.float().abs().clamp_min(1e-2) * 2 ** (-7 if norm == "layer" else -6)
                assert bool((diff <= ulp).all()), (hidden, flow, diff.max().item())
    torch.cuda.synchronize()
    assert not cm._mlp_barrier(torch.device("cuda", torch.cuda.current_device()))[2:].any()


def test_flow_norm_in_pdl_graph_replays_and_counters_reset():
    """flow_norm_pdl blocks chained as in a decode step (each block's normed output feeds the next),
    eagerly and as 50 replays of a CUDA graph: bit-identical every time (the partials' order is
    fixed), and every launch leaves its counters at zero."""
    dt = torch.bfloat16
    layers = [_weights(2048, 8192, dt, seed=i) for i in range(4)]
    b2 = torch.randn(2048, device="cuda", dtype=dt)
    nw = torch.empty(2048, device="cuda", dtype=dt).normal_(1.0, 0.1)
    nb = torch.randn(2048, device="cuda", dtype=dt)
    x = torch.randn(16, 2048, device="cuda", dtype=dt)
    res = torch.randn(16, 2048, device="cuda", dtype=dt)

    def chain(v):
        h, r = x, res
        for w1, b1, w2 in layers:
            h, r = MLP.run_variant(v, h, w1, b1, w2, b2, r, nw, nb, 1e-5)
        return h, r

    want = chain("flow_norm_pdl")
    ref = chain("flow_pdl")  # the same partials finished by the split-K norm kernel (1 ulp per norm apart)
    for g, w in zip(want, ref):
        assert (g.float() - w.float()).abs().max().item() <= 0.02 * w.float().abs().max().item()
    for _ in range(5):
        got = chain("flow_norm_pdl")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    graph, out = _captured(lambda: chain("flow_norm_pdl"))
    for _ in range(50):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
    assert not cm._mlp_barrier(x.device)[2:].any()


def test_flow_norm_phase_stamps_opt_1_3b():
    """Where a flow_norm launch's row CTAs spend their time (printed, appended to
    $OUT/decode_mlp_phases.jsonl): "barrier2" = every fc2 partial seen stored."""
    dt, name = torch.bfloat16, torch.cuda.get_device_name()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    w1s, b1s = L.weight_copies(8192, 2048, True, torch.device("cuda"), dt, l2, 4)
    w2s, _ = L.weight_copies(2048, 8192, False, torch.device("cuda"), dt, l2, 4)
    b2, nw = torch.randn(2048, device="cuda", dtype=dt), torch.ones(2048, device="cuda", dtype=dt)
    x, res = torch.randn(16, 2048, device="cuda", dtype=dt), torch.randn(16, 2048, device="cuda", dtype=dt)
    st = cm.decode_mlp_phase_stamps(x, w1s, b1s, w2s, norm=(b2, res, nw, nw, 1e-5), flow=True)
    print(f"\nflow_norm M=16 on {name}:", st)
    assert st["ctas"] > 0 and "barrier2" in st and "norm_sum2" in st
    assert st["phase2_done"][1] <= st["barrier2"][1] <= st["norm_loads"][1] <= st["end"][2]
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "decode_mlp_phases.jsonl"), "a") as f:
            f.write(json.dumps(dict(st, m=16, variant="flow_norm", model="opt-1.3b", device=name,
                                    git_commit=os.environ.get("HYBRID_RLHF_GIT_COMMIT", ""))) + "\n")


def test_phase_stamps_opt_1_3b():
    """Per-phase timeline of one launch (weights from DRAM), printed and appended to
    $OUT/decode_mlp_phases.jsonl: where the persistent kernel's time goes."""
    dt, name = torch.bfloat16, torch.cuda.get_device_name()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    w1s, b1s = L.weight_copies(8192, 2048, True, torch.device("cuda"), dt, l2, 4)
    w2s, _ = L.weight_copies(2048, 8192, False, torch.device("cuda"), dt, l2, 4)
    b2 = torch.randn(2048, device="cuda", dtype=dt)
    nw = torch.ones(2048, device="cuda", dtype=dt)
    print(f"\npersistent MLP phases on {name}, OPT-1.3B, us after the first CTA start (min / median / max over CTAs)")
    for m in (1, 16, 64):
        x = torch.randn(m, 2048, device="cuda", dtype=dt)
        res = torch.randn(m, 2048, device="cuda", dtype=dt)
        for variant, norm in (("persistent", None), ("persistent_norm", (b2, res, nw, nw, 1e-5))):
            st = cm.decode_mlp_phase_stamps(x, w1s, b1s, w2s, norm=norm)
            print(f"M={m:3d} {variant:16s} ctas={st['ctas']} " +
                  " ".join(f"{k}={v[0]:.1f}/{v[1]:.1f}/{v[2]:.1f}" for k, v in st.items() if k != "ctas"))
            order = ["start", "wait", "phase1_gemm", "phase1_done", "barrier1", "phase2_done"]
            if norm is not None:
                order += ["barrier2", "norm_loads", "norm_sum1", "norm_sum2"]
            meds = [st[k][1] for k in order]
            assert meds == sorted(meds), st
            assert ("barrier2" in st) == (norm is not None)
            if os.environ.get("OUT"):
                os.makedirs(os.environ["OUT"], exist_ok=True)
                with open(os.path.join(os.environ["OUT"], "decode_mlp_phases.jsonl"), "a") as f:
                    f.write(json.dumps(dict(st, m=m, variant=variant, model="opt-1.3b", device=name,
                                            git_commit=os.environ.get("HYBRID_RLHF_GIT_COMMIT", ""))) + "\n")


def test_phase2_prefetch_depth_sweep():
    """How many phase-2 weight stages to issue between the barrier's arrival and its wait: graph
    time over rotating weights (and the phase timeline) per depth; every depth computes the same."""
    dt, name = torch.bfloat16, torch.cuda.get_device_name()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    w1s, b1s = L.weight_copies(8192, 2048, True, torch.device("cuda"), dt, l2, 4)
    w2s, _ = L.weight_copies(2048, 8192, False, torch.device("cuda"), dt, l2, 4)
    print(f"\nphase-2 prefetch depth on {name}, OPT-1.3B MLP, us per launch in CUDA graphs (PDL)")
    for m in (1, 16):
        x = torch.randn(m, 2048, device="cuda", dtype=dt)
        ref = cm.decode_mlp(x, w1s[0], b1s[0], w2s[0], True)
        for pre in (0, 1, 2, 4, -1):
            assert torch.equal(cm.decode_mlp(x, w1s[0], b1s[0], w2s[0], True, prefetch=pre), ref)
            us = L.graph_us([lambda i=i: cm.decode_mlp(x, w1s[i], b1s[i], w2s[i], True, pdl=True, prefetch=pre)
                             for i in range(len(w1s))])
            st = cm.decode_mlp_phase_stamps(x, w1s, b1s, w2s, prefetch=pre)
            print(f"M={m:3d} prefetch={pre:2d} {us:6.2f} us  barrier1={st['barrier1'][1]:.1f} "
                  f"phase2_done={st['phase2_done'][1]:.1f} end={st['end'][2]:.1f}")
            if os.environ.get("OUT"):
                os.makedirs(os.environ["OUT"], exist_ok=True)
                with open(os.path.join(os.environ["OUT"], "decode_mlp_phases.jsonl"), "a") as f:
                    f.write(json.dumps(dict(st, m=m, variant="persistent", prefetch=pre, graph_us=us,
                                            model="opt-1.3b", device=name,
                                            git_commit=os.environ.get("HYBRID_RLHF_GIT_COMMIT", ""))) + "\n")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 16, 17, 32, 33, 48, 64])
def test_accumulate_schedule_sums_equal_reference(m, dtype):
    """The ffn-split schedule: part += the whole fc2 product (one slice), over every m16 tile count,
    a last fc2 stage of 64 rows (hidden 192), more ffn tiles than CTAs (OPT-6.7B), bias / ReLU on
    and off, plain and PDL launches; a second launch adds the same again."""
    for hidden, ffn in ((2048, 8192), (192, 704), (1024, 4096), (4096, 16384)):
        w1, b1, w2 = _weights(hidden, ffn, dtype)
        w2t = w2.t().contiguous()
        x = torch.randn(m, hidden, device="cuda", dtype=dtype)
        for bias, relu in ((b1, True), (None, False)):
            ref = _reference(x, w1, bias, w2, relu, 1)[0]
            for pdl in (False, True):
                part = torch.zeros(m, hidden, device="cuda", dtype=torch.float32)
                cm.decode_mlp_accumulate(x, w1, bias, w2t, part, relu, pdl=pdl)
                _check(part, ref)
                cm.decode_mlp_accumulate(x, w1, bias, w2t, part, relu, pdl=pdl)
                _check(part, 2 * ref)


def test_accumulate_block_chain_in_a_pdl_graph_leaves_the_sum_zero():
    """mlp.run_variant("accum_pdl") four times in a row (each block's end reads the shared sum and
    zeroes it for the next), eager and as 50 replays of a PDL-launched CUDA graph: the same
    results as the unfused path within bf16 rounding, and the sum buffer zero afterwards."""
    dt = torch.bfloat16
    w1, b1, w2 = _weights(2048, 8192, dt)
    b2 = torch.randn(2048, device="cuda", dtype=dt)
    x = torch.randn(16, 2048, device="cuda", dtype=dt)
    res = torch.randn(16, 2048, device="cuda", dtype=dt)
    nw = torch.empty(2048, device="cuda", dtype=dt).normal_(1.0, 0.1)
    nb = torch.randn(2048, device="cuda", dtype=dt)

    w2t = w2.t().contiguous()
    calls = []
    real = cm.decode_mlp_accumulate

    def chain(v):
        h, r = x, res
        for _ in range(4):
            h, r = MLP.run_variant(v, h, w1, b1, w2, b2, r, nw, nb, 1e-5, "relu", w2t)
        return h, r

    cm.decode_mlp_accumulate = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        chain("accum")
    finally:
        cm.decode_mlp_accumulate = real
    assert calls, "the accum variant ran its own kernel (not the flow fallback)"

    want = chain("unfused")
    eager = chain("accum_pdl")
    graph, got = _captured(lambda: chain("accum_pdl"), pdl_triton=True)
    for _ in range(50):
        graph.replay()
    torch.cuda.synchronize()
    for g, e, w in zip(got, eager, want):
        for a in (g, e):
            diff = (a.float() - w.float()).abs()
            assert diff.max().item() <= 0.05 * w.float().abs().max().item(), diff.max().item()
            assert diff.mean().item() <= 4e-3 * w.float().abs().mean().item() + 1e-4, diff.mean().item()
    assert not cm.mlp_accum_buffer(x.device, 2048, 64).any(), "every block's end leaves the sum zero"


def test_accumulate_phase_stamps_opt_1_3b():
    """Where an accumulate launch spends its time at OPT-1.3B M=16 (printed, appended to
    $OUT/decode_mlp_phases.jsonl)."""
    copies = 8
    ws = [_weights(2048, 8192, torch.bfloat16, seed=i) for i in range(copies)]
    x = torch.randn(16, 2048, device="cuda", dtype=torch.bfloat16)
    w1s, b1s, w2s = zip(*ws)
    w2ts = [w.t().contiguous() for w in w2s]
    got = cm.decode_mlp_phase_stamps(x, w1s, b1s, w2ts, pdl=False, accumulate=True)
    print("\naccumulate", got)
    assert got["ctas"] > 0 and got["end"][2] > 0
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "decode_mlp_phases.jsonl"), "a") as f:
            f.write(json.dumps(dict(bench="decode_mlp_phases", device=torch.cuda.get_device_name(), m=16,
                                    hidden=2048, ffn=8192, schedule="accumulate",
                                    git_commit=os.environ.get("HYBRID_RLHF_GIT_COMMIT", ""), **got)) + "\n")


def test_bad_inputs_raise_before_the_op():
    w1, b1, w2 = _weights(256, 512, torch.bfloat16)
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="M <="):
        cm.decode_mlp(torch.randn(65, 256, device="cuda", dtype=torch.bfloat16), w1, b1, w2)
    with pytest.raises(RuntimeError, match="w1"):
        cm.decode_mlp(x, w1, b1, w2.t().contiguous())
    with pytest.raises(RuntimeError, match="k_splits"):
        cm.decode_mlp(x, w1, b1, w2, k_splits=9)  # ffn 512 = 8 blocks
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        cm.decode_mlp(x.float(), w1.float(), None, w2.float())
    w2t = w2.t().contiguous()
    with pytest.raises(RuntimeError, match="part must be"):
        cm.decode_mlp_accumulate(x, w1, b1, w2t, torch.zeros(4, 256, device="cuda", dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="part must be"):
        cm.decode_mlp_accumulate(x, w1, b1, w2t, torch.zeros(4, 128, device="cuda"))
    with pytest.raises(RuntimeError, match="w2t"):
        cm.decode_mlp_accumulate(x, w1, b1, w2, torch.zeros(4, 256, device="cuda"))  # not transposed


def _block_inputs(hidden, ffn, m, dt=torch.bfloat16):
    """An MLP block's weights and inputs: (w1, b1, w2, b2, x, residual, norm_w, norm_b)."""
    w1, b1, w2 = _weights(hidden, ffn, dt)
    b2 = torch.randn(hidden, device="cuda", dtype=dt)
    x = torch.randn(m, hidden, device="cuda", dtype=dt)
    res = torch.randn(m, hidden, device="cuda", dtype=dt)
    nw = torch.empty(hidden, device="cuda", dtype=dt).normal_(1.0, 0.1)
    nb = torch.randn(hidden, device="cuda", dtype=dt)
    return w1, b1, w2, b2, x, res, nw, nb


def _assert_like_unfused(got, want, variant):
    """(normed, residual_out) of a variant against the unfused path's: one bf16 rounding of fc1's
    output may differ, a few ulp downstream."""
    for g, w in zip(got, want):
        diff = (g.float() - w.float()).abs()
        assert diff.max().item() <= 0.02 * w.float().abs().max().item(), (variant, diff.max().item())
        assert diff.mean().item() <= 2e-3 * w.float().abs().mean().item() + 1e-4, (variant, diff.mean().item())


@pytest.mark.parametrize("m", [1, 16, 32, 64])
@pytest.mark.parametrize("hidden,ffn", [(2048, 8192), (4096, 16384)])
def test_mlp_add_norm_persistent_matches_unfused(hidden, ffn, m):
    w1, b1, w2, b2, x, res, nw, nb = _block_inputs(hidden, ffn, m)
    want = MLP.run_variant("unfused", x, w1, b1, w2, b2, res, nw, nb, 1e-5)
    w2t = w2.t().contiguous()
    for v in ("persistent", "persistent_pdl", "persistent_norm", "flow", "flow_pdl", "flow_norm", "flow_norm_pdl",
              "accum", "accum_pdl"):
        _assert_like_unfused(MLP.run_variant(v, x, w1, b1, w2, b2, res, nw, nb, 1e-5, "relu", w2t), want, v)


def test_engine_with_forced_persistent_table_equals_hf(monkeypatch):
    from tests.gpu.test_engine_gpu import batch, engine, hf_greedy, tiny

    import hybrid.engine

    monkeypatch.setattr(hybrid.engine.linear_ops, "autotune_linears", lambda *a, **k: [])
    monkeypatch.setattr(LN, "autotune_linear_norms", lambda *a, **k: [])
    monkeypatch.setattr(MLP, "autotune_mlps", lambda *a, **k: [])
    model = tiny("opt").to(torch.bfloat16)
    ids, mask = batch(model, [37, 5, 19, 64, 2, 23])
    want = {}
    for forced in (False, True):
        eng = engine(dtype="bfloat16", max_num_seqs=8, fuse_mlp=True)
        eng.load_weights(model)
        if forced:
            for shape in eng.model.mlp_shapes():
                for m in eng.runner.buckets:
                    MLP.set_choice(shape, torch.bfloat16, m, "persistent_norm")
        calls = []
        real = cm.decode_mlp_norm
        monkeypatch.setattr(cm, "decode_mlp_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
        want[forced] = eng.generate(ids, mask, SamplingParams(max_new_tokens=40))
        monkeypatch.setattr(cm, "decode_mlp_norm", real)
        assert (len(calls) > 0) == forced and eng.stats.capture_s > 0
        del eng
    # hidden 128 / ffn 256 take the kernel. In bf16 the two paths may round one fc1 output
    # differently, which can flip a near-tie argmax late in a row: compare token agreement
    new = slice(ids.shape[1], None)
    agree = (want[True][:, new] == want[False][:, new]).float().mean().item()
    assert agree > 0.95, agree
    hf = hf_greedy(model, ids, mask, 40)
    assert (want[True][:, new] == hf[:, new]).float().mean().item() > 0.9


@pytest.mark.parametrize("variant,op", [("flow_pdl", "decode_mlp"), ("flow_norm_pdl", "decode_mlp_norm"),
                                        ("accum_pdl", "decode_mlp_accumulate"),
                                        ("cluster_pdl", "decode_mlp_cluster")])
def test_engine_with_forced_schedule_equals_hf(monkeypatch, variant, op):
    """The engine with every MLP forced to a PDL-launched schedule (CUDA graphs): tokens as with the
    unfused path and as HF (up to bf16 near-ties, as above)."""
    from tests.gpu.test_engine_gpu import batch, engine, hf_greedy, tiny

    monkeypatch.setattr(MLP, "autotune_mlps", lambda *a, **k: [])  # only the decode path calls it
    model = tiny("opt").to(torch.bfloat16)
    ids, mask = batch(model, [37, 5, 19, 64, 2, 23])
    want = {}
    for forced in ("unfused", variant):
        eng = engine(dtype="bfloat16", max_num_seqs=8, fuse_mlp=True)
        MLP.set_forced(forced)
        try:
            eng.load_weights(model)
            calls = []
            real = getattr(cm, op)
            monkeypatch.setattr(cm, op, lambda *a, **k: calls.append(k.get("pdl")) or real(*a, **k))
            want[forced] = eng.generate(ids, mask, SamplingParams(max_new_tokens=40))
            monkeypatch.setattr(cm, op, real)
        finally:
            MLP.set_forced(None)
        assert (True in calls) == (forced == variant) and (False not in calls), calls[:4]
        del eng
    new = slice(ids.shape[1], None)
    agree = (want[variant][:, new] == want["unfused"][:, new]).float().mean().item()
    assert agree > 0.95, agree
    hf = hf_greedy(model, ids, mask, 40)
    assert (want[variant][:, new] == hf[:, new]).float().mean().item() > 0.9
    if variant.startswith("accum"):
        assert not cm.mlp_accum_buffer(torch.device("cuda"), model.config.hidden_size, 64).any()
        # the engine kept fc2 transposed for it, and a weight reload keeps that copy current
        eng = engine(dtype="bfloat16", max_num_seqs=8, fuse_mlp=True)
        MLP.set_forced(variant)
        try:
            eng.load_weights(model)
            eng.generate(ids, mask, SamplingParams(max_new_tokens=4))
            lay = eng.model.layers[0]
            assert lay.fc2_wt is not None and torch.equal(lay.fc2_wt, lay.fc2_w.t())
            with torch.no_grad():
                model.model.decoder.layers[0].fc2.weight.mul_(0.5)
            eng.load_weights(model)
            assert torch.equal(lay.fc2_wt, lay.fc2_w.t())
        finally:
            MLP.set_forced(None)


def test_autotune_table_opt_shapes():
    name = torch.cuda.get_device_name()
    ms = (1, 8, 16, 32, 64)
    print(f"\npersistent decode MLP on {name}, bf16, us per call in CUDA graphs over rotating weights "
          "(unfused = linear fc1+ReLU, then linear_norm's fc2 + add + LayerNorm; persistent = one launch + the norm; "
          "persistent_norm = one launch with the norm; flow = the dataflow schedule + the norm)")
    print(f"{'model':9} {'M':>4} " + " ".join(f"{v[:8]:>8}" for v in MLP.VARIANTS) + f" {'floor':>6}  chosen  (S)")
    bw = L.copy_bandwidth(torch.device("cuda"))
    for model, (hidden, ffn) in {"opt-1.3b": (2048, 8192), "opt-350m": (1024, 4096), "opt-6.7b": (4096, 16384)}.items():
        lshapes = [L.LinearShape(ffn, hidden, True, "relu"), L.LinearShape(hidden, ffn, True)]
        L.autotune_linears(lshapes, ms, "cuda", torch.bfloat16)
        LN.autotune_linear_norms([LN.LinearNormShape(hidden, ffn, True, "layer")], ms, "cuda", torch.bfloat16)
        rows = MLP.autotune_mlps([MLP.MlpShape(hidden, ffn, True, "relu", "layer")], ms, "cuda", torch.bfloat16)
        for r in rows:
            assert not r.rejected, r.rejected
            assert "persistent" in r.us and r.us[r.chosen] <= r.us["unfused"] * 1.001
            floor = r.weight_bytes / bw * 1e6
            cells = " ".join(f"{r.us.get(v, float('nan')):8.2f}" for v in MLP.VARIANTS)
            print(f"{model:9} {r.m:4d} {cells} {floor:6.2f}  {r.chosen} ({r.k_splits})")
            if os.environ.get("OUT"):
                row = dict(r.row(), model=model, device=name, floor_us=floor, test="decode_mlp_autotune",
                           git_commit=os.environ.get("HYBRID_RLHF_GIT_COMMIT", ""))
                os.makedirs(os.environ["OUT"], exist_ok=True)
                with open(os.path.join(os.environ["OUT"], "decode_mlp.jsonl"), "a") as f:
                    f.write(json.dumps(row) + "\n")


def test_engine_autotune_fills_the_mlp_table():
    """EngineConfig.fuse_mlp is on by default: the engine's autotune times every decode bucket."""
    from tests.gpu.test_engine_gpu import batch, engine, tiny

    model = tiny("opt").to(torch.bfloat16)
    eng = engine(dtype="bfloat16", max_num_seqs=32)
    assert eng.config.fuse_mlp
    eng.load_weights(model)
    ids, mask = batch(model, [9, 4])
    eng.generate(ids, mask, SamplingParams(max_new_tokens=4))
    dev = torch.cuda.get_device_name()
    for shape in eng.model.mlp_shapes():
        key = MLP._key(shape, torch.bfloat16)
        for m in eng.runner.buckets:
            t = MLP._timings[(dev, key, m)]
            assert MLP.choice(m, shape, torch.bfloat16) == t.chosen and "persistent" in t.us, t
