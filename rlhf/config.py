"""Typed configuration for the three RLHF stages.

Field names follow DeepSpeed-Chat's command-line flags where one exists, so a user moving from it
finds the same knobs. argparse lives only in entry points (rlhf/train.py); they fill these.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    data_path: list[str] = field(default_factory=lambda: ["builtin"])
    """Datasets to blend: local files/dirs (JSON, JSONL, parquet, save_to_disk dirs) or `builtin`."""
    data_split: str = "2,4,4"
    """Relative shares of every dataset given to stages 1, 2 and 3 (disjoint, seeded)."""
    sft_only_data_path: list[str] = field(default_factory=list)
    """Datasets used by stage 1 only (not split)."""
    data_output_path: str = ".cache/hybrid-rlhf/data"
    """Where tokenised data is cached (keyed by a content hash of files + settings)."""
    max_seq_len: int = 512
    """Prompt + answer tokens for stages 1 and 2."""
    max_prompt_seq_len: int = 256
    """Prompt tokens for stage 3 (left-padded / truncated from the left)."""
    eval_fraction: float = 0.1
    """Share of each stage's part held out for evaluation."""
    skip_bad_rows: bool = False
    """Count and skip malformed rows instead of failing on the first one."""
    seed: int = 1234


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    """ZeRO stage 0-3."""
    offload: bool = False
    """Offload optimizer state (and parameters at ZeRO-3) to CPU."""
    dtype: str = "auto"
    """bf16 | fp16 | fp32 | auto (bf16 on GPUs that support it, fp32 on CPU)."""
    gradient_checkpointing: bool = False
    gradient_accumulation_steps: int = 1
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 16


@dataclass
class OptimConfig:
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    num_warmup_steps: int = 0
    lr_scheduler_type: str = "cosine"
    """cosine | linear | constant (all with linear warm-up)."""
    num_train_epochs: int = 1
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run the epochs)."""


@dataclass
class StageOutput:
    """What a finished stage reports to the pipeline's summary.json."""

    output_dir: str
    metrics: dict = field(default_factory=dict)
    wall_time_s: float = 0.0
