"""csrc/l2_prefetch.cu and hybrid.ops.l2_prefetch on the GPU: the op runs in both modes for any
size and cap, eagerly and inside a CUDA graph, and leaves the tensor untouched; the engine decodes
exactly like HF with every prefetch mode on (tiny fp32 models, CUDA graphs, side-stream branches).

    python3 -m pytest -q -s -m gpu tests/gpu/test_l2_prefetch_gpu.py -p no:cacheprovider
"""
import pytest
import torch

from hybrid.config import SamplingParams
from hybrid.ops import cuda_backend as cb
from hybrid.ops import l2_prefetch as P

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _clean():
    P.set_plan(None)
    yield
    P.set_plan(None)


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("numel,cap", [(1, 0), (1000, 0), (3 << 20, 0), (3 << 20, 12345), (3 << 20, 1 << 40)])
def test_op_runs_and_writes_nothing(mode, numel, cap):
    if not cb.available():
        pytest.skip(cb.load_error())
    t = torch.randn(numel, device="cuda", dtype=torch.bfloat16)
    before = t.clone()
    cb.l2_prefetch(t, cap, mode)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        cb.l2_prefetch(t, cap, mode)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(t, before)


def test_op_rejects_bad_input():
    if not cb.available():
        pytest.skip(cb.load_error())
    with pytest.raises(ValueError, match="mode"):
        cb.l2_prefetch(torch.zeros(8, device="cuda"), 0, 2)
    with pytest.raises(ValueError, match="contiguous"):
        cb.l2_prefetch(torch.zeros(8, 8, device="cuda").t(), 0, 0)


@pytest.mark.parametrize("mode", P.MODES)
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_engine_with_prefetch_equals_hf(family, mode):
    from tests.gpu.test_engine_gpu import batch, engine, hf_greedy, tiny

    model = tiny(family)
    ids, mask = batch(model, [37, 5, 19, 64, 2, 23])
    eng = engine(max_num_seqs=8, l2_prefetch_mb=1.0, l2_prefetch_mode=mode)
    eng.load_weights(model)
    assert P.enabled()
    out = eng.generate(ids, mask, SamplingParams(max_new_tokens=40))
    assert torch.equal(out, hf_greedy(model, ids, mask, 40))
    assert eng.stats.capture_s > 0
