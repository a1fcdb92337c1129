"""Sampler (torch, graph-safe): time and GB/s over the logits it must read, for greedy, plain
temperature sampling and top-k/top-p (sorted) sampling at OPT's vocabulary."""
import pytest
import torch

from bench.kernels.harness import nbytes, record
from hybrid.sampler import sample

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("mode", ["greedy", "temperature", "top_p"])
@pytest.mark.parametrize("batch", [16, 256])
def test_bench_sampler(benchmark, batch, mode):
    vocab = 50272
    logits = torch.randn(batch, vocab, device="cuda", dtype=torch.bfloat16) * 3
    temp = torch.full((batch,), 0.0 if mode == "greedy" else 0.8, device="cuda")
    top_k = torch.zeros(batch, device="cuda", dtype=torch.int32)
    top_p = torch.full((batch,), 0.9 if mode == "top_p" else 1.0, device="cuda")
    kwargs = {"all_greedy": mode == "greedy", "filter_top_k_top_p": mode == "top_p"}
    record(benchmark, lambda: sample(logits, temp, top_k, top_p, **kwargs), kernel="sample",
           backend="torch", shape={"mode": mode, "batch": batch, "vocab": vocab},
           bytes_moved=nbytes(logits))
