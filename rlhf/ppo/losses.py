"""PPO's clipped policy and value losses (DeepSpeed-Chat step 3, plus clip fractions).

Every tensor is aligned with `logprobs`: position t scores the token at t + 1. `mask` is the action
mask (1 on answer tokens that count, 0 on prompt, padding and anything after EOS), so the loss is a
masked mean: prompt and pad positions never contribute, however large their values are.
"""
from __future__ import annotations

import torch


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def actor_loss(
    logprobs: torch.Tensor,  # [B, T] logprobs of the taken actions under the current policy
    old_logprobs: torch.Tensor,  # [B, T] same, at experience time
    advantages: torch.Tensor,  # [B, T]
    mask: torch.Tensor,  # [B, T] action mask
    clip: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate objective -E[min(r A, clip(r, 1-e, 1+e) A)] -> (loss, clipfrac).

    clipfrac is the share of counted tokens whose clipped term was the one taken (the update was cut).
    """
    mask = mask.to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs) * mask  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    pg_loss1 = -advantages * ratio  # [B, T]
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)  # [B, T]
    loss = _masked_mean(torch.max(pg_loss1, pg_loss2), mask)
    with torch.no_grad():
        clipfrac = _masked_mean((pg_loss2 > pg_loss1).to(mask.dtype), mask)
    return loss, clipfrac


def critic_loss(
    values: torch.Tensor,  # [B, T] current critic values
    old_values: torch.Tensor,  # [B, T] values at experience time
    returns: torch.Tensor,  # [B, T] GAE returns (targets)
    mask: torch.Tensor,  # [B, T] action mask
    clip: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * masked mean of max((v - R)^2, (clip(v, v_old +- e) - R)^2) -> (loss, clipfrac)."""
    values = values.float()
    mask = mask.to(values.dtype)
    values_clipped = torch.clamp(values, old_values - clip, old_values + clip)  # [B, T]
    vf_loss1 = (values - returns) ** 2  # [B, T]
    vf_loss2 = (values_clipped - returns) ** 2  # [B, T]
    loss = 0.5 * _masked_mean(torch.max(vf_loss1, vf_loss2), mask)
    with torch.no_grad():
        clipfrac = _masked_mean((vf_loss2 > vf_loss1).to(mask.dtype), mask)
    return loss, clipfrac
