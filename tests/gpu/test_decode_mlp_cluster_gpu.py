"""csrc/decode_mlp_cluster.cu (the persistent decode MLP's cluster schedule) on the GPU: every K
slice's partial equals the fp32 reference (M 1-32, bf16 / fp16, bias / ReLU on and off, clusters of
2 / 4 / 8 / 16, OPT-350m / 1.3B shapes); plain, PDL and CUDA-graph launches give bit-identical
results (no counters, no atomics: a fixed summation order); mlp_add_norm's cluster variant matches
the unfused path; and the launch's phase stamps and resident clusters are printed and appended to
$OUT/decode_mlp_phases.jsonl.

    python3 -m pytest -q -s -m gpu tests/gpu/test_decode_mlp_cluster_gpu.py -p no:cacheprovider
"""
import json
import os

import pytest
import torch

from hybrid.ops import cuda_backend as cb
from hybrid.ops import cuda_mlp as cm
from hybrid.ops import linear_norm as LN
from hybrid.ops import mlp as MLP
from tests.gpu.test_decode_mlp_gpu import _assert_like_unfused, _block_inputs, _captured, _check, _reference, _weights

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def _ext():
    if not cb.load():
        pytest.fail(f"CUDA extension did not load: {cb.load_error()}")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm_90")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 16, 17, 32])
def test_cluster_partials_equal_reference(m, dtype):
    for hidden, ffn, clusters in ((2048, 8192, (8, 16)), (1024, 4096, (4, 8, 16)), (256, 1024, (2, 4)),
                                  (128, 256, (2,))):
        w1, b1, w2 = _weights(hidden, ffn, dtype)
        x = torch.randn(m, hidden, device="cuda", dtype=dtype)
        for cl in clusters:
            if cm.decode_mlp_cluster_unsupported(x, w1, b1, w2, cl) is not None:
                assert m > 16 and cl == 16  # only M 17-32 with a 16-CTA cluster runs out of shared memory
                continue
            for bias, relu in ((b1, True), (None, False)):
                part = cm.decode_mlp_cluster(x, w1, bias, w2, relu, cluster=cl)
                _check(part, _reference(x, w1, bias, w2, relu, ffn // (64 * cl)))


def test_cluster_launches_bit_identical_plain_pdl_and_graph_replays():
    w1, b1, w2 = _weights(2048, 8192, torch.bfloat16)
    x = torch.randn(16, 2048, device="cuda", dtype=torch.bfloat16)
    ref = cm.decode_mlp_cluster(x, w1, b1, w2, True)
    assert ref.shape[0] == 16  # clusters of 8 -> 16 K slices
    for _ in range(10):
        assert torch.equal(cm.decode_mlp_cluster(x, w1, b1, w2, True), ref)
        assert torch.equal(cm.decode_mlp_cluster(x, w1, b1, w2, True, pdl=True), ref)
    res = torch.randn(16, 2048, device="cuda", dtype=torch.bfloat16)
    nw = torch.ones(2048, device="cuda", dtype=torch.bfloat16)
    nb = torch.zeros(2048, device="cuda", dtype=torch.bfloat16)

    def chain(pdl):  # as in a decode step: MLP -> split-K norm -> the next MLP reads its output
        h, r = x, res
        for _ in range(4):
            part = cm.decode_mlp_cluster(h, w1, b1, w2, True, pdl=pdl)
            h, r = LN.splitk_add_norm(part, None, r, nw, nb, 1e-5, h.dtype)
        return h, r

    want = chain(False)
    graph, got = _captured(lambda: chain(True), pdl_triton=True)
    for _ in range(50):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("m", [1, 16, 32])
def test_mlp_add_norm_cluster_matches_unfused(m, monkeypatch):
    dt = torch.bfloat16
    hidden, ffn = 2048, 8192
    w1, b1, w2, b2, x, res, nw, nb = _block_inputs(hidden, ffn, m, dt)
    want = MLP.run_variant("unfused", x, w1, b1, w2, b2, res, nw, nb, 1e-5)
    calls = []
    real = cm.decode_mlp_cluster
    monkeypatch.setattr(cm, "decode_mlp_cluster", lambda *a, **k: calls.append(k) or real(*a, **k))
    for v in ("cluster", "cluster_pdl"):
        _assert_like_unfused(MLP.run_variant(v, x, w1, b1, w2, b2, res, nw, nb, 1e-5), want, v)
    assert [k["pdl"] for k in calls] == [False, True]
    shape = MLP.MlpShape(hidden, ffn, True, "relu", "layer")
    assert "cluster_pdl" not in MLP.candidates(shape, x.device, m, dt)  # measured slower: not offered
    MLP.set_cluster_offered(True)
    try:
        assert "cluster_pdl" in MLP.candidates(shape, x.device, m, dt)
    finally:
        MLP.set_cluster_offered(False)


def test_cluster_phase_stamps_and_resident_clusters_opt_1_3b():
    """Where a cluster launch spends its time at OPT-1.3B M=16 (weights from DRAM), next to the flow
    schedule, and how many clusters the device holds at once (printed, appended to
    $OUT/decode_mlp_phases.jsonl)."""
    copies = 8
    ws = [_weights(2048, 8192, torch.bfloat16, seed=i) for i in range(copies)]
    x = torch.randn(16, 2048, device="cuda", dtype=torch.bfloat16)
    w1s, b1s, w2s = zip(*ws)
    name = torch.cuda.get_device_name()
    for cl in (0, 8, 16):
        active = cm.decode_mlp_cluster_active(x, w1s[0], b1s[0], w2s[0], cl) if cl else None
        got = cm.decode_mlp_phase_stamps(x, w1s, b1s, w2s, pdl=False, flow=not cl, cluster=cl)
        print(f"\ncluster={cl} active clusters={active}", got)
        assert got["ctas"] > 0 and got["end"][2] > 0
        if cl:
            assert got["ctas"] == 128 and active >= 1
            order = ["start", "wait", "phase1_gemm", "phase1_done", "barrier1", "phase2_done"]
            meds = [got[k][1] for k in order]
            assert meds == sorted(meds), got
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "decode_mlp_phases.jsonl"), "a") as f:
                f.write(json.dumps(dict(bench="decode_mlp_phases", device=name, m=16, hidden=2048, ffn=8192,
                                        variant=f"cluster{cl}" if cl else "flow", active_clusters=active,
                                        git_commit=os.environ.get("HYBRID_RLHF_GIT_COMMIT", ""), **got)) + "\n")
