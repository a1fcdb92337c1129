"""Stages 1 and 2 on a CUDA card: the default tiny run (quality) and opt-125m / opt-350m (speed).

  python tests/rlhf/scripts/gpu_stage12.py [--zero_stages 2 3] [--models tiny-opt opt-125m]

Prints one table row per (model, ZeRO stage, stage) and writes them to $OUT/stage12_gpu.json when
OUT is set. Stage 2 starts from stage 1's output. Times are whole-stage wall times (incl. the first,
slower steps); the step rate is optimizer steps over the stage's training loop.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from rlhf import deepspeed_utils as dsu
from rlhf.config import DataConfig, DeepSpeedConfig, OptimConfig
from rlhf.metrics import read_metrics
from rlhf.reward import RewardConfig, run_reward
from rlhf.sft import SFTConfig, run_sft


def _train_rate(output_dir: str) -> float:
    rows = read_metrics(output_dir, split="train")
    if len(rows) < 2:
        return float("nan")
    return (rows[-1]["step"] - rows[0]["step"]) / max(1e-9, rows[-1]["time_s"] - rows[0]["time_s"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["tiny-opt", "opt-125m"])
    p.add_argument("--zero_stages", nargs="+", type=int, default=[2, 3])
    p.add_argument("--max_steps", type=int, default=60, help="steps per stage for models other than tiny-opt")
    args = p.parse_args()
    cuda = torch.cuda.is_available()  # runs on CPU too (a smoke test of this script)
    work = tempfile.mkdtemp(prefix="stage12_gpu_")
    data = DataConfig(data_output_path=os.path.join(work, "cache"))
    rows = []
    for model in args.models:
        for zero in args.zero_stages:
            ds = DeepSpeedConfig(zero_stage=zero, dtype="auto", per_device_train_batch_size=8)
            limit = -1 if model == "tiny-opt" else args.max_steps  # tiny-opt: the CPU defaults in full
            sft_cfg = SFTConfig(model_name_or_path=model, output_dir=os.path.join(work, f"{model}-z{zero}-sft"),
                                data=data, ds=ds, progress=False, tensorboard=False)
            sft_cfg.optim.max_steps = limit
            if model != "tiny-opt":
                sft_cfg.optim = OptimConfig(learning_rate=1e-4, num_warmup_steps=5, max_steps=limit)
            sft = run_sft(sft_cfg)
            rm_cfg = RewardConfig(model_name_or_path=sft.output_dir, data=data, ds=ds, progress=False,
                                  output_dir=os.path.join(work, f"{model}-z{zero}-rm"), tensorboard=False)
            rm_cfg.optim.num_train_epochs = 2
            if model != "tiny-opt":
                rm_cfg.optim = OptimConfig(learning_rate=5e-5, num_warmup_steps=5, max_steps=limit)
            rm = run_reward(rm_cfg)
            for name, out in (("sft", sft), ("reward", rm)):
                row = {"model": model, "zero_stage": zero, "stage": name, "gpu": torch.cuda.get_device_name() if cuda else "cpu",
                       "world_size": dsu.get_world_size(), "wall_time_s": round(out.wall_time_s, 2),
                       "steps_per_s": round(_train_rate(out.output_dir), 2),
                       "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else 0.0,
                       **out.metrics}
                rows.append(row)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
    if dsu.is_rank0():
        print(f"\n{'model':10} {'ZeRO':>4} {'stage':7} {'steps/s':>8} {'wall s':>7} {'mem GiB':>8}  quality")
        for r in rows:
            q = (f"eval loss {r['initial_eval_loss']:.3f} -> {r['eval_loss']:.3f}" if r["stage"] == "sft" else
                 f"accuracy {r['initial_eval_accuracy']:.3f} -> {r['eval_accuracy']:.3f}")
            print(f"{r['model']:10} {r['zero_stage']:>4} {r['stage']:7} {r['steps_per_s']:>8} {r['wall_time_s']:>7} "
                  f"{r['peak_mem_gib']:>8}  {q}")
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "stage12_gpu.json"), "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
