"""Experience masks and batching (pure tensor code)."""
import torch

from rlhf.ppo.experience import answer_masks, concat_experience, position_ids_from_mask, split_experience

PAD, EOS = 0, 9


def test_answer_masks_stop_after_first_eos_and_skip_padding():
    # prompts left padded to 3; answers: "5 EOS pad pad", "6 7 8 4" (no EOS), "EOS pad pad pad"
    seq = torch.tensor([[PAD, 1, 2, 5, EOS, PAD, PAD],
                        [3, 1, 2, 6, 7, 8, 4],
                        [PAD, PAD, 2, EOS, PAD, PAD, PAD]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]])
    attn, action = answer_masks(seq, prompt_mask, EOS, PAD)
    assert attn.tolist() == [[0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0]]
    # action[t] scores seq[t + 1]: prompt positions never count
    assert action.tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [0, 0, 1, 0, 0, 0]]
    assert position_ids_from_mask(attn)[0].tolist() == [0, 0, 1, 2, 3, 3, 3]


def test_answer_masks_when_pad_is_eos():
    seq = torch.tensor([[EOS, 1, 5, 6, EOS, EOS, EOS]])  # left pad == eos, answer "5 6 EOS"
    prompt_mask = torch.tensor([[0, 1]])
    attn, action = answer_masks(seq, prompt_mask, EOS, EOS)
    assert attn.tolist() == [[0, 1, 1, 1, 1, 0, 0]]
    assert action.tolist() == [[0, 1, 1, 1, 0, 0]]


def _exp(B, Lp, La, seed):
    g = torch.Generator().manual_seed(seed)
    L = Lp + La
    return {"prompt_len": Lp, "input_ids": torch.randint(1, 9, (B, L), generator=g),
            "attention_mask": torch.ones(B, L, dtype=torch.long),
            "action_mask": torch.cat([torch.zeros(B, Lp - 1), torch.ones(B, La)], 1).long(),
            "logprobs": torch.randn(B, L - 1, generator=g), "reward_score": torch.randn(B, generator=g)}


def test_concat_aligns_prompts_and_answers_then_split():
    a, b = _exp(2, 3, 4, 0), _exp(3, 5, 2, 1)
    c = concat_experience([a, b], PAD)
    assert c["prompt_len"] == 5 and c["input_ids"].shape == (5, 9) and c["logprobs"].shape == (5, 8)
    # a's rows are shifted right by 2 (left pad) and keep their answers at the shared answer start
    assert torch.equal(c["input_ids"][:2, 2:], a["input_ids"])
    assert torch.equal(c["input_ids"][:2, :2], torch.full((2, 2), PAD))
    assert torch.equal(c["logprobs"][:2, 2:], a["logprobs"])
    assert torch.equal(c["action_mask"][2:, :6], b["action_mask"]) and c["action_mask"][2:, 6:].sum() == 0
    assert c["action_mask"][:, 4].tolist() == [1] * 5  # first answer token column is common
    parts = split_experience(c, 2)
    assert [p["input_ids"].shape[0] for p in parts] == [2, 2, 1]
    assert torch.equal(torch.cat([p["reward_score"] for p in parts]), c["reward_score"])
