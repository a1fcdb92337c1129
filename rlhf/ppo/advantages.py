"""Per-token rewards with the KL penalty, GAE advantages and returns, token logprobs.

Layout (as DeepSpeed-Chat): for a sequence `seq` [B, L] the model's logits [B, L, V] are shifted
so position t holds log p(seq[t + 1] | seq[:t + 1]); every tensor here is [B, T] with T = L - 1.
`action_mask[b, t]` is 1 where seq[b, t + 1] is a generated answer token that counts (EOS included,
prompt and the padding after EOS excluded). Prompts are left-padded to one length, so answers start
at the same column for every row; the math below does not rely on it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[labels] -> [B, T] (fp32), without materialising fp32 logits twice."""
    logp = F.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    return torch.gather(logp, -1, labels.unsqueeze(-1)).squeeze(-1)  # [B, T]


def last_action_index(action_mask: torch.Tensor) -> torch.Tensor:
    """Column of the last counted answer token per row -> [B] (long; -1 for an empty answer)."""
    T = action_mask.shape[1]
    cols = torch.arange(T, device=action_mask.device).expand_as(action_mask)  # [B, T]
    return torch.where(action_mask.bool(), cols, torch.full_like(cols, -1)).max(dim=1).values  # [B]


def compute_rewards(
    log_probs: torch.Tensor,  # [B, T] actor logprobs of the taken tokens
    ref_log_probs: torch.Tensor,  # [B, T] reference-model logprobs of the same tokens
    reward_score: torch.Tensor,  # [B] reward-model score of the whole answer
    action_mask: torch.Tensor,  # [B, T]
    kl_ctl: float = 0.1,
    clip_reward_value: float = 5.0,
) -> torch.Tensor:
    """rewards[b, t] = -kl_ctl * (logp - logp_ref) on answer tokens, plus the reward-model score
    clipped to +-clip_reward_value at the last answer token; 0 on prompt and padding -> [B, T]."""
    mask = action_mask.to(log_probs.dtype)
    rewards = -kl_ctl * (log_probs - ref_log_probs) * mask  # [B, T]
    score = torch.clamp(reward_score.to(rewards.dtype), -clip_reward_value, clip_reward_value)  # [B]
    last = last_action_index(action_mask)  # [B]
    rows = torch.arange(rewards.shape[0], device=rewards.device)[last >= 0]
    rewards[rows, last[last >= 0]] += score[last >= 0]
    return rewards


def gae(
    values: torch.Tensor,  # [B, T] critic values at experience time
    rewards: torch.Tensor,  # [B, T] from compute_rewards
    mask: torch.Tensor,  # [B, T] action mask
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation -> (advantages, returns), both [B, T], 0 outside the mask.

    Values and rewards past the answer's end are treated as 0 (the episode is over), so the
    bootstrap from the last answer token is 0 — DeepSpeed-Chat zeroes them the same way.
    """
    mask = mask.to(values.dtype)
    values = values * mask  # [B, T]
    rewards = rewards * mask  # [B, T]
    T = values.shape[1]
    lastgaelam = torch.zeros_like(values[:, 0])  # [B]
    advantages_reversed = []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else torch.zeros_like(values[:, t])  # [B]
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]  # [B]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # [B, T]
    returns = advantages + values  # [B, T]
    return (advantages * mask).detach(), (returns * mask).detach()


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise advantages to zero mean / unit variance over counted tokens (optional in PPO)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)
