"""Run stage 1 or 2 with a few flags, for launcher tests (torchrun / deepspeed launcher).

  torchrun --nproc_per_node 2 tests/rlhf/scripts/run_stage12.py --stage reward --model DIR --output_dir OUT

Rank 0 writes OUT/stage_output.json (the StageOutput) when the stage finishes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

from rlhf import deepspeed_utils as dsu
from rlhf.config import DataConfig, DeepSpeedConfig, OptimConfig


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stage", choices=["sft", "reward"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--data_output_path", required=True)
    p.add_argument("--zero_stage", type=int, default=2)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--per_device_train_batch_size", type=int, default=4)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=5)
    p.add_argument("--learning_rate", type=float, default=5e-3)
    p.add_argument("--max_seq_len", type=int, default=128)
    p.add_argument("--data_path", default="builtin")
    p.add_argument("--local_rank", type=int, default=-1)  # the deepspeed launcher passes it
    args = p.parse_args(argv)

    data = DataConfig(data_path=[args.data_path], data_output_path=args.data_output_path,
                      max_seq_len=args.max_seq_len)
    ds = DeepSpeedConfig(zero_stage=args.zero_stage, dtype=args.dtype,
                         per_device_train_batch_size=args.per_device_train_batch_size,
                         gradient_accumulation_steps=args.gradient_accumulation_steps)
    optim = OptimConfig(learning_rate=args.learning_rate, num_warmup_steps=2, max_steps=args.max_steps)
    common = dict(model_name_or_path=args.model, output_dir=args.output_dir, data=data, ds=ds, optim=optim,
                  log_interval=1, progress=False, tensorboard=False, seed=5)
    if args.stage == "sft":
        from rlhf.sft import SFTConfig, run_sft

        out = run_sft(SFTConfig(**common))
    else:
        from rlhf.reward import RewardConfig, run_reward

        out = run_reward(RewardConfig(**common))
    if dsu.is_rank0():
        with open(os.path.join(args.output_dir, "stage_output.json"), "w") as f:
            json.dump({**dataclasses.asdict(out), "world_size": dsu.get_world_size()}, f)


if __name__ == "__main__":
    main()
