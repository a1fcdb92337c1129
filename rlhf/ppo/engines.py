"""The four stage-3 models, each on its own DeepSpeed engine.

    actor      trained   ZeRO --actor_zero_stage   from the SFT model (+ LoRA)
    reference  frozen    ZeRO-3 if the actor is, else 0; ZeRO-3 + CPU parameter offload with
                         --offload_reference_model (the reference is only read once per step)
    critic     trained   ZeRO --critic_zero_stage  from the reward model (+ LoRA)
    reward     frozen    ZeRO-3 if the critic is, else 0

DeepSpeed-Chat's DeepSpeedRLHFEngine, with our client AdamW (no JIT builds) and a separate
learning rate for LoRA parameters.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rlhf import deepspeed_utils as dsu
from rlhf.config import DeepSpeedConfig
from rlhf.lora import convert_linear_layer_to_lora, only_optimize_lora_parameters, optimizer_param_groups
from rlhf.schedule import build_lr_scheduler

logger = logging.getLogger(__name__)


@dataclass
class RLHFEngines:
    actor: Any
    ref: Any
    critic: Any
    reward: Any
    tokenizer: Any
    actor_ds: DeepSpeedConfig
    critic_ds: DeepSpeedConfig


def _train_ds(cfg: Any, zero_stage: int, grad_ckpt: bool) -> DeepSpeedConfig:
    return DeepSpeedConfig(
        zero_stage=zero_stage,
        offload=cfg.offload,
        dtype=cfg.dtype,
        gradient_checkpointing=grad_ckpt,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        per_device_train_batch_size=cfg.per_device_training_batch_size,
        per_device_eval_batch_size=cfg.per_device_generation_batch_size,
    )


def _set_dropout(model: nn.Module, p: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
    for key in ("dropout", "attention_dropout", "activation_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop"):
        if hasattr(model.config, key):
            setattr(model.config, key, p)


def init_trained_engine(
    model: nn.Module, ds: DeepSpeedConfig, lr: float, lora_lr: float | None, weight_decay: float,
    lr_scheduler_type: str, num_warmup_steps: int, num_training_steps: int,
) -> tuple[Any, Any, Any]:
    """deepspeed.initialize with AdamW over DeepSpeed-Chat's groups (LoRA gets `lora_lr`)."""
    import deepspeed

    if ds.gradient_checkpointing:
        dsu.enable_gradient_checkpointing(model)
    groups = optimizer_param_groups(model, weight_decay, lora_lr)
    fused = torch.cuda.is_available() and not ds.offload
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused or None)
    scheduler = build_lr_scheduler(
        optimizer, kind=lr_scheduler_type, num_warmup_steps=num_warmup_steps,
        num_training_steps=max(1, num_training_steps),
    )
    engine, opt, _, sched = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=dsu.get_train_ds_config(ds), dist_init_required=False,
    )
    return engine, opt, sched


@torch.no_grad()
def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """dst's parameters = src's (same names), one parameter at a time, ZeRO-3 partitions gathered."""
    from rlhf.lora import _gathered

    dst_params = dict(dst.named_parameters())
    for name, p in src.named_parameters():
        q = dst_params.get(name)
        if q is None:  # e.g. LoRA adapters the reference does not have
            continue
        with _gathered([p]), _gathered([q], modifier_rank=0):
            q.data.copy_(p.data.to(q.dtype))


def build_engines(cfg: Any, num_training_steps: int) -> RLHFEngines:
    """Load and wrap actor, reference, critic and reward model for `cfg` (a PPOConfig)."""
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.reward import create_reward_model

    dsu.init_distributed()
    dtype = dsu.resolve_dtype(cfg.dtype)
    tokenizer = load_tokenizer(cfg.actor_model_name_or_path)
    actor_ds = _train_ds(cfg, cfg.actor_zero_stage, cfg.actor_gradient_checkpointing)
    critic_ds = _train_ds(cfg, cfg.critic_zero_stage, cfg.critic_gradient_checkpointing)

    # actor
    actor = load_causal_lm(cfg.actor_model_name_or_path, dtype, ds_config=dsu.get_train_ds_config(actor_ds), seed=cfg.seed)
    if cfg.actor_dropout is not None:
        _set_dropout(actor, cfg.actor_dropout)
    actor_lora_lr = None
    if cfg.actor_lora_dim > 0:
        convert_linear_layer_to_lora(actor, cfg.lora_module_name, cfg.actor_lora_dim, cfg.lora_scaling)
        actor_lora_lr = cfg.actor_lora_learning_rate
        if cfg.only_optimize_lora:
            only_optimize_lora_parameters(actor)
    actor_engine, _, _ = init_trained_engine(
        actor, actor_ds, cfg.actor_learning_rate, actor_lora_lr, cfg.actor_weight_decay,
        cfg.lr_scheduler_type, cfg.num_warmup_steps, num_training_steps,
    )

    # reference: a frozen copy of the SFT actor (same seed, so built-in names match the actor)
    ref_stage = 3 if (cfg.actor_zero_stage == 3 or cfg.offload_reference_model) else 0
    ref_ds = DeepSpeedConfig(zero_stage=ref_stage, offload=cfg.offload_reference_model or cfg.offload,
                             dtype=cfg.dtype, per_device_eval_batch_size=cfg.per_device_generation_batch_size)
    ref = load_causal_lm(cfg.actor_model_name_or_path, dtype, ds_config=dsu.get_eval_ds_config(ref_ds), seed=cfg.seed)
    ref_engine = dsu.initialize_frozen(ref, ref_ds)
    if not os.path.isdir(os.path.expanduser(cfg.actor_model_name_or_path)) and ref_stage != cfg.actor_zero_stage:
        # a built-in name draws its random weights differently under zero.Init: copy the actor's
        copy_weights(actor_engine.module, ref_engine.module)

    # critic: initialised from the reward model
    critic = create_reward_model(cfg.critic_model_name_or_path, dtype, ds_config=dsu.get_train_ds_config(critic_ds))
    critic_lora_lr = None
    if cfg.critic_lora_dim > 0:
        convert_linear_layer_to_lora(critic, cfg.lora_module_name, cfg.critic_lora_dim, cfg.lora_scaling)
        critic_lora_lr = cfg.critic_lora_learning_rate
        if cfg.only_optimize_lora:
            only_optimize_lora_parameters(critic)
            critic.v_head.weight.requires_grad_(True)  # the value head is new work for the critic
    critic_engine, _, _ = init_trained_engine(
        critic, critic_ds, cfg.critic_learning_rate, critic_lora_lr, cfg.critic_weight_decay,
        cfg.lr_scheduler_type, cfg.num_warmup_steps, num_training_steps,
    )

    # reward model: frozen
    reward_ds = DeepSpeedConfig(zero_stage=3 if cfg.critic_zero_stage == 3 else 0, offload=cfg.offload,
                                dtype=cfg.dtype, per_device_eval_batch_size=cfg.per_device_generation_batch_size)
    reward_path = cfg.reward_model_name_or_path or cfg.critic_model_name_or_path
    reward = create_reward_model(reward_path, dtype, ds_config=dsu.get_eval_ds_config(reward_ds))
    reward_engine = dsu.initialize_frozen(reward, reward_ds)

    dsu.print_rank0(
        f"[ppo] engines: actor {cfg.actor_model_name_or_path} (ZeRO-{cfg.actor_zero_stage}"
        f"{', LoRA ' + str(cfg.actor_lora_dim) if cfg.actor_lora_dim else ''}), reference (ZeRO-{ref_stage}"
        f"{', offloaded' if cfg.offload_reference_model else ''}), critic {cfg.critic_model_name_or_path} "
        f"(ZeRO-{cfg.critic_zero_stage}{', LoRA ' + str(cfg.critic_lora_dim) if cfg.critic_lora_dim else ''}), "
        f"reward {reward_path} (ZeRO-{reward_ds.zero_stage}); {dtype}, world {dsu.get_world_size()}"
    )
    return RLHFEngines(actor_engine, ref_engine, critic_engine, reward_engine, tokenizer, actor_ds, critic_ds)
