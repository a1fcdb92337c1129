"""Experience bookkeeping: masks of generated sequences, mini-batching, concatenation.

An experience is a plain dict of tensors (DeepSpeed-Chat's keys plus ours), all rows sharing the
prompt length `prompt_len` (prompts are left-padded to one length):
    input_ids, attention_mask          [B, L]     prompt + answer, 1 on real tokens
    action_mask                        [B, L - 1] 1 where input_ids[:, t + 1] is a counted answer token
    logprobs, ref_logprobs, values     [B, L - 1] aligned with action_mask
    rewards, advantages, returns       [B, L - 1]
    reward_score                       [B]        reward-model score of the whole answer
"""
from __future__ import annotations

import torch

SEQ_KEYS = ("input_ids", "attention_mask")
TOKEN_KEYS = ("action_mask", "logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns")
ROW_KEYS = ("reward_score",)


def answer_masks(
    seq: torch.Tensor,  # [B, L] generated sequences, prompts first
    prompt_attention_mask: torch.Tensor,  # [B, Lp]
    eos_token_id: int,
    pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (attention_mask [B, L], action_mask [B, L - 1]).

    An answer token counts up to and including its first EOS; what follows (padding) does not.
    When pad == eos (LLaMA-style tokenizers without a pad token) the first EOS still counts, which
    `seq != pad` alone would get wrong.
    """
    Lp = prompt_attention_mask.shape[1]
    answer = seq[:, Lp:]  # [B, La]
    is_eos = answer == eos_token_id  # [B, La]
    ended_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # [B, La] an EOS came earlier
    valid = ~ended_before
    if pad_token_id != eos_token_id:
        valid &= answer != pad_token_id
    attention_mask = torch.cat([prompt_attention_mask.to(seq.device).long(), valid.long()], dim=1)  # [B, L]
    action_mask = torch.zeros_like(seq[:, 1:], dtype=torch.long)  # [B, L - 1]
    action_mask[:, Lp - 1:] = valid.long()
    return attention_mask, action_mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only (left padding gets 0), as HF generate computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]


def batch_size(exp: dict) -> int:
    return exp["input_ids"].shape[0]


def split_experience(exp: dict, size: int) -> list[dict]:
    """Mini-batches of `size` rows (the last may be smaller); `prompt_len` is shared."""
    B = batch_size(exp)
    out = []
    for s in range(0, B, size):
        mb = {k: (v[s:s + size] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in exp.items()}
        out.append(mb)
    return out


def concat_experience(exps: list[dict], pad_token_id: int) -> dict:
    """Stack experiences of several generation batches. Prompts are left-padded to the longest
    prompt and answers right-padded to the longest answer; the added columns are masked out."""
    if len(exps) == 1:
        return exps[0]
    Lp = max(e["prompt_len"] for e in exps)
    L = max(Lp + e["input_ids"].shape[1] - e["prompt_len"] for e in exps)
    out: dict = {"prompt_len": Lp}
    for k, v0 in exps[0].items():
        if not isinstance(v0, torch.Tensor):
            continue
        parts = []
        for e in exps:
            v = e[k]
            if k in SEQ_KEYS or k in TOKEN_KEYS:
                left = Lp - e["prompt_len"]
                width = L if k in SEQ_KEYS else L - 1
                fill = pad_token_id if k == "input_ids" else 0
                v = torch.nn.functional.pad(v, (left, width - left - v.shape[1]), value=fill)
            parts.append(v)
        out[k] = torch.cat(parts, dim=0)
    return out
