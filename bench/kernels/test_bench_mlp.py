"""The decode MLP block (OPT: fc1 + ReLU -> fc2 -> + bias + residual -> LayerNorm) at decode row
counts: the persistent CUDA launch (csrc/decode_mlp.cu + the split-K reduce + norm kernel) vs the
torch reference (two F.linear + add + layer_norm). Bytes = both weights + biases + activations;
% of the copy bandwidth is therefore the MLP block's MBU."""
import pytest
import torch
import torch.nn.functional as F

from bench.kernels.harness import nbytes, record
from hybrid.ops import cuda_backend as cb
from hybrid.ops import mlp as MLP

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["cuda", "torch"])
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("model,hidden,ffn", [("opt-1.3b", 2048, 8192), ("opt-6.7b", 4096, 16384)])
def test_bench_decode_mlp(benchmark, model, hidden, ffn, m, backend):
    if backend == "cuda" and not cb.load():
        pytest.skip(f"CUDA extension unavailable: {cb.load_error()}")
    dt = torch.bfloat16
    x = torch.randn(m, hidden, device="cuda", dtype=dt)
    w1 = torch.randn(ffn, hidden, device="cuda", dtype=dt) * hidden ** -0.5
    b1 = torch.randn(ffn, device="cuda", dtype=dt)
    w2 = torch.randn(hidden, ffn, device="cuda", dtype=dt) * ffn ** -0.5
    b2 = torch.randn(hidden, device="cuda", dtype=dt)
    res = torch.randn(m, hidden, device="cuda", dtype=dt)
    nw, nb = torch.ones(hidden, device="cuda", dtype=dt), torch.zeros(hidden, device="cuda", dtype=dt)
    if backend == "cuda":
        fn = lambda: MLP.run_variant("persistent_pdl", x, w1, b1, w2, b2, res, nw, nb, 1e-5)  # noqa: E731
    else:
        def fn():
            h = F.linear(F.linear(x, w1, b1).relu(), w2, b2) + res
            return F.layer_norm(h, (hidden,), nw, nb, 1e-5), h
    moved = nbytes(w1, b1, w2, b2, nw, nb) + nbytes(x, res) + 2 * m * ffn * 2 + 2 * nbytes(res)
    record(benchmark, fn, kernel="decode_mlp", backend=backend,
           shape={"model": model, "batch": m, "hidden": hidden, "ffn": ffn}, bytes_moved=moved)
