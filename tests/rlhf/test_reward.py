"""Reward model: DeepSpeed-Chat's pairwise loss and end scores, persistence, stage 2 training."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from rlhf import deepspeed_utils as dsu
from rlhf.models import load_causal_lm
from rlhf.reward import REWARD_HEAD_FILE, RewardModel, create_reward_model

PAD = 256  # the byte tokenizer's pad id (tiny models)


def dschat_reference(input_ids, rewards, pad_id, num_padding_at_beginning=0):
    """DeepSpeed-Chat's RewardModel.forward loop, verbatim in logic (per row, with .item())."""
    bs, seq_len = input_ids.shape[0] // 2, input_ids.shape[1]
    loss, chosen_scores, rejected_scores = 0.0, [], []
    for i in range(bs):
        chosen_id, rejected_id = input_ids[i], input_ids[bs + i]
        chosen_reward, rejected_reward = rewards[i], rewards[bs + i]
        c_inds = (chosen_id == pad_id).nonzero()
        c_ind = c_inds[num_padding_at_beginning].item() if len(c_inds) > num_padding_at_beginning else seq_len
        check_divergence = (chosen_id != rejected_id).nonzero()
        if len(check_divergence) == 0:
            end_ind = rejected_reward.size(-1)
            divergence_ind = end_ind - 1
            r_ind = c_ind
        else:
            r_inds = (rejected_id == pad_id).nonzero()
            r_ind = r_inds[num_padding_at_beginning].item() if len(r_inds) > num_padding_at_beginning else seq_len
            end_ind = max(c_ind, r_ind)
            divergence_ind = check_divergence[0].item()
        c_trunc = chosen_reward[divergence_ind:end_ind]
        r_trunc = rejected_reward[divergence_ind:end_ind]
        chosen_scores.append(chosen_reward[c_ind - 1])
        rejected_scores.append(rejected_reward[r_ind - 1])
        loss += -F.logsigmoid(c_trunc - r_trunc).mean()
    return loss / bs, torch.stack(chosen_scores), torch.stack(rejected_scores)


@pytest.fixture(scope="module")
def tiny_rm() -> RewardModel:
    return create_reward_model("tiny-opt", torch.float32, seed=7)


def test_pairwise_loss_hand_computed_case(tiny_rm):
    # chosen: 4 tokens then pad; rejected: 3 tokens, diverging from chosen at position 2.
    ids = torch.tensor([[5, 6, 7, 8, PAD, PAD], [5, 6, 9, PAD, PAD, PAD]])  # [2B=2, T=6]
    rewards = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))  # [2B, T]
    loss, chosen, rejected = tiny_rm.pairwise_loss(ids, rewards)
    # divergence index 2, end = max(4, 3) = 4: positions 2 and 3 (3 is pad in rejected, still counted).
    want = sum(-math.log(1 / (1 + math.exp(-(rewards[0, t] - rewards[1, t]).item()))) for t in (2, 3)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert chosen.item() == rewards[0, 3].item()  # last non-pad token of chosen
    assert rejected.item() == rewards[1, 2].item()  # last non-pad token of rejected


def _random_pairs(gen, bs, seq_len):
    """Right-padded chosen/rejected rows sharing a random prompt prefix, incl. edge cases."""
    chosen = torch.full((bs, seq_len), PAD)
    rejected = torch.full((bs, seq_len), PAD)
    for i in range(bs):
        p = int(torch.randint(1, seq_len // 2, (1,), generator=gen))
        lc = int(torch.randint(p + 1, seq_len + 1, (1,), generator=gen))
        lr = int(torch.randint(p + 1, seq_len + 1, (1,), generator=gen))
        prompt = torch.randint(0, 256, (p,), generator=gen)
        chosen[i, :p] = rejected[i, :p] = prompt
        chosen[i, p:lc] = torch.randint(0, 256, (lc - p,), generator=gen)
        rejected[i, p:lr] = torch.randint(0, 256, (lr - p,), generator=gen)
    rejected[0] = chosen[0]  # identical pair: DS-Chat's no-divergence branch
    chosen[1, :] = torch.randint(0, 256, (seq_len,), generator=gen)  # no padding at all, and
    rejected[1, : seq_len - 1] = chosen[1, : seq_len - 1]  # rejected diverges only at the last position
    return torch.cat([chosen, rejected])  # [2B, T]


@pytest.mark.parametrize("num_padding_at_beginning", [0, 1])
def test_pairwise_loss_matches_dschat_loop(tiny_rm, num_padding_at_beginning):
    gen = torch.Generator().manual_seed(num_padding_at_beginning)
    ids = _random_pairs(gen, bs=12, seq_len=20)
    if num_padding_at_beginning:
        ids[:, 0] = PAD  # a tokenizer that puts one pad before every sequence
    rewards = torch.randn(ids.shape, generator=gen)  # [2B, T]
    tiny_rm.num_padding_at_beginning = num_padding_at_beginning
    try:
        got = tiny_rm.pairwise_loss(ids, rewards)
    finally:
        tiny_rm.num_padding_at_beginning = 0
    want = dschat_reference(ids, rewards, PAD, num_padding_at_beginning)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), rtol=1e-6, atol=1e-6)


def test_forward_and_forward_value_end_scores(tiny_rm):
    gen = torch.Generator().manual_seed(3)
    ids = _random_pairs(gen, bs=4, seq_len=16)  # [8, 16]
    mask = (ids != PAD).long()
    with torch.no_grad():
        out = tiny_rm(ids, mask)
        values = tiny_rm.forward_value(ids, mask, return_value_only=True)  # [8, 16]
        prompt_length = 3
        scored = tiny_rm.forward_value(ids, mask, prompt_length=prompt_length)
    torch.testing.assert_close(scored["values"], values)
    want = dschat_reference(ids, values, PAD)
    torch.testing.assert_close(out["loss"], want[0])
    torch.testing.assert_close(out["chosen_mean_scores"], want[1])
    for row in range(ids.shape[0]):  # value at the last non-pad token after the prompt
        pads = (ids[row, prompt_length:] == PAD).nonzero()
        end = pads[0].item() + prompt_length if len(pads) else ids.shape[1]
        assert scored["chosen_end_scores"][row].item() == values[row, end - 1].item()


def test_left_padded_prompt_end_score_ignores_prompt_pads(tiny_rm):
    """Stage 3 scores left-padded prompts + right-padded answers: pads in the prompt don't end it."""
    gen = torch.Generator().manual_seed(4)
    prompt = torch.cat([torch.full((3,), PAD), torch.randint(0, 256, (5,), generator=gen)])  # [8]
    answer = torch.cat([torch.randint(0, 256, (4,), generator=gen), torch.full((2,), PAD)])  # [6]
    ids = torch.cat([prompt, answer])[None]  # [1, 14]
    with torch.no_grad():
        scored = tiny_rm.forward_value(ids, (ids != PAD).long(), prompt_length=8)
    assert scored["chosen_end_scores"][0].item() == scored["values"][0, 8 + 4 - 1].item()


def test_save_from_pretrained_round_trip_identical_scores(tmp_path, tiny_rm):
    with torch.no_grad():
        tiny_rm.v_head.weight.normal_(generator=torch.Generator().manual_seed(9))
    ids = _random_pairs(torch.Generator().manual_seed(5), bs=3, seq_len=12)
    mask = (ids != PAD).long()
    tiny_rm.save_pretrained(str(tmp_path))
    assert os.path.isfile(tmp_path / REWARD_HEAD_FILE) and RewardModel.is_reward_model_dir(str(tmp_path))
    again = create_reward_model(str(tmp_path), torch.float32)  # a stage-2 dir: trunk + trained head
    assert isinstance(again, RewardModel)
    with torch.no_grad():
        a, b = tiny_rm(ids, mask), again(ids, mask)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_reward_model_from_plain_lm_dir_takes_trunk(tmp_path):
    lm = load_causal_lm("tiny-llama", torch.float32, seed=2)
    lm.save_pretrained(str(tmp_path))
    from rlhf.models import load_tokenizer

    load_tokenizer("tiny-llama").save_pretrained(str(tmp_path))
    rm = create_reward_model(str(tmp_path), torch.float32)
    assert rm.v_head.in_features == lm.config.hidden_size
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = lm.model(input_ids=ids).last_hidden_state  # [B, T, H]
        got = rm.rwtransformer(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want)


def test_value_head_width_follows_word_embed_proj_dim():
    from rlhf.models import resolve_config
    from transformers import OPTModel

    cfg = resolve_config("opt-350m")
    cfg.num_hidden_layers, cfg.vocab_size = 1, 320
    cfg.hidden_size, cfg.ffn_dim, cfg.word_embed_proj_dim, cfg.num_attention_heads = 64, 128, 32, 4
    rm = RewardModel(OPTModel(cfg), PAD)
    assert rm.v_head.in_features == 32
    ids = torch.randint(0, 256, (2, 7))
    assert rm.forward_value(ids, return_value_only=True).shape == (2, 7)


def test_gradient_checkpointing_pass_through_same_gradients():
    ids = _random_pairs(torch.Generator().manual_seed(8), bs=2, seq_len=10)
    mask = (ids != PAD).long()
    grads = []
    for ckpt in (False, True):
        rm = create_reward_model("tiny-llama", torch.float32, seed=1)
        rm.train()
        if ckpt:
            dsu.enable_gradient_checkpointing(rm)
            assert rm.is_gradient_checkpointing
        rm(ids, mask)["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in rm.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- stage 2 on DeepSpeed
def _load_script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"rlhf_test_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def easy_data(tmp_path_factory):
    from rlhf.config import DataConfig

    root = tmp_path_factory.mktemp("easy_pairs")
    path = _load_script("easy_pairs").write_easy_pairs(str(root / "pairs.jsonl"), num_pairs=2000, seed=0)
    return DataConfig(data_path=[path], data_output_path=str(root / "cache"), max_seq_len=64)


def test_stage2_learns_a_preference_and_its_output_reloads(tmp_path, easy_data):
    """Random tiny-opt trunk, ZeRO-2: held-out accuracy from chance to well above it in 60 steps (1.0
    with this seed; 0.85-1.0 over seeds); the saved dir (trunk + head) reloads and scores the eval
    split exactly as reported."""
    from rlhf.config import DeepSpeedConfig, OptimConfig
    from rlhf.data import build_stage_data
    from rlhf.data.collate import collate_pairs
    from rlhf.metrics import read_metrics
    from rlhf.models import load_tokenizer
    from rlhf.reward import RewardConfig, evaluate_reward, run_reward

    cfg = RewardConfig(
        model_name_or_path="tiny-opt", output_dir=str(tmp_path / "rm"), data=easy_data,
        ds=DeepSpeedConfig(zero_stage=2, dtype="fp32", per_device_train_batch_size=8),
        optim=OptimConfig(learning_rate=3e-3, num_warmup_steps=5, max_steps=60),
        log_interval=10, eval_interval=30, progress=False, tensorboard=False, seed=7,
    )
    m = run_reward(cfg).metrics
    assert m["steps"] == 60
    assert m["initial_eval_accuracy"] <= 0.7 and m["eval_accuracy"] >= 0.85, m
    assert m["eval_loss"] < m["initial_eval_loss"] - 0.3 and m["chosen_mean"] > m["rejected_mean"]
    rows = read_metrics(cfg.output_dir)
    assert [r["step"] for r in rows if r["split"] == "eval"] == [0, 30, 60]
    assert [r["step"] for r in rows if r["split"] == "train"] == [10, 20, 30, 40, 50, 60]
    summary = rows[-1]
    assert summary["split"] == "summary" and summary["eval_accuracy"] == m["eval_accuracy"]
    assert {"chosen_mean", "rejected_mean", "initial_eval_accuracy"} <= summary.keys()
    assert "eval_accuracy_hard" not in m  # hard negatives are known only for the built-in data

    tok = load_tokenizer(cfg.output_dir)
    rm = create_reward_model(cfg.output_dir, torch.float32)
    data = build_stage_data(easy_data, tok, 2)
    loader = dsu.build_dataloader(data.eval, 16, lambda b: collate_pairs(b, tok.pad_token_id), shuffle=False, seed=0)
    again = evaluate_reward(rm, loader)
    for k in ("eval_accuracy", "chosen_mean", "rejected_mean", "eval_loss"):
        assert again[k] == pytest.approx(m[k], rel=1e-5, abs=1e-6), k


def test_stage2_reports_hard_negative_accuracy_on_builtin_data(tmp_path):
    """With the built-in data stage 2 also reports accuracy on the held-out pairs whose rejected
    answer has the right form and wrong content; those rows are exactly the hard negatives."""
    from rlhf.config import DataConfig, DeepSpeedConfig, OptimConfig
    from rlhf.data import build_stage_data
    from rlhf.data.builtin import HARD_NEGATIVE_RATE, is_hard_negative
    from rlhf.models import load_tokenizer
    from rlhf.reward import RewardConfig, hard_negative_rows, run_reward

    data_cfg = DataConfig(data_path=["builtin"], data_output_path=str(tmp_path / "cache"))
    tok = load_tokenizer("tiny-opt")
    ev = build_stage_data(data_cfg, tok, 2).eval
    rows = set(hard_negative_rows(ev, tok))
    assert 0 < len(rows) and abs(len(rows) / len(ev) - HARD_NEGATIVE_RATE) < 0.05
    for i in range(len(ev)):
        text = tok.decode(ev[i]["rejected_input_ids"], skip_special_tokens=True)
        prompt, _, answer = text.rpartition("Assistant:")
        assert (i in rows) == is_hard_negative(prompt + "Assistant:", answer)

    cfg = RewardConfig(model_name_or_path="tiny-opt", output_dir=str(tmp_path / "rm"), data=data_cfg,
                       ds=DeepSpeedConfig(dtype="fp32"), optim=OptimConfig(learning_rate=1e-3, max_steps=3),
                       progress=False, tensorboard=False)
    m = run_reward(cfg).metrics
    for k in ("eval_accuracy_hard", "initial_eval_accuracy_hard"):
        assert 0.0 <= m[k] <= 1.0, (k, m)
