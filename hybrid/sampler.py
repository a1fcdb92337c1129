"""Token sampling for rollouts: greedy, temperature, top-k and top-p, with no host synchronisation.

Every row carries its own parameters as tensors (temperature [B], top_k [B], top_p [B]); nothing
reads a tensor value on the host (.item(), .tolist(), data-dependent Python branches), so sample()
can be captured inside the decode step's CUDA graph. Sampling is a Gumbel race: the argmax of
logits / temperature - log(E), E ~ Exp(1), draws a token with probability softmax(logits / T), with
no normalisation and no cumulative-sum search. Rows with temperature 0 take the argmax of the raw
logits. Top-k and top-p need the sorted distribution; callers that know (from host-side
SamplingParams) that no row uses them pass filter_top_k_top_p=False to skip the sort, and callers
whose rows are all greedy pass all_greedy=True to skip the random draw.
"""
from __future__ import annotations

import torch

_TINY = 1e-20  # floor of the exponential draw: -log(E) stays finite, so masked -inf stays -inf


def apply_top_k_top_p_sorted(
    sorted_logits: torch.Tensor,  # [batch, vocab] fp32, descending per row
    top_k: torch.Tensor,  # [batch] int32, 0 = off
    top_p: torch.Tensor,  # [batch] fp32, 1.0 = off
) -> torch.Tensor:  # [batch, vocab] with the dropped tail set to -inf
    """Keeps the top_k highest logits, then the smallest prefix whose probability mass reaches
    top_p (HF's TopKLogitsWarper then TopPLogitsWarper; the first token always survives)."""
    vocab = sorted_logits.shape[-1]
    ranks = torch.arange(vocab, device=sorted_logits.device)  # [V]
    k = torch.where(top_k > 0, top_k.long(), vocab)  # [B]
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= k[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)  # [B, V]
    mass_before = probs.cumsum(dim=-1) - probs  # [B, V] exclusive prefix sum
    drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    return sorted_logits.masked_fill(drop, float("-inf"))


def sample(
    logits: torch.Tensor,  # [batch, vocab]
    temperature: torch.Tensor,  # [batch] fp32, 0 = greedy
    top_k: torch.Tensor,  # [batch] int32, 0 = off
    top_p: torch.Tensor,  # [batch] fp32, 1.0 = off
    generator: torch.Generator | None = None,
    *,
    all_greedy: bool = False,
    filter_top_k_top_p: bool = True,
) -> torch.Tensor:  # [batch] int64
    """all_greedy / filter_top_k_top_p are host-side promises (every temperature is 0 / no row
    uses top-k or top-p) that skip work; the result is wrong if the promise is false."""
    assert logits.dim() == 2, logits.shape
    batch = logits.shape[0]
    assert temperature.shape == (batch,) and top_k.shape == (batch,) and top_p.shape == (batch,)
    greedy = logits.argmax(dim=-1)  # [B]
    if all_greedy:
        return greedy
    temp = torch.where(temperature > 0, temperature, 1.0).float()  # [B]
    scaled = logits.float() / temp[:, None]  # [B, V]
    order = None
    if filter_top_k_top_p:
        scaled, order = scaled.sort(dim=-1, descending=True)  # [B, V], [B, V]
        scaled = apply_top_k_top_p_sorted(scaled, top_k, top_p)
    noise = torch.empty_like(scaled).exponential_(generator=generator).clamp_(min=_TINY)
    choice = (scaled - noise.log()).argmax(dim=-1)  # [B] Gumbel race
    if order is not None:
        choice = order.gather(-1, choice[:, None]).squeeze(-1)  # sorted rank -> token id
    return torch.where(temperature > 0, choice, greedy)


def compute_logprobs(
    logits: torch.Tensor,  # [..., vocab]
    tokens: torch.Tensor,  # [...] int64
) -> torch.Tensor:  # [...] fp32: log softmax(logits)[token]
    """Log-probability of each chosen token under the raw (untempered) distribution, in fp32."""
    assert logits.shape[:-1] == tokens.shape, (logits.shape, tokens.shape)
    logits = logits.float()
    picked = logits.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)  # [...]
    return picked - torch.logsumexp(logits, dim=-1)
