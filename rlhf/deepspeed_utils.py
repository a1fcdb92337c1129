"""DeepSpeed plumbing shared by all three stages: process group, configs, engines, saving.

Configs follow DeepSpeed-Chat's `get_train_ds_config` / `get_eval_ds_config` (same ZeRO-3 knobs,
gradient clipping 1.0), with two changes for this project: the optimizer is a client
`torch.optim.AdamW` (no FusedAdam / CPUAdam JIT build, which costs ~60 s on a CPU machine), and the
schedule is our own LambdaLR (rlhf/schedule.py). Works in one process without any launcher, and
under torchrun or the deepspeed launcher.
"""
from __future__ import annotations

import logging
import os
import random
import socket
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn

from rlhf.config import DeepSpeedConfig, OptimConfig
from rlhf.schedule import build_lr_scheduler

logger = logging.getLogger(__name__)

# Parameters whose names contain one of these get no weight decay (DeepSpeed-Chat's list).
NO_DECAY_NAMES = ("bias", "layer_norm.weight", "layernorm.weight", "norm.weight", "ln_f.weight")


# ----------------------------------------------------------------------------- process group
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Start torch.distributed through DeepSpeed once per process (idempotent).

    Without a launcher this is a 1-process group on a free local port. On CPU the backend is gloo and
    DeepSpeed's shared-memory comm op (a 45-57 s g++ JIT build) is switched off.
    """
    import deepspeed
    import deepspeed.comm as dist

    if dist.is_initialized():
        # deepspeed.initialize reads these; a test harness may have cleared them since the group started.
        os.environ.setdefault("RANK", str(dist.get_rank()))
        os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
        local = torch.cuda.current_device() if torch.cuda.is_available() else dist.get_rank()
        os.environ.setdefault("LOCAL_RANK", str(local))
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_rank() -> int:
    return torch.distributed.get_rank() if _dist_ready() else int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    return torch.distributed.get_world_size() if _dist_ready() else int(os.environ.get("WORLD_SIZE", "1"))


def is_rank0() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if _dist_ready():
        torch.distributed.barrier()


def device() -> torch.device:
    """The device this rank trains on (its GPU, or the CPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place on a copy); a no-op in one process."""
    t = t.detach().clone()
    if _dist_ready() and get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def all_reduce_mean(value: torch.Tensor | float) -> torch.Tensor | float:
    """Mean over ranks. A float comes back as a float, a tensor as a tensor."""
    is_float = not isinstance(value, torch.Tensor)
    t = torch.tensor(float(value), dtype=torch.float64, device=device()) if is_float else value
    t = all_reduce_sum(t) / get_world_size()
    return float(t.item()) if is_float else t


def print_rank0(*args: Any, **kwargs: Any) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)


# ----------------------------------------------------------------------------- seeds and dtypes
def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices) identically on every rank."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def moving_seed(seed: int) -> int:
    """Seed that differs per rank (seed + rank), applied and returned: for sampling, not init."""
    s = seed + get_rank()
    set_seed(s)
    return s


def resolve_dtype(name: str) -> torch.dtype:
    """'bf16' | 'fp16' | 'fp32' | 'auto' (bf16 on a CUDA card that supports it, else fp32)."""
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in table:
        raise ValueError(f"dtype must be one of auto, bf16, fp16, fp32; got {name!r}")
    return table[name]


def _dtype_section(dtype: torch.dtype) -> dict:
    if dtype == torch.bfloat16:
        return {"bf16": {"enabled": True}}
    if dtype == torch.float16:
        return {"fp16": {"enabled": True, "loss_scale_window": 100, "initial_scale_power": 16}}
    return {}


# ----------------------------------------------------------------------------- DeepSpeed configs
def get_train_ds_config(
    ds: DeepSpeedConfig,
    *,
    global_batch_size: int | None = None,
    world_size: int | None = None,
    tensorboard_dir: str | None = None,
) -> dict:
    """DeepSpeed config for a trained model (actor, critic, SFT, reward), DeepSpeed-Chat style.

    `global_batch_size` defaults to micro-batch x grad-accumulation x world size.
    """
    world_size = world_size or get_world_size()
    micro = ds.per_device_train_batch_size
    gas = ds.gradient_accumulation_steps
    if global_batch_size is None:
        global_batch_size = micro * gas * world_size
    if global_batch_size != micro * gas * world_size:
        raise ValueError(f"global batch {global_batch_size} != micro {micro} x accumulation {gas} x world {world_size}")
    offload = "cpu" if ds.offload else "none"
    zero: dict = {
        "stage": ds.zero_stage,
        "overlap_comm": torch.cuda.is_available(),
        "offload_optimizer": {"device": offload},
        "memory_efficient_linear": False,
    }
    if ds.zero_stage == 3:
        zero.update({
            "offload_param": {"device": offload},
            "stage3_param_persistence_threshold": 1e4,
            "stage3_max_live_parameters": 3e7,
            "stage3_prefetch_bucket_size": 3e7,
            "stage3_gather_16bit_weights_on_model_save": False,
        })
    cfg = {
        "train_batch_size": global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "steps_per_print": 10**9,
        "zero_optimization": zero,
        "gradient_clipping": 1.0,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
        # Offload with our client AdamW instead of DeepSpeedCPUAdam (no C++ JIT build).
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        **_dtype_section(resolve_dtype(ds.dtype)),
    }
    if tensorboard_dir:
        cfg["tensorboard"] = {"enabled": True, "output_path": tensorboard_dir, "job_name": "deepspeed"}
    return cfg


def get_eval_ds_config(ds: DeepSpeedConfig, *, world_size: int | None = None) -> dict:
    """DeepSpeed config for a frozen model (reference, reward): ZeRO-3 when training uses it, else 0."""
    world_size = world_size or get_world_size()
    offload = "cpu" if ds.offload else "none"
    stage = 3 if ds.zero_stage == 3 else 0
    zero: dict = {"stage": stage, "memory_efficient_linear": False}
    if stage == 3:
        zero.update({"stage3_param_persistence_threshold": 1e4, "offload_param": {"device": offload}})
    return {
        "train_batch_size": ds.per_device_eval_batch_size * world_size,
        "train_micro_batch_size_per_gpu": ds.per_device_eval_batch_size,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        "zero_optimization": zero,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
        **_dtype_section(resolve_dtype(ds.dtype)),
    }


# ----------------------------------------------------------------------------- engines
def optimizer_grouped_parameters(
    named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float
) -> list[dict]:
    """Two AdamW groups like DeepSpeed-Chat: decay on weights, none on biases and norms."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if any(k in name for k in NO_DECAY_NAMES) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def initialize(
    model: nn.Module,
    ds: DeepSpeedConfig,
    optim: OptimConfig,
    num_training_steps: int,
    params: Iterable[tuple[str, nn.Parameter]] | None = None,
    lr: float | None = None,
    tensorboard_dir: str | None = None,
) -> tuple[Any, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """deepspeed.initialize a trained model with AdamW + warm-up schedule.

    `params` are (name, parameter) pairs to train (default: all of the model's that require grad);
    `lr` overrides optim.learning_rate. Returns (engine, optimizer, lr_scheduler).
    """
    import deepspeed

    init_distributed()
    if ds.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    lr = optim.learning_rate if lr is None else lr
    groups = optimizer_grouped_parameters(
        params if params is not None else model.named_parameters(), optim.weight_decay
    )
    # fused AdamW on GPU-resident optimizer state; the default (foreach) on CPU / offload.
    fused = torch.cuda.is_available() and not ds.offload
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused or None)
    scheduler = build_lr_scheduler(
        optimizer,
        kind=optim.lr_scheduler_type,
        num_warmup_steps=optim.num_warmup_steps,
        num_training_steps=max(1, num_training_steps),
    )
    engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=get_train_ds_config(ds, tensorboard_dir=tensorboard_dir),
        dist_init_required=False,
    )
    return engine, ds_optimizer, ds_scheduler


def initialize_frozen(model: nn.Module, ds: DeepSpeedConfig) -> Any:
    """Eval-only DeepSpeed engine for a frozen model (ZeRO-3 partitioned when training uses ZeRO-3)."""
    import deepspeed

    init_distributed()
    for p in model.parameters():
        p.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=get_eval_ds_config(ds), dist_init_required=False)
    engine.eval()
    return engine


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on activation checkpointing of a HF model (or a wrapper exposing the same method).
    transformers >= 5.2x names it activation_checkpointing_enable (the old name warns)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False


def unwrap(model_or_engine: Any) -> nn.Module:
    """The user's nn.Module behind a DeepSpeed engine (or the module itself)."""
    return getattr(model_or_engine, "module", model_or_engine)


# ----------------------------------------------------------------------------- saving
def gather_state_dict(model: nn.Module, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Full CPU state dict on rank 0 (None elsewhere). ZeRO-3 parameters are gathered one by one,
    so the peak extra memory is one parameter, not the model."""
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    rank0 = is_rank0()
    for name, p in model.named_parameters():
        if zero_stage == 3 and hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if rank0:
                    state[name] = p.data.detach().to("cpu", copy=True)
        elif rank0:
            state[name] = p.data.detach().to("cpu", copy=True)
    if rank0:
        persistent = {n for n, _ in model.named_buffers()}
        for mod_name, mod in model.named_modules():
            for b_name in getattr(mod, "_non_persistent_buffers_set", ()):
                persistent.discard(f"{mod_name}.{b_name}" if mod_name else b_name)
        for name, b in model.named_buffers():
            if name in persistent:
                state[name] = b.detach().to("cpu", copy=True)
    return state if rank0 else None


def save_hf_model(model_or_engine: Any, tokenizer: Any, output_dir: str, zero_stage: int) -> None:
    """Write HF format (config, safetensors weights, tokenizer) on rank 0; all ranks must call.

    A model with its own `save_pretrained(dir, state_dict=...)` (RewardModel) decides its layout.
    """
    model = unwrap(model_or_engine)
    if zero_stage == 3 and hasattr(model_or_engine, "empty_partition_cache"):
        # A no-grad (eval) forward can leave ZeRO-3 prefetches in flight; gathering one of those
        # fails ("Cannot partition a param in flight"). This waits for and releases them all.
        model_or_engine.empty_partition_cache()
    state = gather_state_dict(model, zero_stage)
    if is_rank0():
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        logger.info("saved %s to %s", type(model).__name__, output_dir)
    barrier()


# ----------------------------------------------------------------------------- data loading
def build_dataloader(
    dataset: Any, batch_size: int, collate_fn: Any, *, shuffle: bool, seed: int, drop_last: bool = False
) -> torch.utils.data.DataLoader:
    """Per-rank loader: a DistributedSampler over the ranks (also in one process, for one code path).
    Call `loader.sampler.set_epoch(epoch)` each epoch for a fresh seeded order."""
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(
        dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=shuffle, seed=seed, drop_last=drop_last
    )
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, drop_last=drop_last)


def num_update_steps(num_micro_batches: int, ds: DeepSpeedConfig, optim: OptimConfig) -> int:
    """Optimizer steps a run takes: all epochs' micro-batches / accumulation, capped by max_steps.
    (DeepSpeed's accumulation boundary runs across epochs, so a trailing partial one is dropped.)"""
    total = max(1, num_micro_batches * optim.num_train_epochs // ds.gradient_accumulation_steps)
    return min(total, optim.max_steps) if optim.max_steps > 0 else total
