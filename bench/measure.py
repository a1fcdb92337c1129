"""Timing PPO iterations of any system, and finding the largest batch that fits.

A system is anything with `step(prompts) -> dict` (time_generation_s, time_experience_s,
time_training_s, num_samples, gen_tokens, ...) and `close()`: rlhf's PPOTrainer (through
bench/systems.py) or the HF-DDP baseline. Warm-up iterations are timed and kept apart: HF's first
pass over new shapes is several times slower than the next (../shared/device/README.md).
"""
from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

logger = logging.getLogger(__name__)

PHASES = ("generation", "experience", "training")


class StepRunner(Protocol):
    def step(self, prompts: dict) -> dict: ...

    def close(self) -> None: ...


def random_prompts(config, batch: int, prompt_len: int, seed: int) -> dict:
    """Random prompt ids (no pad / bos / eos ids) of exactly prompt_len: benchmarks need shapes only."""
    vocab = int(config.vocab_size)
    special = {getattr(config, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    allowed = torch.tensor([i for i in range(min(vocab, 50000)) if i not in special])  # [n_allowed]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(allowed), (batch, prompt_len), generator=g)  # [B, P]
    return {"input_ids": allowed[idx], "attention_mask": torch.ones(batch, prompt_len, dtype=torch.long)}


def is_oom(err: BaseException) -> bool:
    """CUDA out-of-memory, whether raised as torch's OutOfMemoryError or wrapped in a RuntimeError."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def memory_summary() -> str:
    """'peak 71.2 GiB allocated of 79.1 GiB' on GPU; 'cpu' otherwise."""
    if not torch.cuda.is_available():
        return "cpu"
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    peak = torch.cuda.max_memory_allocated() / 2**30
    return f"peak {peak:.1f} GiB allocated of {total:.1f} GiB"


def _sync() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


@dataclass
class Measurement:
    warmup: list = field(default_factory=list)
    """Per warm-up iteration: the step's dict plus e2e_s."""
    measured: list = field(default_factory=list)
    peak_memory_warmup_gib: float | None = None
    peak_memory_gib: float | None = None

    def mean(self, key: str) -> float | None:
        vals = [it[key] for it in self.measured if it.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    @property
    def cold(self) -> dict:
        """The first iteration (a warm-up one if any ran)."""
        return (self.warmup or self.measured)[0]


def measure(
    runner: StepRunner,
    make_prompts: Callable[[int, int], dict],
    batch: int,
    warmup: int,
    iters: int,
    progress: bool = True,
    desc: str = "",
) -> Measurement:
    """Run warmup + iters PPO steps at `batch`; peak memory is reset between the two groups."""
    from tqdm.auto import tqdm

    out = Measurement()
    bar = tqdm(total=warmup + iters, desc=desc, disable=not progress, dynamic_ncols=True)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + iters):
        if i == warmup and cuda:
            out.peak_memory_warmup_gib = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        prompts = make_prompts(batch, i)
        t0 = _sync()
        stats = dict(runner.step(prompts))
        stats["e2e_s"] = _sync() - t0
        (out.warmup if i < warmup else out.measured).append(stats)
        bar.set_postfix_str(
            ("warm-up " if i < warmup else "")
            + " ".join(f"{p[:3]} {stats.get(f'time_{p}_s', float('nan')):.2f}s" for p in PHASES)
        )
        bar.update(1)
    bar.close()
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
        if iters:
            out.peak_memory_gib = peak
        else:
            out.peak_memory_warmup_gib = peak
    return out


def any_rank(flag: bool) -> bool:
    """True when the flag is set on any rank (every rank must call)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    t = torch.tensor([1.0 if flag else 0.0], device=dev)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


@dataclass
class BatchSearch:
    best: int | None
    """Largest batch that ran a full PPO step (None: not even the smallest)."""
    tried: dict = field(default_factory=dict)
    """batch -> True (fits) / False (out of memory), in the order tried."""


def find_max_batch(
    fits: Callable[[int], bool], start: int = 16, max_batch: int = 1024, granularity: int = 8, min_batch: int = 1
) -> BatchSearch:
    """Largest batch with fits(batch) True, assuming fitting is monotone in the batch.

    Doubles from `start` until a batch does not fit (or max_batch), halves when start itself does
    not fit, then bisects between the largest fitting and the smallest failing batch down to
    `granularity` (batches stay multiples of it where they can).
    """
    tried: dict[int, bool] = {}

    def probe(b: int) -> bool:
        if b not in tried:
            tried[b] = bool(fits(b))
        return tried[b]

    b = max(min(start, max_batch), min_batch)
    if probe(b):
        good, bad = b, None
        while bad is None and good < max_batch:
            nxt = min(good * 2, max_batch)
            if probe(nxt):
                good = nxt
            else:
                bad = nxt
    else:
        bad, good = b, None
        while good is None and bad > min_batch:
            nxt = max(bad // 2, min_batch)
            if probe(nxt):
                good = nxt
            else:
                bad = nxt
        if good is None:
            return BatchSearch(best=None, tried=tried)
    while bad is not None and bad - good > granularity:
        mid = (good + bad) // 2
        if mid // granularity * granularity > good:
            mid = mid // granularity * granularity  # keep to multiples of the granularity where possible
        if mid <= good:
            break
        if probe(mid):
            good = mid
        else:
            bad = mid
    return BatchSearch(best=good, tried=tried)


def fits_with_rebuild(
    build: Callable[[], StepRunner], make_prompts: Callable[[int, int], dict], label: str = ""
) -> tuple[Callable[[int], bool], Callable[[], None]]:
    """A `fits(batch)` for find_max_batch that runs one PPO step; after an OOM the runner is closed,
    memory freed and a fresh runner built for the next try (an OOM mid-backward leaves DDP / ZeRO
    state unusable). Returns (fits, close)."""
    state: dict = {"runner": None}

    def fits(batch: int) -> bool:
        if state["runner"] is None:
            state["runner"] = build()
        oom = False
        try:
            state["runner"].step(make_prompts(batch, 10_000 + batch))
        except Exception as err:  # noqa: BLE001 - only OOM is a verdict; anything else is re-raised
            if not is_oom(err):
                raise
            oom = True
            logger.warning("%s batch %d: out of memory (%s)", label, batch, memory_summary())
        oom = any_rank(oom)
        if oom:
            state["runner"].close()
            state["runner"] = None
        free_memory()
        if oom and torch.cuda.is_available() and torch.cuda.memory_allocated() > 2**30:
            logger.warning("%s: %.1f GiB still allocated after closing the out-of-memory runner; the next "
                           "tries have less memory (the search may come out low)", label,
                           torch.cuda.memory_allocated() / 2**30)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        logger.info("%s batch %d: %s", label, batch, "out of memory" if oom else "fits")
        return not oom

    def close() -> None:
        if state["runner"] is not None:
            state["runner"].close()
            state["runner"] = None
        free_memory()

    return fits, close
