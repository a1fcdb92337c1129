"""PPO math against hand-computed cases and a literal transcription of DeepSpeed-Chat's loops."""
import math

import pytest
import torch

from rlhf.ppo.advantages import compute_rewards, gae, last_action_index, logprobs_from_logits
from rlhf.ppo.losses import actor_loss, critic_loss


def test_actor_loss_hand_case():
    logprobs = torch.tensor([[-1.0, -0.5, -2.0, -0.3]])
    old = torch.tensor([[-1.1, -0.9, -2.0, -3.0]])
    adv = torch.tensor([[1.0, -2.0, 0.5, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])  # the last position is padding: huge advantage, must not count
    loss, clipfrac = actor_loss(logprobs, old, adv, mask, clip=0.2)
    # ratios e^0.1, e^0.4, 1; losses max(-A r, -A clip(r)):
    t0 = max(-1.0 * math.exp(0.1), -1.0 * min(math.exp(0.1), 1.2))
    t1 = max(2.0 * math.exp(0.4), 2.0 * 1.2)  # unclipped wins (pessimistic)
    t2 = -0.5
    assert loss.item() == pytest.approx((t0 + t1 + t2) / 3, rel=1e-6)
    assert clipfrac.item() == pytest.approx(0.0)
    # positive advantage with ratio 1.5 > 1.2: the clipped term is taken
    loss, clipfrac = actor_loss(torch.tensor([[math.log(1.5)]]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1))
    assert loss.item() == pytest.approx(-1.2, rel=1e-6)
    assert clipfrac.item() == 1.0


def test_critic_loss_hand_case():
    values = torch.tensor([[1.0, 0.5, 9.0]])
    old = torch.tensor([[0.5, 0.5, 0.0]])
    returns = torch.tensor([[2.0, 0.0, -9.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, clipfrac = critic_loss(values, old, returns, mask, clip=0.2)
    # t0: clip(1.0, 0.3, 0.7) = 0.7 -> max(1, 1.69) = 1.69 (clipped); t1: 0.25 both
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.25) / 2, rel=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)


def _ref_actor(lp, old, adv, mask, clip):
    num = den = 0.0
    for b in range(len(lp)):
        for t in range(len(lp[0])):
            if mask[b][t]:
                r = math.exp(lp[b][t] - old[b][t])
                num += max(-adv[b][t] * r, -adv[b][t] * min(max(r, 1 - clip), 1 + clip))
                den += 1
    return num / den


def test_losses_random_against_elementwise_reference():
    g = torch.Generator().manual_seed(0)
    B, T = 3, 7
    lp, old = -torch.rand(B, T, generator=g) * 3, -torch.rand(B, T, generator=g) * 3
    adv = torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).long()
    loss, _ = actor_loss(lp, old, adv, mask, clip=0.2)
    expected = _ref_actor(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_loss_gradients_ignore_masked_positions():
    lp = torch.randn(2, 5, requires_grad=True)
    values = torch.randn(2, 5, requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]])
    a, _ = actor_loss(lp, lp.detach() + 0.05 * torch.randn(2, 5), torch.randn(2, 5), mask)
    c, _ = critic_loss(values, values.detach() + 0.1, torch.randn(2, 5), mask)
    (a + c).backward()
    assert torch.all(lp.grad[mask == 0] == 0) and torch.all(lp.grad[mask == 1] != 0)
    assert torch.all(values.grad[mask == 0] == 0) and torch.all(values.grad[mask == 1] != 0)


def test_compute_rewards_hand_case():
    lp = torch.tensor([[-1.0, -2.0, -0.5, -1.5, -0.1], [-1.0, -1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.2, -1.0, -0.7, -1.5, -9.0], [-2.0, -2.0, -2.0, -2.0, -2.0]])
    score = torch.tensor([7.0, -0.5])
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 0, 0, 0]])
    r = compute_rewards(lp, ref, score, mask, kl_ctl=0.1, clip_reward_value=5.0)
    expected = torch.tensor([
        [0.0, -0.1 * (-1.0), -0.1 * 0.2, -0.1 * 0.0 + 5.0, 0.0],  # score clipped 7 -> 5 at the last answer token
        [0.0, -0.1 * 1.0 - 0.5, 0.0, 0.0, 0.0],
    ])
    torch.testing.assert_close(r, expected, rtol=0, atol=1e-6)
    assert last_action_index(mask).tolist() == [3, 1]
    assert last_action_index(torch.zeros(1, 4)).tolist() == [-1]


def test_gae_hand_case_with_prompt_and_padding():
    # columns: prompt (masked), 3 answer tokens, padding (masked, garbage values)
    values = torch.tensor([[7.0, 0.5, 1.0, 2.0, 5.0]])
    rewards = torch.tensor([[3.0, 0.1, -0.2, 1.5, 4.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    adv, ret = gae(values, rewards, mask, gamma=0.9, lam=0.8)
    a2 = 1.5 - 2.0
    a1 = -0.2 + 0.9 * 2.0 - 1.0 + 0.72 * a2
    a0 = 0.1 + 0.9 * 1.0 - 0.5 + 0.72 * a1
    torch.testing.assert_close(adv, torch.tensor([[0.0, a0, a1, a2, 0.0]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(ret, torch.tensor([[0.0, a0 + 0.5, a1 + 1.0, a2 + 2.0, 0.0]]), rtol=0, atol=1e-6)


def _dschat_advantages(values, rewards, start, gamma, lam):
    """DeepSpeed-Chat PPOTrainer.get_advantages_and_returns, verbatim."""
    lastgaelam = 0
    advantages_reversed = []
    length = rewards.size()[-1]
    for t in reversed(range(start, length)):
        nextvalues = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values[:, start:]


def test_rewards_and_gae_match_deepspeed_chat_on_random_batches():
    g = torch.Generator().manual_seed(1)
    B, Lp, La = 4, 5, 9
    T = Lp + La - 1
    start = Lp - 1
    lens = torch.tensor([9, 3, 1, 6])  # answer tokens per row (incl. EOS), rest is padding
    mask = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        mask[b, start:start + lens[b]] = 1
    lp, ref = -torch.rand(B, T, generator=g) * 4, -torch.rand(B, T, generator=g) * 4
    values = torch.randn(B, T, generator=g)
    score = torch.randn(B, generator=g) * 4
    # DeepSpeed-Chat: KL everywhere, score at ends-1, zero reward/value from `ends`, GAE from `start`
    ref_rewards = -0.1 * (lp - ref)
    ends = start + mask[:, start:].sum(1)
    old_values = values.clone()
    for j in range(B):
        ref_rewards[j, start:ends[j]][-1] += score.clamp(-5, 5)[j]
        ref_rewards[j, ends[j]:] = 0
        old_values[j, ends[j]:] = 0
    ref_adv, ref_ret = _dschat_advantages(old_values, ref_rewards, start, 1.0, 0.95)
    rewards = compute_rewards(lp, ref, score, mask)
    adv, ret = gae(values, rewards, mask, gamma=1.0, lam=0.95)
    m = mask[:, start:].bool()
    torch.testing.assert_close(adv[:, start:][m], ref_adv[m], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret[:, start:][m], ref_ret[m], rtol=1e-5, atol=1e-5)


def test_logprobs_from_logits():
    logits = torch.randn(2, 4, 11)
    labels = torch.randint(0, 11, (2, 4))
    expected = torch.log_softmax(logits.double(), -1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(logprobs_from_logits(logits, labels).double(), expected, rtol=1e-5, atol=1e-6)


def test_token_kl_exact_and_nonnegative():
    from rlhf.ppo.trainer import token_kl

    g = torch.Generator().manual_seed(3)
    p, q = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    got = token_kl(p, q, mask)
    P, Q = torch.softmax(p.double(), -1), torch.softmax(q.double(), -1)
    per_token = (P * (P.log() - Q.log())).sum(-1)  # [2, 5]
    torch.testing.assert_close(got, (per_token * mask).sum(-1), rtol=1e-5, atol=1e-6)
    assert torch.all(got > 0) and token_kl(p, p, mask).abs().max() < 1e-6
