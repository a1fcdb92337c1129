"""Projected time and cost of DeepSpeed-Chat's benchmark epoch from a measured throughput.

DeepSpeed-Chat's Table 1 / 2 "one epoch" of stage 3: 135.3M tokens, written in its README as
"67.5M query tokens (131.9k queries with sequence length 256) and 67.5M generated tokens (131.9k
answers with sequence length 256)". Those two halves do not multiply out (131.9k x 256 = 33.8M);
its other figure, "a maximum global batch size per step of 0.5M tokens (1024 query-answer pairs)",
counts 512 tokens per pair. We take the token total, 135.3M prompt + answer tokens, as the
definition: at prompt 256 + answer 256 that is 264.3k query-answer pairs (1024 pairs x 258 steps).
The projection divides those tokens by the measured prompt + answer tokens per second of the whole
job, so it scales with the GPU count actually used.
"""
from __future__ import annotations

from dataclasses import dataclass

EPOCH_TOKENS = 135.3e6
"""Prompt + answer tokens in DeepSpeed-Chat's benchmark epoch of stage 3."""


@dataclass(frozen=True)
class EpochProjection:
    hours: float
    """Wall-clock hours for one epoch on the GPUs measured."""
    gpu_hours: float
    usd: float | None
    """hours x GPUs x price (None without a price, e.g. CPU runs)."""
    usd_per_gpu_hour: float | None


def project_epoch(
    tokens_per_s_per_gpu: float,
    gpus: int,
    usd_per_gpu_hour: float | None,
    epoch_tokens: float = EPOCH_TOKENS,
) -> EpochProjection:
    """Time and cost of `epoch_tokens` at the measured rate (tokens = prompt + answer tokens)."""
    if tokens_per_s_per_gpu <= 0 or gpus <= 0:
        raise ValueError(f"need a positive throughput and GPU count, got {tokens_per_s_per_gpu}, {gpus}")
    seconds = epoch_tokens / (tokens_per_s_per_gpu * gpus)
    hours = seconds / 3600.0
    gpu_hours = hours * gpus
    usd = gpu_hours * usd_per_gpu_hour if usd_per_gpu_hour is not None else None
    return EpochProjection(hours=hours, gpu_hours=gpu_hours, usd=usd, usd_per_gpu_hour=usd_per_gpu_hour)
