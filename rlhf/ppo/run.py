"""Stage 3 end to end: data -> engines -> (resume) -> eval -> PPO steps with checkpoints -> eval -> save.

Outputs under cfg.output_dir:
    actor/ actor_ema/ critic/    HF format (LoRA merged); actor loads with AutoModelForCausalLM
    checkpoints/step_N/          resumable training state (see checkpoint.py)
    metrics.jsonl                one row per step (split "train"), eval rows, a summary row
"""
from __future__ import annotations

import json
import logging
import os
import time
import zlib
from typing import Any

import torch
from torch.utils.data import Subset
from tqdm.auto import tqdm

from rlhf import deepspeed_utils as dsu
from rlhf.config import StageOutput
from rlhf.lora import lora_merged, strip_lora_keys
from rlhf.metrics import METRICS_FILE, MetricsLogger, read_metrics
from rlhf.ppo.checkpoint import CheckpointManager
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.loader import CyclingLoader, ResumableLoader
from rlhf.ppo.trainer import PPOTrainer, num_optimizer_steps

logger = logging.getLogger(__name__)


LOG_KEYS = ("reward_mean", "reward_std", "kl", "actor_loss", "critic_loss", "actor_clipfrac", "critic_clipfrac",
            "ptx_loss", "answer_len", "actor_lr", "time_generation_s", "time_experience_s", "time_training_s",
            "samples_per_s")
"""The per-step console line (every metric goes to metrics.jsonl)."""


def save_hf(engine: Any, tokenizer: Any, output_dir: str, zero_stage: int) -> None:
    """HF-format save with LoRA adapters folded into the weights (all ranks call)."""
    model = dsu.unwrap(engine)
    with lora_merged(model):
        state = dsu.gather_state_dict(model, zero_stage)
    if dsu.is_rank0():
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir, state_dict=strip_lora_keys(state))
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
    dsu.barrier()


def _is_builtin(paths: list[str]) -> bool:
    return all(p == "builtin" for p in paths)


def _rows_before_resume(output_dir: str, ckpt_path: str | None) -> list[dict]:
    """metrics.jsonl rows a resumed run keeps: those up to the checkpoint's step (the steps after
    it are redone), without the earlier run's summary."""
    if ckpt_path is None or not os.path.isfile(os.path.join(output_dir, METRICS_FILE)):
        return []
    step = int(os.path.basename(ckpt_path).split("_")[-1])
    return [r for r in read_metrics(output_dir)
            if r.get("split") != "summary" and (r["step"] <= step if r.get("split") == "train" else r["step"] == 0)]


def evaluate(trainer: PPOTrainer, eval_loader: ResumableLoader, score_fn) -> dict:
    """trainer.evaluate on the held-out prompts; NaNs (and a log line) when there are none."""
    if len(eval_loader.dataset) == 0:
        dsu.print_rank0("[ppo] no held-out prompts (--eval_prompts 0 or an empty eval split): reward not measured")
        return {"reward": float("nan"), "kl": float("nan"), "answer_len": float("nan")}
    return trainer.evaluate(eval_loader, score_fn)


def _builtin_grader():
    """score_answer of the built-in data, None for a prompt it cannot parse (e.g. cut by truncation)."""
    from rlhf.data.builtin import score_answer

    def grade(prompt: str, answer: str) -> float | None:
        try:
            return score_answer(prompt, answer)
        except ValueError:
            return None

    return grade


def pad_lm_batch(rows: list[dict], pad_token_id: int) -> dict:
    """Right-padded LM batch (ptx): input_ids, attention_mask, labels (-100 on padding)."""
    ids = [torch.as_tensor(r["input_ids"], dtype=torch.long) for r in rows]
    labels = [torch.as_tensor(r["labels"], dtype=torch.long) if "labels" in r else i for r, i in zip(rows, ids)]
    L = max(len(i) for i in ids)
    out_ids = torch.full((len(ids), L), pad_token_id, dtype=torch.long)  # [B, L]
    out_lab = torch.full((len(ids), L), -100, dtype=torch.long)  # [B, L]
    attn = torch.zeros((len(ids), L), dtype=torch.long)  # [B, L]
    for b, (i, lab) in enumerate(zip(ids, labels)):
        out_ids[b, : len(i)], out_lab[b, : len(lab)], attn[b, : len(i)] = i, lab, 1
    out_lab[attn == 0] = -100
    return {"input_ids": out_ids, "attention_mask": attn, "labels": out_lab}


def run_ppo(cfg: PPOConfig, stop_after: int | None = None) -> StageOutput:
    """Train stage 3. `stop_after` ends the loop after that many steps *without* the final
    evaluation and save, as a kill would (tests of --resume)."""
    from rlhf.data import build_stage_data
    from rlhf.data.collate import collate_prompts
    from rlhf.models import load_tokenizer

    start = time.perf_counter()
    dsu.init_distributed()
    dsu.set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.actor_model_name_or_path)
    cfg.data.max_prompt_seq_len = cfg.max_prompt_seq_len
    data = build_stage_data(cfg.data, tokenizer, 3)
    collate = lambda b: collate_prompts(b, tokenizer.pad_token_id)  # noqa: E731
    loader = ResumableLoader(data.train, cfg.per_device_generation_batch_size, collate, seed=cfg.seed)
    eval_set = Subset(data.eval, range(min(cfg.eval_prompts, len(data.eval))))
    eval_loader = ResumableLoader(eval_set, cfg.per_device_generation_batch_size, collate, seed=cfg.seed,
                                  shuffle=False, drop_last=False)
    steps_per_epoch = len(loader) // cfg.generation_batches
    if steps_per_epoch == 0:
        raise ValueError(f"{len(data.train)} stage-3 prompts are fewer than one step's "
                         f"{cfg.per_device_generation_batch_size} x {cfg.generation_batches} x {dsu.get_world_size()} ranks")
    total_steps = steps_per_epoch * cfg.num_train_epochs
    if cfg.max_steps > 0:
        total_steps = min(total_steps, cfg.max_steps)

    trainer = PPOTrainer.from_config(cfg, num_training_steps=num_optimizer_steps(cfg, total_steps))
    unsup = None
    if cfg.unsupervised_dataset_name:
        from rlhf.data import build_pretrain_data

        ptx_data = build_pretrain_data([cfg.unsupervised_dataset_name], tokenizer,
                                       cfg.max_prompt_seq_len + cfg.max_answer_seq_len)
        unsup = CyclingLoader(ResumableLoader(ptx_data, cfg.per_device_training_batch_size,
                                              lambda b: pad_lm_batch(b, tokenizer.pad_token_id), seed=cfg.seed))
    score_fn = _builtin_grader() if _is_builtin(cfg.data.data_path) else None
    ckpt = CheckpointManager(os.path.join(cfg.output_dir, "checkpoints"), cfg.save_total_limit)
    path = ckpt.latest() if cfg.resume else None
    kept_rows = _rows_before_resume(cfg.output_dir, path) if dsu.is_rank0() else []
    mlog = MetricsLogger(cfg.output_dir, "ppo", enabled=dsu.is_rank0())
    if kept_rows:  # the logger starts the file afresh; keep the history up to the checkpoint
        with open(mlog.path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept_rows)

    state: dict = {"step": 0, "epoch": 0, "batch": 0}
    if cfg.resume:
        if path is None:
            dsu.print_rank0(f"[ppo] --resume: no complete checkpoint under {ckpt.root}; starting from step 0")
        else:
            state = ckpt.load(path, trainer.actor, trainer.critic, trainer.ema)
            trainer.global_step = state["step"]
            if unsup is not None and "unsup" in state:
                unsup.epoch, unsup.batch = state["unsup"]["epoch"], state["unsup"]["batch"]
            dsu.print_rank0(f"[ppo] resumed from {path}: step {state['step']}, epoch {state['epoch']}, batch {state['batch']}")
    dsu.print_rank0(
        f"[ppo] {len(data.train)} train / {len(eval_set)} eval prompts; {total_steps} steps of "
        f"{cfg.per_device_generation_batch_size} x {cfg.generation_batches} prompts x {dsu.get_world_size()} ranks; "
        f"generation: {trainer.generator.name}")

    before = state.get("eval_before")
    if before is None:
        before = evaluate(trainer, eval_loader, score_fn)
        mlog.log(0, "eval", **before)
    dsu.print_rank0(f"[ppo] before training: reward {before['reward']:.4f}"
                    + (f", objective score {before['objective_score']:.3f}" if "objective_score" in before else ""))

    step, last = state["step"], {}
    bar = tqdm(total=total_steps, initial=step, desc="ppo", disable=not (cfg.progress_bar and dsu.is_rank0()),
               dynamic_ncols=True)
    epoch, start_batch = state["epoch"], state["batch"]
    done = step >= total_steps
    while not done and epoch < cfg.num_train_epochs:
        group: list = []
        group_ids: list[int] = []
        for b, ids, batch in loader.iter_from(epoch, start_batch):
            group.append(batch)
            group_ids += ids
            if len(group) < cfg.generation_batches:
                continue
            ub = [unsup.next() for _ in range(max(1, len(group) * cfg.per_device_generation_batch_size
                                                   // cfg.per_device_training_batch_size))] if unsup else None
            last = trainer.step(group, ub)
            data_crc = zlib.crc32(",".join(map(str, group_ids)).encode())  # which prompts, in order
            group, group_ids = [], []
            step = trainer.global_step
            pos = {"step": step, "epoch": epoch, "batch": b + 1}
            mlog.log(step, "train", epoch=epoch, batch=b + 1, data_crc=data_crc,
                     **{k: v for k, v in last.items() if k != "step"})
            bar.update(1)
            bar.set_postfix(reward=f"{last['reward_mean']:.3f}", kl=f"{last['kl']:.3f}",
                            actor_loss=f"{last['actor_loss']:.3f}", len=f"{last['answer_len']:.1f}")
            if cfg.print_answers and dsu.is_rank0():
                prompt, answer = trainer.sample_text(0)
                tqdm.write(f"[ppo] step {step} sample: {prompt!r} -> {answer!r}")
            # on a terminal the bar's postfix is the per-step log; without a bar, one line per step
            if bar.disable and dsu.is_rank0() and cfg.log_every and step % cfg.log_every == 0:
                print(f"[ppo] step {step}/{total_steps}: " + ", ".join(
                    f"{k} {last[k]:.4g}" for k in LOG_KEYS if k in last), flush=True)
            if cfg.save_steps and (step % cfg.save_steps == 0 or step >= total_steps):
                ckpt_state = {**pos, "eval_before": before, "last_metrics": last}
                if unsup is not None:
                    ckpt_state["unsup"] = unsup.position()
                ckpt.save(step, trainer.actor, trainer.critic, ckpt_state, trainer.ema)
            if step >= total_steps or (stop_after is not None and step >= stop_after):
                done = True
                break
        epoch, start_batch = epoch + 1, 0
    bar.close()
    if stop_after is not None and step >= stop_after and step < total_steps:
        return StageOutput(output_dir=cfg.output_dir, metrics={"stopped_at": step}, wall_time_s=time.perf_counter() - start)

    after = evaluate(trainer, eval_loader, score_fn)
    mlog.log(step, "eval", **after)
    e = trainer.engines
    save_hf(trainer.actor, tokenizer, os.path.join(cfg.output_dir, "actor"), e.actor_ds.zero_stage)
    save_hf(trainer.critic, tokenizer, os.path.join(cfg.output_dir, "critic"), e.critic_ds.zero_stage)
    if trainer.ema is not None:
        with trainer.ema.swapped_in(dsu.unwrap(trainer.actor)):
            save_hf(trainer.actor, tokenizer, os.path.join(cfg.output_dir, "actor_ema"), e.actor_ds.zero_stage)
    metrics = {
        "reward_before": before["reward"], "reward_after": after["reward"], "kl": after["kl"],
        "kl_before": before["kl"], "answer_len_before": before["answer_len"], "answer_len_after": after["answer_len"],
        "steps": step, "last_train_reward": last.get("reward_mean", float("nan")),
    }
    if "objective_score" in after:
        metrics.update(objective_score_before=before["objective_score"], objective_score_after=after["objective_score"])
    mlog.summary(metrics, step=step, output_dir=cfg.output_dir)
    return StageOutput(output_dir=cfg.output_dir, metrics=metrics, wall_time_s=time.perf_counter() - start)
