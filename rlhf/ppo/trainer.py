"""PPOTrainer: one stage-3 step = generate -> experience -> PPO updates (DeepSpeed-Chat's recipe).

    step(prompt_batch)
      generation   the actor answers the prompts (HF generate or the hybrid engine)
      experience   actor + reference logprobs, critic values, reward-model scores (no grad);
                   per-token rewards with the KL penalty; GAE advantages and returns
      training     ppo_epochs x mini-batches: clipped policy loss (+ unsup_coef * ptx LM loss, in
                   the same backward) -> actor step (-> EMA update); clipped value loss -> critic step
Phase times are wall clock with a CUDA synchronize at each boundary, so they add up to the step.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Iterable

import torch

from rlhf import deepspeed_utils as dsu
from rlhf.ema import EMA
from rlhf.ppo.advantages import compute_rewards, gae, logprobs_from_logits, masked_mean
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.engines import RLHFEngines, build_engines
from rlhf.ppo.experience import answer_masks, concat_experience, position_ids_from_mask, split_experience
from rlhf.ppo.generation import Generator, make_generator
from rlhf.ppo.losses import actor_loss, critic_loss

logger = logging.getLogger(__name__)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _lm_forward(engine: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits [B, L, V] with positions counted over real tokens (left padding), as in generate."""
    return engine(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_t KL(p_t || q_t) over masked positions -> [B]; exact over the vocabulary, so >= 0 (the
    per-step training figure is the cheaper sampled estimate sum_t log p - log q)."""
    out = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)  # [B]
    for b in range(logits.shape[0]):  # row by row: [T, V] fp32 at a time, not [B, T, V]
        m = mask[b].bool()
        logp = torch.log_softmax(logits[b][m].float(), -1)  # [n, V]
        logq = torch.log_softmax(ref_logits[b][m].float(), -1)  # [n, V]
        out[b] = (logp.exp() * (logp - logq)).sum().double()
    return out


def num_optimizer_steps(cfg: PPOConfig, ppo_steps: int) -> int:
    """Actor (and critic) optimizer steps in `ppo_steps` PPO steps: sizes the lr schedules."""
    minibatches = math.ceil(cfg.per_device_generation_batch_size * cfg.generation_batches
                            / cfg.per_device_training_batch_size)
    return max(1, ppo_steps * cfg.ppo_epochs * minibatches // cfg.gradient_accumulation_steps)


class PPOTrainer:
    def __init__(self, cfg: PPOConfig, engines: RLHFEngines, generator: Generator | None = None):
        self.cfg = cfg
        self.engines = engines
        self.actor, self.ref, self.critic, self.reward = engines.actor, engines.ref, engines.critic, engines.reward
        self.tokenizer = engines.tokenizer
        self.pad_token_id = int(self.tokenizer.pad_token_id)
        self.eos_token_id = int(self.tokenizer.eos_token_id)
        self.generator = generator or make_generator(cfg, self.actor, self.tokenizer)
        self.ema = EMA(dsu.unwrap(self.actor), cfg.ema_decay) if cfg.enable_ema else None
        self.device = dsu.device()
        self.global_step = 0
        self.last_sequences: tuple | None = None

    @classmethod
    def from_config(cls, cfg: PPOConfig, num_training_steps: int | None = None) -> "PPOTrainer":
        """Build the four engines. `num_training_steps` sizes the lr schedule (optimizer steps)."""
        dsu.init_distributed()
        dsu.set_seed(cfg.seed)
        if num_training_steps is None:
            num_training_steps = num_optimizer_steps(cfg, max(cfg.max_steps, 1))
        return cls(cfg, build_engines(cfg, num_training_steps))

    # ------------------------------------------------------------------ generation + experience
    @torch.no_grad()
    def generate(self, prompt_batch: dict, greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (sequences [B, L], prompt attention mask [B, Lp]) on this rank's device."""
        input_ids = prompt_batch["input_ids"].to(self.device)  # [B, Lp]
        prompt_mask = prompt_batch["attention_mask"].to(self.device)  # [B, Lp]
        seq = self.generator.generate(input_ids, prompt_mask, greedy=greedy)  # [B, Lp + n]
        self.generator.release()
        return seq, prompt_mask

    @torch.no_grad()
    def make_experience(self, seq: torch.Tensor, prompt_mask: torch.Tensor) -> dict:
        """Score generated sequences: logprobs, values, reward scores, rewards, advantages."""
        c = self.cfg
        Lp = prompt_mask.shape[1]
        attention_mask, action_mask = answer_masks(seq, prompt_mask, self.eos_token_id, self.pad_token_id)
        self.actor.eval()
        self.critic.eval()
        logprobs = logprobs_from_logits(_lm_forward(self.actor, seq, attention_mask)[:, :-1], seq[:, 1:])  # [B, L-1]
        ref_logprobs = logprobs_from_logits(_lm_forward(self.ref, seq, attention_mask)[:, :-1], seq[:, 1:])  # [B, L-1]
        reward_score = self.reward.forward_value(seq, attention_mask, prompt_length=Lp)["chosen_end_scores"].float()  # [B]
        values = self.critic.forward_value(seq, attention_mask, return_value_only=True)[:, :-1].float()  # [B, L-1]
        self.actor.train()
        self.critic.train()
        rewards = compute_rewards(logprobs, ref_logprobs, reward_score, action_mask, c.kl_ctl, c.clip_reward_value)
        advantages, returns = gae(values, rewards, action_mask, c.gamma, c.lam)
        return {
            "prompt_len": Lp, "input_ids": seq, "attention_mask": attention_mask, "action_mask": action_mask,
            "logprobs": logprobs, "ref_logprobs": ref_logprobs, "values": values, "reward_score": reward_score,
            "rewards": rewards, "advantages": advantages, "returns": returns,
        }

    def generate_experience(self, prompt_batch: dict) -> dict:
        """Generation and experience for one prompt batch; phase times in exp['timing']."""
        _sync()
        t0 = time.perf_counter()
        seq, prompt_mask = self.generate(prompt_batch)
        _sync()
        t1 = time.perf_counter()
        gen_phases = self.generator.phase_times()
        exp = self.make_experience(seq, prompt_mask)
        _sync()
        exp["timing"] = {"generation": t1 - t0, "experience": time.perf_counter() - t1, **gen_phases}
        return exp

    # ------------------------------------------------------------------ PPO update
    def train_rlhf(self, exp: dict, unsup_batch: dict | None = None) -> dict:
        """One actor and one critic update on a mini-batch of experience (+ a ptx batch)."""
        c = self.cfg
        seq, attn, mask = exp["input_ids"], exp["attention_mask"], exp["action_mask"]
        logits = _lm_forward(self.actor, seq, attn)  # [B, L, V]
        logprobs = logprobs_from_logits(logits[:, :-1], seq[:, 1:])  # [B, L-1]
        a_loss, a_clip = actor_loss(logprobs, exp["logprobs"], exp["advantages"], mask, c.cliprange)
        loss = a_loss
        out = {}
        if unsup_batch is not None:
            ptx = self.actor(input_ids=unsup_batch["input_ids"].to(self.device),
                             attention_mask=unsup_batch["attention_mask"].to(self.device),
                             labels=unsup_batch["labels"].to(self.device), use_cache=False).loss
            loss = a_loss + c.unsup_coef * ptx
            out["ptx_loss"] = ptx.detach()
        self.actor.backward(loss)
        boundary = self.actor.is_gradient_accumulation_boundary()
        self.actor.step()
        if self.ema is not None and boundary:
            self.ema.update(dsu.unwrap(self.actor))

        values = self.critic.forward_value(seq, attn, return_value_only=True, use_cache=False)[:, :-1]  # [B, L-1]
        c_loss, c_clip = critic_loss(values, exp["values"], exp["returns"], mask, c.cliprange_value)
        self.critic.backward(c_loss)
        self.critic.step()
        with torch.no_grad():
            approx_kl = masked_mean(exp["logprobs"] - logprobs.detach(), mask)
        out.update(actor_loss=a_loss.detach(), critic_loss=c_loss.detach(), actor_clipfrac=a_clip,
                   critic_clipfrac=c_clip, approx_kl_old_new=approx_kl)
        return out

    def step(self, prompt_batch: dict | list[dict], unsup_batches: Iterable[dict] | None = None) -> dict:
        """Generation (of every batch given) + experience + ppo_epochs of updates -> metrics
        (means over ranks; counts summed over ranks)."""
        c = self.cfg
        batches = prompt_batch if isinstance(prompt_batch, list) else [prompt_batch]
        t_start = time.perf_counter()
        exps = [self.generate_experience(b) for b in batches]
        t_gen = sum(e["timing"]["generation"] for e in exps)
        t_exp = sum(e["timing"]["experience"] for e in exps)
        gen_phases = {f"time_{k}_s": sum(e["timing"][k] for e in exps)  # hybrid engine: prefill / decode
                      for k in exps[0]["timing"] if k not in ("generation", "experience")}
        exp = concat_experience([{k: v for k, v in e.items() if k != "timing"} for e in exps], self.pad_token_id)
        self.last_sequences = (exp["input_ids"], exp["action_mask"], exp["prompt_len"])  # for --print_answers

        _sync()
        t0 = time.perf_counter()
        unsup = list(unsup_batches) if unsup_batches is not None else []
        train_stats: list[dict] = []
        mini = split_experience(exp, c.per_device_training_batch_size)
        for _ in range(c.ppo_epochs):
            for i, mb in enumerate(mini):
                ub = unsup[len(train_stats) % len(unsup)] if unsup else None
                train_stats.append(self.train_rlhf(mb, ub))
        _sync()
        t_train = time.perf_counter() - t0
        self.global_step += 1
        metrics = self._metrics(exp, train_stats, t_gen, t_exp, t_train, time.perf_counter() - t_start)
        metrics.update(gen_phases)
        return metrics

    # ------------------------------------------------------------------ metrics / evaluation
    def _metrics(self, exp: dict, stats: list[dict], t_gen: float, t_exp: float, t_train: float, t_step: float) -> dict:
        mask = exp["action_mask"].float()
        score = exp["reward_score"]
        kl_seq = ((exp["logprobs"] - exp["ref_logprobs"]) * mask).sum(-1)  # [B] KL(actor || ref) per answer
        ans_len = mask.sum(-1)  # [B]
        local = {
            "reward_mean": score.mean(), "reward_std": score.std(unbiased=False), "kl": kl_seq.mean(),
            "answer_len": ans_len.mean(), "values_mean": masked_mean(exp["values"], mask),
            "returns_mean": masked_mean(exp["returns"], mask), "advantages_mean": masked_mean(exp["advantages"], mask),
        }
        for k in stats[0]:
            local[k] = torch.stack([torch.as_tensor(s[k]).float() for s in stats]).mean()
        keys = sorted(local)
        vec = torch.stack([local[k].float().detach().to(self.device) for k in keys])  # [K]
        vec = dsu.all_reduce_mean(vec)
        counts = dsu.all_reduce_sum(torch.tensor([float(mask.shape[0]), float(mask.sum())], device=self.device))
        m = {k: float(v) for k, v in zip(keys, vec.tolist())}
        num_samples, gen_tokens = int(counts[0]), int(counts[1])
        m.update(
            step=self.global_step, num_samples=num_samples, gen_tokens=gen_tokens,
            actor_lr=float(self.actor.get_lr()[0]), critic_lr=float(self.critic.get_lr()[0]),
            time_generation_s=t_gen, time_experience_s=t_exp, time_training_s=t_train, time_step_s=t_step,
            samples_per_s=num_samples / max(t_step, 1e-9), generator=self.generator.name,
        )
        return m

    @torch.no_grad()
    def evaluate(self, prompt_loader: Iterable[dict], score_fn=None) -> dict:
        """On held-out prompts, the actor's greedy answers: mean reward-model score, KL(actor || ref)
        (exact, of the next-token distributions, summed over the answer), answer length, and the
        mean of `score_fn(prompt, answer)` when given; averaged over all ranks' prompts."""
        total = torch.zeros(6, dtype=torch.float64, device=self.device)  # score, objective, len, kl sums; n, n scored
        self.actor.eval()
        for batch in prompt_loader:
            seq, prompt_mask = self.generate(batch, greedy=True)
            Lp = prompt_mask.shape[1]
            attention_mask, action_mask = answer_masks(seq, prompt_mask, self.eos_token_id, self.pad_token_id)
            score = self.reward.forward_value(seq, attention_mask, prompt_length=Lp)["chosen_end_scores"].double()  # [B]
            actor_logits = _lm_forward(self.actor, seq, attention_mask)[:, :-1]  # [B, L-1, V]
            ref_logits = _lm_forward(self.ref, seq, attention_mask)[:, :-1]  # [B, L-1, V]
            total[0] += score.sum()
            total[2] += action_mask.sum()
            total[3] += token_kl(actor_logits, ref_logits, action_mask).sum()
            total[4] += seq.shape[0]
            if score_fn is not None:
                for b in range(seq.shape[0]):
                    prompt = self.tokenizer.decode(batch["input_ids"][b][prompt_mask[b].bool().cpu()], skip_special_tokens=True)
                    answer = self.tokenizer.decode(seq[b, Lp:][action_mask[b, Lp - 1:].bool()], skip_special_tokens=True)
                    graded = score_fn(prompt, answer)  # None: this prompt cannot be graded
                    if graded is not None:
                        total[1] += graded
                        total[5] += 1
        self.actor.train()
        total = dsu.all_reduce_sum(total)
        n = max(float(total[4]), 1.0)
        out = {"reward": float(total[0]) / n, "answer_len": float(total[2]) / n, "kl": float(total[3]) / n}
        if score_fn is not None and total[5] > 0:
            out["objective_score"] = float(total[1]) / float(total[5])
        return out

    def close(self) -> None:
        """Free the generator and the four engines (benchmarks build several systems in one process)."""
        self.generator.release()
        for name in ("actor", "ref", "critic", "reward"):
            engine = getattr(self, name)
            if hasattr(engine, "destroy"):
                engine.destroy()
            setattr(self, name, None)
        self.engines = self.generator = self.ema = None
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def sample_text(self, row: int = 0) -> tuple[str, str]:
        """(prompt, answer) text of one row of the last step's experience."""
        seq, action_mask, Lp = self.last_sequences
        prompt = self.tokenizer.decode(seq[row, :Lp], skip_special_tokens=True)
        answer = self.tokenizer.decode(seq[row, Lp:][action_mask[row, Lp - 1:].bool()], skip_special_tokens=True)
        return prompt, answer

    def evaluate_reward(self, prompt_loader: Iterable[dict]) -> float:
        return self.evaluate(prompt_loader)["reward"]


def run_ppo(cfg: PPOConfig):
    """Stage 3 end to end (see rlhf/ppo/run.py)."""
    from rlhf.ppo.run import run_ppo as _run

    return _run(cfg)
