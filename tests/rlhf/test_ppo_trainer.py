"""PPOTrainer on tiny models, in process (CPU, gloo): ZeRO-3 step, experience consistent with
generation, ptx mixed into the same update, hybrid-engine fallback."""
import logging

import pytest
import torch

from rlhf import deepspeed_utils as dsu
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.trainer import PPOTrainer

QUESTIONS = ["What sound does a cow make?", "Name a fruit.", "What is the opposite of hot?",
             "Write the word pear in capitals.", "What color is snow?", "Can you name a tree?"]


def prompt_batch(tokenizer, n=4, offset=0):
    tokenizer.padding_side = "left"
    texts = [f" Human: {QUESTIONS[(offset + i) % len(QUESTIONS)]} Assistant:" for i in range(n)]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def small_cfg(**kw):
    base = dict(actor_model_name_or_path="tiny-opt", critic_model_name_or_path="tiny-opt",
                per_device_generation_batch_size=4, per_device_training_batch_size=4, max_answer_seq_len=12,
                num_warmup_steps=0, actor_learning_rate=1e-3, critic_learning_rate=1e-3, dtype="fp32",
                progress_bar=False)
    base.update(kw)
    return PPOConfig(**base)


def _params(engine):
    return {n: v.clone() for n, v in dsu.gather_state_dict(dsu.unwrap(engine), 3).items()}


def test_zero3_step_trains_actor_and_critic_only():
    tr = PPOTrainer.from_config(small_cfg(actor_zero_stage=3, critic_zero_stage=3), num_training_steps=4)
    assert tr.actor.zero_optimization_stage() == 3 and tr.ref.zero_optimization_stage() == 3
    before = {k: _params(e) for k, e in [("actor", tr.actor), ("ref", tr.ref), ("critic", tr.critic), ("reward", tr.reward)]}
    m = tr.step(prompt_batch(tr.tokenizer))
    for key in ("reward_mean", "reward_std", "kl", "actor_loss", "critic_loss", "actor_clipfrac",
                "critic_clipfrac", "answer_len", "time_generation_s", "time_experience_s", "time_training_s"):
        assert torch.isfinite(torch.tensor(m[key])), key
    # one mini-batch: the update starts from the experience's policy (ratio 1, nothing clipped)
    assert abs(m["approx_kl_old_new"]) < 1e-5 and m["actor_clipfrac"] == 0.0
    assert m["num_samples"] == 4 and 4 <= m["gen_tokens"] <= 4 * 12 and m["kl"] == pytest.approx(0.0, abs=1e-5)
    after = {k: _params(e) for k, e in [("actor", tr.actor), ("ref", tr.ref), ("critic", tr.critic), ("reward", tr.reward)]}
    changed = {k: any(not torch.equal(before[k][n], after[k][n]) for n in before[k]) for k in before}
    assert changed == {"actor": True, "ref": False, "critic": True, "reward": False}
    m2 = tr.step(prompt_batch(tr.tokenizer, offset=2))
    assert m2["step"] == 2 and m2["kl"] != 0.0  # the actor moved away from the reference


def test_experience_logprobs_match_generation_scores():
    """Actor logprobs of the experience (a fresh forward with left padding and position ids) equal
    the scores `generate` used token by token."""
    tr = PPOTrainer.from_config(small_cfg(actor_model_name_or_path="tiny-llama", critic_model_name_or_path="tiny-opt"),
                                num_training_steps=1)
    batch = prompt_batch(tr.tokenizer, n=3)
    model = dsu.unwrap(tr.actor).eval()
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=8,
                         do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=tr.pad_token_id, eos_token_id=tr.eos_token_id)
    seq, Lp = out.sequences, batch["input_ids"].shape[1]
    gen_lp = torch.stack([torch.log_softmax(l.float(), -1).gather(-1, seq[:, Lp + i, None])[:, 0]
                          for i, l in enumerate(out.logits)], 1)  # [B, n]
    exp = tr.make_experience(seq, batch["attention_mask"])
    mask = exp["action_mask"][:, Lp - 1:].bool()
    torch.testing.assert_close(exp["logprobs"][:, Lp - 1:][mask], gen_lp[mask], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(exp["ref_logprobs"], exp["logprobs"], rtol=1e-5, atol=1e-5)  # same weights


def test_ptx_loss_is_mixed_into_the_same_actor_update(monkeypatch):
    tr = PPOTrainer.from_config(small_cfg(unsup_coef=3.0), num_training_steps=2)
    exp = tr.generate_experience(prompt_batch(tr.tokenizer))
    tok = tr.tokenizer
    tok.padding_side = "right"
    enc = tok([" A cow says moo. Snow is white.", " The opposite of hot is cold."], padding=True, return_tensors="pt")
    unsup = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
             "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}
    model = dsu.unwrap(tr.actor)
    with torch.no_grad():
        ptx_ref = model(**unsup).loss
    seen, steps = [], []
    real_backward, real_step = tr.actor.backward, tr.actor.step
    monkeypatch.setattr(tr.actor, "backward", lambda loss, **kw: (seen.append(loss.detach()), real_backward(loss, **kw))[1])
    monkeypatch.setattr(tr.actor, "step", lambda **kw: (steps.append(1), real_step(**kw))[1])
    out = tr.train_rlhf({k: v for k, v in exp.items() if k != "timing"}, unsup)
    assert len(seen) == 1 and len(steps) == 1  # one backward, one optimizer step
    torch.testing.assert_close(out["ptx_loss"], ptx_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen[0], out["actor_loss"] + 3.0 * ptx_ref, rtol=1e-5, atol=1e-6)


def test_hybrid_engine_request_falls_back_or_serves(caplog):
    """--enable_hybrid_engine: the engine serves where it can; else HF generate, with one warning."""
    from rlhf.ppo.generation import HFGenerator, make_generator

    tr = PPOTrainer.from_config(small_cfg(), num_training_steps=1)
    cfg = small_cfg(enable_hybrid_engine=True, hybrid_num_blocks=32)
    with caplog.at_level(logging.WARNING, logger="rlhf.ppo.generation"):
        gen = make_generator(cfg, tr.actor, tr.tokenizer)
    if gen.name == "hf":
        assert len([r for r in caplog.records if "falling back to HF generate" in r.message]) == 1
        return
    batch = prompt_batch(tr.tokenizer)
    hybrid = gen.generate(batch["input_ids"], batch["attention_mask"])
    hf = HFGenerator(cfg, tr.actor, tr.tokenizer).generate(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(hybrid[:, :hf.shape[1]], hf)  # greedy: same tokens


def test_lora_actor_critic_train_adapters_only_and_save_merged(tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from rlhf.lora import has_lora
    from rlhf.ppo.run import save_hf

    tr = PPOTrainer.from_config(small_cfg(actor_lora_dim=4, critic_lora_dim=4, only_optimize_lora=True,
                                          actor_lora_learning_rate=5e-3), num_training_steps=2)
    actor = dsu.unwrap(tr.actor)
    assert has_lora(actor) and has_lora(dsu.unwrap(tr.critic))
    lrs = sorted(g["lr"] for g in tr.actor.optimizer.param_groups)
    assert lrs == [5e-3]  # only the adapter group is trained, at the LoRA learning rate
    before = {n: p.detach().clone() for n, p in actor.named_parameters()}
    tr.step(prompt_batch(tr.tokenizer))
    changed = {n for n, p in actor.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    batch = prompt_batch(tr.tokenizer)
    actor.eval()
    with torch.no_grad():
        expected = actor(**batch).logits
    save_hf(tr.actor, tr.tokenizer, str(tmp_path / "actor"), zero_stage=0)
    unset_hf_deepspeed_config()
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "actor")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=1e-4, atol=1e-4)


def test_offloaded_reference_is_a_copy_of_the_actor():
    """--offload_reference_model: the reference is a ZeRO-3 engine with CPU parameters, and it starts
    equal to the actor (the first step's KL is 0), even for a built-in random-weight name."""
    tr = PPOTrainer.from_config(small_cfg(offload_reference_model=True), num_training_steps=2)
    assert tr.ref.zero_optimization_stage() == 3
    assert tr.ref.config["zero_optimization"]["offload_param"]["device"] == "cpu"
    m = tr.step(prompt_batch(tr.tokenizer))
    assert m["kl"] == pytest.approx(0.0, abs=1e-5)
