"""Sampler: greedy rows, empirical distributions of temperature / top-k / top-p sampling against
the exact filtered softmax, HF's warpers, seeding, no host syncs, logprobs."""
import pytest
import torch

from hybrid.sampler import apply_top_k_top_p_sorted, compute_logprobs, sample

N = 6000  # draws per distribution check: 3 sigma of a frequency is <= 0.02


def _draw(logits_row, temperature, top_k, top_p, seed=0):
    logits = logits_row.expand(N, -1).contiguous()  # [N, V]
    return sample(logits, torch.full((N,), temperature), torch.full((N,), top_k, dtype=torch.int32),
                  torch.full((N,), top_p), torch.Generator().manual_seed(seed))


def _freqs(tokens, vocab):
    return torch.bincount(tokens, minlength=vocab).float() / tokens.numel()


def _expected(logits_row, temperature, keep):
    p = torch.zeros_like(logits_row)
    p[keep] = torch.softmax(logits_row[keep] / temperature, dim=-1)
    return p


def test_greedy_rows_take_argmax_and_mixed_batches_keep_row_params():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    temperature = torch.tensor([0.0, 1.0, 0.0, 0.7, 0.0])
    tokens = sample(logits, temperature, torch.zeros(5, dtype=torch.int32), torch.ones(5))
    greedy = temperature == 0
    assert torch.equal(tokens[greedy], logits.argmax(-1)[greedy])
    assert tokens.dtype == torch.int64 and tokens.shape == (5,)
    assert torch.equal(sample(logits, torch.zeros(5), torch.zeros(5, dtype=torch.int32),
                              torch.ones(5), all_greedy=True), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_temperature_sampling_distribution(temperature):
    row = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -3.0])
    want = _expected(row, temperature, torch.ones(6, dtype=torch.bool))
    got = _freqs(_draw(row, temperature, 0, 1.0), 6)
    assert (got - want).abs().max() < 0.025, (got, want)
    unfiltered = sample(row.expand(N, -1), torch.full((N,), temperature),
                        torch.zeros(N, dtype=torch.int32), torch.ones(N),
                        torch.Generator().manual_seed(1), filter_top_k_top_p=False)
    assert (_freqs(unfiltered, 6) - want).abs().max() < 0.025


def test_top_k_and_top_p_distributions():
    row = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -3.0])  # order: 3, 0, 1, 4, 2, 5
    got = _freqs(_draw(row, 1.0, 2, 1.0), 6)
    keep = torch.zeros(6, dtype=torch.bool)
    keep[[3, 0]] = True
    assert got[~keep].sum() == 0
    assert (got - _expected(row, 1.0, keep)).abs().max() < 0.025
    probs = torch.softmax(row, -1)  # p(3)=.57, p(0)=.21, p(1)=.09 ...
    got = _freqs(_draw(row, 1.0, 0, 0.8), 6)  # nucleus {3, 0, 1}: .57+.21 < .8 <= .87
    keep[1] = True
    assert probs[[3, 0]].sum() < 0.8 <= probs[[3, 0, 1]].sum()
    assert got[~keep].sum() == 0
    assert (got - _expected(row, 1.0, keep)).abs().max() < 0.025


def test_filter_matches_hf_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(2)
    logits = torch.randn(4, 300) * 3
    for top_k, top_p in [(0, 0.9), (20, 1.0), (50, 0.7), (1, 0.5)]:
        hf = logits.clone()
        if top_k:
            hf = TopKLogitsWarper(top_k)(None, hf)
        if top_p < 1:
            hf = TopPLogitsWarper(top_p)(None, hf)
        sorted_logits, order = logits.sort(-1, descending=True)
        ours = apply_top_k_top_p_sorted(sorted_logits, torch.full((4,), top_k, dtype=torch.int32),
                                        torch.full((4,), top_p))
        ours = torch.empty_like(logits).scatter_(-1, order, ours)
        assert torch.equal(torch.isinf(ours), torch.isinf(hf)), (top_k, top_p)


def test_generator_makes_draws_reproducible():
    row = torch.randn(100)
    a, b = _draw(row, 1.0, 0, 1.0, seed=5), _draw(row, 1.0, 0, 1.0, seed=5)
    c = _draw(row, 1.0, 0, 1.0, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sample_never_syncs_with_host(monkeypatch):
    """CUDA-graph safety: no .item() / .tolist() / bool(tensor) / int(tensor) anywhere inside."""
    def boom(*_a, **_k):
        raise AssertionError("host sync inside sample()")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    logits = torch.randn(3, 40)
    sample(logits, torch.tensor([0.0, 1.0, 0.8]), torch.tensor([0, 5, 0], dtype=torch.int32),
           torch.tensor([1.0, 1.0, 0.9]), torch.Generator().manual_seed(0))
    compute_logprobs(logits, torch.tensor([1, 2, 3]))


def test_compute_logprobs():
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 17, dtype=torch.bfloat16)
    tokens = torch.randint(0, 17, (2, 3))
    want = torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    got = compute_logprobs(logits, tokens)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
