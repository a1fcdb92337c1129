"""Stage 1: supervised fine-tuning of the actor on prompt + chosen answer, on DeepSpeed.

Same recipe as DeepSpeed-Chat's step 1 (next-token cross-entropy, AdamW with warm-up + cosine,
ZeRO 0-3, gradient checkpointing, gradient accumulation). The held-out loss is the token-weighted
mean over the whole eval split and all ranks, measured before training and at the end; the model
is saved in HuggingFace format to `output_dir` and reloads with `rlhf.models.load_causal_lm`.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from rlhf import deepspeed_utils as dsu
from rlhf.config import DataConfig, DeepSpeedConfig, OptimConfig, StageOutput
from rlhf.metrics import MetricsLogger

logger = logging.getLogger(__name__)


def _default_optim() -> OptimConfig:
    # tiny-opt on the built-in data: held-out loss 5.76 -> 0.52 in these 675 steps (8 s on 2 idle CPU cores).
    return OptimConfig(learning_rate=5e-3, weight_decay=0.0, num_warmup_steps=10,
                       lr_scheduler_type="cosine", num_train_epochs=3)


@dataclass
class SFTConfig:
    model_name_or_path: str = "tiny-opt"
    """Actor to fine-tune: a local HF directory or a built-in name (random weights)."""
    output_dir: str = "output/step1_sft"
    """Where the fine-tuned model (HF format), tokenizer and metrics.jsonl are written."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets and the 3-stage split; stage 1 trains on prompt + chosen."""
    ds: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """ZeRO stage, offload, dtype, batch sizes, accumulation, gradient checkpointing."""
    optim: OptimConfig = field(default_factory=_default_optim)
    """AdamW + schedule; the defaults fit the built-in data with tiny-opt on 2 CPU cores."""
    eval_interval: int = 0
    """Evaluate every this many optimizer steps (0: only before and after training)."""
    log_interval: int = 10
    """Write a train row (mean loss since the last row, lr) every this many optimizer steps."""
    seed: int = 1234
    """Seeds data order and the built-in model's random weights."""
    disable_dropout: bool = False
    """Set every dropout probability to 0 (DeepSpeed-Chat's --disable_dropout)."""
    tensorboard: bool = True
    """Also write TensorBoard scalars under output_dir/tensorboard (when tensorboard is installed)."""
    progress: bool = True
    """Show a tqdm progress bar on rank 0."""


def disable_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


@torch.no_grad()
def evaluate_lm_loss(engine: Any, loader: Any) -> float:
    """Token-weighted next-token cross-entropy over the loader and all ranks (NaN if it is empty).
    With several ranks the DistributedSampler repeats a few rows so every rank has equal batches."""
    engine.eval()
    dev = dsu.device()
    total = torch.zeros(2, dtype=torch.float64, device=dev)  # [loss_sum, num_tokens]
    for batch in loader:
        input_ids = batch["input_ids"].to(dev)  # [B, T]
        labels = batch["labels"].to(dev)  # [B, T]
        logits = engine(input_ids=input_ids, attention_mask=batch["attention_mask"].to(dev), use_cache=False).logits
        shift_logits = logits[:, :-1].flatten(0, 1).float()  # [B*(T-1), V]
        shift_labels = labels[:, 1:].flatten()  # [B*(T-1)]
        total[0] += F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum").double()
        total[1] += (shift_labels != -100).sum()
    engine.train()
    total = dsu.all_reduce_sum(total)
    if total[1] == 0:  # no eval split (eval_fraction 0)
        return float("nan")
    return float(total[0] / total[1])


def run_sft(cfg: SFTConfig) -> StageOutput:
    """Fine-tune, evaluate, save. Returns metrics initial_eval_loss, eval_loss, perplexity, ..."""
    from rlhf.data import build_stage_data
    from rlhf.data.collate import collate_sft
    from rlhf.models import load_causal_lm, load_tokenizer

    start = time.perf_counter()
    dsu.init_distributed()
    dsu.set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    data = build_stage_data(cfg.data, tokenizer, 1)
    collate = lambda b: collate_sft(b, tokenizer.pad_token_id)  # noqa: E731
    ds = cfg.ds
    train_loader = dsu.build_dataloader(data.train, ds.per_device_train_batch_size, collate, shuffle=True, seed=cfg.seed)
    eval_loader = dsu.build_dataloader(data.eval, ds.per_device_eval_batch_size, collate, shuffle=False, seed=cfg.seed)
    num_steps = dsu.num_update_steps(len(train_loader), ds, cfg.optim)

    dtype = dsu.resolve_dtype(ds.dtype)
    model = load_causal_lm(cfg.model_name_or_path, dtype, ds_config=dsu.get_train_ds_config(ds), seed=cfg.seed)
    if cfg.disable_dropout:
        disable_dropout(model)
    engine, _, scheduler = dsu.initialize(model, ds, cfg.optim, num_steps)
    metrics_log = MetricsLogger(cfg.output_dir, "sft", enabled=dsu.is_rank0(), tensorboard=cfg.tensorboard)
    dsu.print_rank0(
        f"[sft] {cfg.model_name_or_path}: {len(data.train)} train / {len(data.eval)} eval sequences, "
        f"{num_steps} optimizer steps (ZeRO-{ds.zero_stage}, {dtype}, world {dsu.get_world_size()}, "
        f"micro-batch {ds.per_device_train_batch_size} x accumulation {ds.gradient_accumulation_steps})"
    )

    initial_eval_loss = evaluate_lm_loss(engine, eval_loader)
    metrics_log.log(0, "eval", eval_loss=initial_eval_loss, perplexity=math.exp(min(initial_eval_loss, 50)))
    dsu.print_rank0(f"[sft] initial eval loss {initial_eval_loss:.4f}")

    dev = dsu.device()
    step, window, last_train_loss = 0, [], float("nan")
    bar = tqdm(total=num_steps, desc="sft", disable=not (cfg.progress and dsu.is_rank0()), dynamic_ncols=True)
    engine.train()
    for epoch in range(cfg.optim.num_train_epochs):
        train_loader.sampler.set_epoch(epoch)
        for batch in train_loader:
            out = engine(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                         labels=batch["labels"].to(dev), use_cache=False)
            engine.backward(out.loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            window.append(out.loss.detach())
            if not boundary:
                continue
            step += 1
            bar.update(1)
            if step % cfg.log_interval == 0 or step == num_steps:
                last_train_loss = float(dsu.all_reduce_mean(torch.stack(window).float().mean()))
                window = []
                metrics_log.log(step, "train", loss=last_train_loss, lr=scheduler.get_last_lr()[0], epoch=epoch)
                bar.set_postfix(loss=f"{last_train_loss:.4f}")
            if cfg.eval_interval and step % cfg.eval_interval == 0 and step < num_steps:
                eval_loss = evaluate_lm_loss(engine, eval_loader)
                metrics_log.log(step, "eval", eval_loss=eval_loss, perplexity=math.exp(min(eval_loss, 50)))
            if step >= num_steps:
                break
        if step >= num_steps:
            break
    bar.close()

    eval_loss = evaluate_lm_loss(engine, eval_loader)
    metrics_log.log(step, "eval", eval_loss=eval_loss, perplexity=math.exp(min(eval_loss, 50)))
    dsu.save_hf_model(engine, tokenizer, cfg.output_dir, ds.zero_stage)
    metrics = {
        "initial_eval_loss": initial_eval_loss,
        "eval_loss": eval_loss,
        "perplexity": math.exp(min(eval_loss, 50)),
        "train_loss": last_train_loss,
        "steps": step,
    }
    metrics_log.summary(metrics, step=step, output_dir=cfg.output_dir)
    return StageOutput(output_dir=cfg.output_dir, metrics=metrics, wall_time_s=time.perf_counter() - start)
