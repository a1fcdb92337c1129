"""Stage-3 (PPO) configuration: DeepSpeed-Chat's step-3 flags and defaults, plus ours.

Field names are DeepSpeed-Chat's `main.py` flag names; rlhf/train.py fills this from argparse.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.config import DataConfig


@dataclass
class PPOConfig:
    # ------------------------------------------------------------------ models
    actor_model_name_or_path: str = "tiny-opt"
    """Stage-1 output dir or a built-in name; the reference model is a frozen copy of it."""
    critic_model_name_or_path: str = "tiny-opt"
    """Stage-2 output dir (a RewardModel) or a built-in name; initialises the critic AND is the
    frozen reward model."""
    reward_model_name_or_path: str | None = None
    """Frozen reward model when different from the critic's initialisation (default: the same)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts: stage-3 share of the blended datasets (`--data_path`, `--data_split`)."""
    # ------------------------------------------------------------------ batch and lengths
    per_device_generation_batch_size: int = 16
    """Prompts per rank per generation (DeepSpeed-Chat: --per_device_generation_batch_size)."""
    per_device_training_batch_size: int = 16
    """Experience rows per rank per PPO update (mini-batch)."""
    generation_batches: int = 1
    """Generation batches collected before the PPO updates run over all of them."""
    ppo_epochs: int = 1
    """Passes of PPO updates over one collected experience."""
    num_train_epochs: int = 1
    """Passes over the prompt dataset."""
    max_prompt_seq_len: int = 256
    max_answer_seq_len: int = 256
    # ------------------------------------------------------------------ optimisation
    actor_learning_rate: float = 9.65e-6
    critic_learning_rate: float = 5e-6
    actor_weight_decay: float = 0.0
    critic_weight_decay: float = 0.0
    lr_scheduler_type: str = "cosine"
    num_warmup_steps: int = 100
    gradient_accumulation_steps: int = 1
    actor_gradient_checkpointing: bool = False
    critic_gradient_checkpointing: bool = False
    actor_dropout: float | None = None
    """Override the actor's dropout (DeepSpeed-Chat sets 0.0 for stable PPO ratios); None keeps it."""
    max_steps: int = -1
    """Stop after this many PPO steps (one step = generation batch(es) + updates); -1: run the epochs."""
    # ------------------------------------------------------------------ PPO
    kl_ctl: float = 0.1
    """Weight of the per-token KL penalty to the reference model."""
    clip_reward_value: float = 5.0
    """Reward-model scores are clipped to +-this before entering the return."""
    cliprange: float = 0.2
    """Policy ratio clip."""
    cliprange_value: float = 0.2
    """Value clip around the experience-time values."""
    gamma: float = 1.0
    lam: float = 0.95
    # ------------------------------------------------------------------ DeepSpeed
    actor_zero_stage: int = 0
    critic_zero_stage: int = 0
    offload: bool = False
    """Offload optimizer state (and parameters at ZeRO-3) of actor and critic to CPU."""
    offload_reference_model: bool = False
    """Keep the reference model's parameters on CPU (a ZeRO-3 engine with parameter offload)."""
    dtype: str = "auto"
    """bf16 | fp16 | fp32 | auto (bf16 on capable GPUs, fp32 on CPU)."""
    # ------------------------------------------------------------------ EMA, ptx
    enable_ema: bool = False
    """Keep an exponential moving average of the actor (saved to <output_dir>/actor_ema)."""
    ema_decay: float = 0.992
    unsupervised_dataset_name: str | None = None
    """Pretraining text (.txt / .json / .jsonl with `text`, or `builtin`) whose LM loss is mixed into
    each actor update (InstructGPT's PPO-ptx)."""
    unsup_coef: float = 27.8
    """Weight of the pretraining (ptx) loss in the actor loss."""
    # ------------------------------------------------------------------ LoRA
    actor_lora_dim: int = 0
    critic_lora_dim: int = 0
    lora_module_name: str = "decoder.layers."
    """Comma-separated name parts of the nn.Linear layers that get adapters."""
    lora_scaling: float = 1.0
    """LoRA alpha (the delta is scaled by alpha / dim)."""
    only_optimize_lora: bool = False
    actor_lora_learning_rate: float = 5e-4
    critic_lora_learning_rate: float = 5e-4
    # ------------------------------------------------------------------ generation
    enable_hybrid_engine: bool = False
    """Generate with hybrid.engine.HybridEngine (falls back to HF generate, logged, where it cannot)."""
    do_sample: bool = False
    """Sample answers instead of greedy decoding (DeepSpeed-Chat generates greedily)."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    ignore_eos: bool = False
    """Always generate max_answer_seq_len tokens (benchmarks: fixed-length answers)."""
    hybrid_num_blocks: int | None = None
    """KV-cache blocks of the hybrid engine (None: sized from GPU memory)."""
    # ------------------------------------------------------------------ bookkeeping
    output_dir: str = "output/step3"
    save_steps: int = 0
    """Write a resumable checkpoint every this many PPO steps (0: only at the end)."""
    save_total_limit: int = 2
    """Keep at most this many complete checkpoints (older ones are deleted)."""
    resume: bool = False
    """Continue from the last complete checkpoint under <output_dir>/checkpoints."""
    eval_prompts: int = 64
    """Held-out prompts scored before and after training (reward_before / reward_after)."""
    print_answers: bool = False
    log_every: int = 1
    seed: int = 1234
    progress_bar: bool = True
