"""Resumable stage-3 checkpoints, written atomically.

Layout under <output_dir>/checkpoints/:
    step_00000040/            a complete checkpoint (only ever appears by rename)
        actor/ critic/        DeepSpeed checkpoints: weights, optimizer and scheduler states
        ema_rank{r}.pt        the EMA shadow this rank holds (ZeRO-3: its partition)
        rng_rank{r}.pt        python / numpy / torch / cuda RNG states of this rank
        trainer_state.json    step, epoch, data position, last metrics
        COMPLETE              written last, then the folder is renamed into place
    .tmp-step_00000050/       a checkpoint being written (ignored, removed by the next save)

All ranks write into the same tmp folder (a shared filesystem across nodes, as DeepSpeed's own
checkpoints assume); rank 0 marks it complete and renames it after a barrier. A run killed at any
point leaves either no `step_N` folder or a complete one, so `latest()` never picks a half-written
checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from typing import Any

import numpy as np
import torch

from rlhf.deepspeed_utils import barrier, get_rank, is_rank0

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
TAG = "state"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, COMPLETE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str) -> str | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


class CheckpointManager:
    def __init__(self, root: str, save_total_limit: int = 2):
        self.root = root
        self.save_total_limit = save_total_limit

    def save(self, step: int, actor, critic, trainer_state: dict, ema=None) -> str:
        """Write checkpoint `step` (every rank calls) and return its final path."""
        t0 = time.perf_counter()
        final = os.path.join(self.root, step_dir_name(step))
        tmp = os.path.join(self.root, ".tmp-" + step_dir_name(step))
        if is_rank0():
            os.makedirs(self.root, exist_ok=True)
            for name in os.listdir(self.root):  # leftovers of killed saves
                if name.startswith(".tmp-"):
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
            os.makedirs(tmp)
        barrier()
        actor.save_checkpoint(os.path.join(tmp, "actor"), tag=TAG)
        critic.save_checkpoint(os.path.join(tmp, "critic"), tag=TAG)
        rank = get_rank()
        if ema is not None:
            torch.save(ema.state_dict(), os.path.join(tmp, f"ema_rank{rank}.pt"))
        torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
        barrier()
        if is_rank0():
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(trainer_state, f, indent=1, default=float)
            with open(os.path.join(tmp, COMPLETE), "w") as f:
                f.write(json.dumps({"step": step, "time": time.time()}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(final):  # same step saved again (e.g. the final save)
                shutil.rmtree(final)
            os.rename(tmp, final)
            self._prune()
            logger.info("checkpoint step %d saved to %s in %.1fs", step, final, time.perf_counter() - t0)
        barrier()
        return final

    def _prune(self) -> None:
        if self.save_total_limit <= 0:
            return
        for _, path in complete_checkpoints(self.root)[: -self.save_total_limit]:
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed old checkpoint %s", path)

    def latest(self) -> str | None:
        return latest_checkpoint(self.root)

    def load(self, path: str, actor, critic, ema=None) -> dict[str, Any]:
        """Restore engines (weights, optimizer, scheduler), EMA and RNG; return the trainer state."""
        if not os.path.isfile(os.path.join(path, COMPLETE)):
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
        for engine, sub in ((actor, "actor"), (critic, "critic")):
            load_path, _ = engine.load_checkpoint(
                os.path.join(path, sub), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load {sub} from {path}")
        rank = get_rank()
        if ema is not None:
            ema_file = os.path.join(path, f"ema_rank{rank}.pt")
            if os.path.isfile(ema_file):
                ema.load_state_dict(torch.load(ema_file, map_location="cpu", weights_only=False))
            else:
                logger.warning("checkpoint %s has no EMA state for rank %d: EMA restarts from the actor", path, rank)
        rng_file = os.path.join(path, f"rng_rank{rank}.pt")
        if os.path.isfile(rng_file):
            set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
        with open(os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
        logger.info("resumed from %s (step %d)", path, state.get("step", -1))
        return state
