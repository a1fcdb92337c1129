"""One command for the three stages: SFT -> reward model -> PPO.

    python -m rlhf.train                       # tiny models, built-in data, CPU, a few minutes
    python -m rlhf.train --actor-model opt-1.3b --reward-model opt-350m --num-gpus 8 \
        --data_path data/a.jsonl data/b.parquet --data_split 2,4,4 --output_dir out
    python -m rlhf.train --step 3 --actor_zero_stage 3 --enable_hybrid_engine ...

Stage outputs: <output_dir>/step1_sft, step2_reward, step3_ppo/{actor,actor_ema,critic}; a closing
summary in <output_dir>/summary.json. Stage 3 takes its actor from stage 1's output and critic /
reward model from stage 2's output (when those stages ran now, or their outputs exist and no model
was named). `--num-gpus N > 1` re-launches this command through the deepspeed launcher (or
torchrun) with the same flags; `--hostfile` spans nodes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from rlhf.config import DataConfig

logger = logging.getLogger("rlhf.train")

TINY_MODELS = ("tiny-opt", "tiny-llama")
# Stage-3 settings for the CPU default (tiny models, built-in data); DeepSpeed-Chat's defaults are
# for real models. Measured on the default stages 1-2 (1 CPU thread): PPO raises the held-out
# reward-model score 1.05 -> 3.25 in these 40 steps (~30 s); lr 3e-4 gets 2.38 and a KL of 4,
# 16-prompt batches are noisier (2.39 at lr 1e-4), sampling gains less than greedy rollouts.
TINY_PPO_DEFAULTS = dict(
    per_device_generation_batch_size=64, per_device_training_batch_size=32, max_prompt_seq_len=64,
    max_answer_seq_len=32, actor_learning_rate=1e-4, critic_learning_rate=2e-3, num_warmup_steps=2,
    max_steps=40, eval_prompts=64,
)
LAUNCHED_ENV = "HYBRID_RLHF_LAUNCHED"
SHARED_STAGE_FLAGS = ("num_train_epochs", "max_steps", "num_warmup_steps", "gradient_accumulation_steps")
"""Flags that apply to every stage; `--sft_X`, `--reward_X`, `--ppo_X` set one stage only."""


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a config dataclass (the string right under each field), for --help."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def build_parser() -> argparse.ArgumentParser:
    from rlhf.ppo.config import PPOConfig

    p = argparse.ArgumentParser(prog="python -m rlhf.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("pipeline")
    g.add_argument("--actor-model", "--actor_model_name_or_path", dest="actor_model", default=None,
                   help="stage-1 starting point (stage 3's actor when stage 1 is not run): local HF dir or "
                        "built-in name (tiny-opt, opt-1.3b, llama-7b, ...); default tiny-opt")
    g.add_argument("--reward-model", "--reward_model_name_or_path", "--critic_model_name_or_path",
                   dest="reward_model", default=None,
                   help="stage-2 starting point (stage 3's critic and reward model when stage 2 is not run); "
                        "default: stage 1's output (InstructGPT initialises the reward model from the SFT "
                        "model), else --actor-model")
    g.add_argument("--step", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    g.add_argument("--output_dir", "--output-dir", default="output")
    g.add_argument("--num-gpus", "--num_gpus", dest="num_gpus", type=int, default=1)
    g.add_argument("--hostfile", default=None, help="deepspeed hostfile (multi-node); passed to the launcher")
    g.add_argument("--master_port", type=int, default=None)
    g.add_argument("--launcher", choices=["deepspeed", "torchrun"], default="deepspeed")
    g.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    d = p.add_argument_group("data")
    d.add_argument("--data_path", "--data-path", nargs="+", default=["builtin"])
    d.add_argument("--data_split", "--data-split", default="2,4,4")
    d.add_argument("--sft_only_data_path", nargs="*", default=[])
    d.add_argument("--data_output_path", default=DataConfig.data_output_path)
    d.add_argument("--max_seq_len", type=int, default=None, help="stages 1-2 prompt+answer tokens")
    s = p.add_argument_group("stages 1 and 2 (a DeepSpeed-Chat name applies to both, a sft_ / reward_ prefixed "
                             "one to that stage; num_train_epochs, max_steps, num_warmup_steps and "
                             "gradient_accumulation_steps also to stage 3 unless --ppo_X is given)")
    for prefix in ("", "sft_", "reward_"):
        s.add_argument(f"--{prefix}learning_rate", type=float, default=None)
        s.add_argument(f"--{prefix}num_train_epochs", type=int, default=None)
        s.add_argument(f"--{prefix}per_device_train_batch_size", type=int, default=None)
        s.add_argument(f"--{prefix}per_device_eval_batch_size", type=int, default=None)
        s.add_argument(f"--{prefix}max_steps", type=int, default=None)
        s.add_argument(f"--{prefix}zero_stage", type=int, default=None)
        s.add_argument(f"--{prefix}weight_decay", type=float, default=None)
        s.add_argument(f"--{prefix}num_warmup_steps", type=int, default=None)
        s.add_argument(f"--{prefix}gradient_accumulation_steps", type=int, default=None)
    s.add_argument("--lr_scheduler_type", default=None, choices=["cosine", "linear", "constant"])
    s.add_argument("--gradient_checkpointing", action="store_true")
    s.add_argument("--offload", action="store_true", help="optimizer (and ZeRO-3 parameter) offload, all stages")
    s.add_argument("--num_padding_at_beginning", type=int, default=None)
    t = p.add_argument_group("stage 3 (DeepSpeed-Chat step-3 names)")
    skip = {"actor_model_name_or_path", "critic_model_name_or_path", "reward_model_name_or_path", "data",
            "output_dir", "seed", "dtype", "offload", "progress_bar", "lr_scheduler_type"}
    docs = field_docs(PPOConfig)
    for f in dataclasses.fields(PPOConfig):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = (docs.get(f.name, "") + f" (default {default})").replace("%", "%%")
        flag = f"--ppo_{f.name}" if f.name in SHARED_STAGE_FLAGS else f"--{f.name}"
        if f.type in ("bool", bool):
            t.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            typ = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str,
                   "float | None": float}.get(str(f.type), str)
            t.add_argument(flag, type=typ, default=None, help=help_text)
    return p


# ----------------------------------------------------------------------------- multi-GPU launch
def maybe_relaunch(args: argparse.Namespace, argv: list[str]) -> int | None:
    """With --num-gpus > 1 (or a hostfile) outside a launcher, run this command under one."""
    already = "WORLD_SIZE" in os.environ or os.environ.get(LAUNCHED_ENV) == "1"
    if already or (args.num_gpus <= 1 and not args.hostfile):
        return None
    rest = _strip_flags(argv, {"--num-gpus", "--num_gpus", "--hostfile", "--launcher", "--master_port"})
    if args.launcher == "torchrun" and not args.hostfile:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.num_gpus}"]
        if args.master_port:
            cmd.append(f"--master_port={args.master_port}")
        cmd += ["-m", "rlhf.train", *rest]
    else:
        launcher = shutil.which("deepspeed") or "deepspeed"
        cmd = [launcher]
        if args.hostfile:
            cmd += ["--hostfile", args.hostfile]
            if args.num_gpus > 1:
                cmd += ["--num_gpus", str(args.num_gpus)]
        else:
            cmd += ["--num_gpus", str(args.num_gpus)]
        if args.master_port:
            cmd += ["--master_port", str(args.master_port)]
        cmd += ["--module", "rlhf.train", *rest]
    env = {**os.environ, LAUNCHED_ENV: "1"}
    if "OMP_NUM_THREADS" not in env and not _has_gpu():
        # N CPU processes x default threads oversubscribe the cores; spinning OpenMP threads then
        # run a tiny-opt step 40x slower (measured: 35 ms with 1 thread, 1.4 s with 2 on a busy box)
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, args.num_gpus)))
    print("[train] launching: " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _strip_flags(argv: list[str], names: set[str]) -> list[str]:
    out, skip_next = [], False
    for a in argv:
        if skip_next:
            skip_next = False
            continue
        name = a.split("=", 1)[0]
        if name in names:
            skip_next = "=" not in a
            continue
        out.append(a)
    return out


# ----------------------------------------------------------------------------- stage configs
def _actor_name(args: argparse.Namespace) -> str:
    return args.actor_model or "tiny-opt"


def _given(v: Any) -> bool:
    return v is not None


def _stage_value(args: argparse.Namespace, prefix: str, name: str) -> Any:
    v = getattr(args, f"{prefix}{name}")
    return v if _given(v) else getattr(args, name)


def data_config(args: argparse.Namespace) -> DataConfig:
    d = DataConfig(data_path=list(args.data_path), data_split=args.data_split,
                   sft_only_data_path=list(args.sft_only_data_path), data_output_path=args.data_output_path,
                   seed=args.seed)
    if _given(args.max_seq_len):
        d.max_seq_len = args.max_seq_len
    return d


def _fill_ds_optim(cfg: Any, args: argparse.Namespace, prefix: str) -> Any:
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "zero_stage", "gradient_accumulation_steps"):
        v = _stage_value(args, prefix, name)
        if _given(v):
            setattr(cfg.ds, name, v)
    for name in ("learning_rate", "num_train_epochs", "max_steps", "weight_decay", "num_warmup_steps"):
        v = _stage_value(args, prefix, name)
        if _given(v):
            setattr(cfg.optim, name, v)
    if args.lr_scheduler_type:
        cfg.optim.lr_scheduler_type = args.lr_scheduler_type
    cfg.ds.dtype = args.dtype
    cfg.ds.offload = args.offload
    cfg.ds.gradient_checkpointing = args.gradient_checkpointing
    cfg.seed, cfg.progress = args.seed, args.progress
    return cfg


def sft_config(args: argparse.Namespace):
    from rlhf.sft import SFTConfig

    cfg = SFTConfig(model_name_or_path=_actor_name(args), output_dir=os.path.join(args.output_dir, "step1_sft"),
                    data=data_config(args))
    return _fill_ds_optim(cfg, args, "sft_")


def reward_start(args: argparse.Namespace, sft_ran: bool) -> str:
    """Stage 2's starting model: --reward-model; without it the SFT model, as InstructGPT does (its
    reward model is the SFT model with a scalar head), when stage 1 ran or left an output; else
    the actor model."""
    if args.reward_model:
        return args.reward_model
    sft_dir = os.path.join(args.output_dir, "step1_sft")
    if sft_ran or os.path.isfile(os.path.join(sft_dir, "config.json")):
        return sft_dir
    return _actor_name(args)


def reward_config(args: argparse.Namespace, start: str | None = None):
    from rlhf.reward import RewardConfig

    cfg = RewardConfig(model_name_or_path=start or args.reward_model or _actor_name(args),
                       output_dir=os.path.join(args.output_dir, "step2_reward"), data=data_config(args))
    if _given(args.num_padding_at_beginning):
        cfg.num_padding_at_beginning = args.num_padding_at_beginning
    return _fill_ds_optim(cfg, args, "reward_")


def ppo_config(args: argparse.Namespace, actor: str, critic: str):
    from rlhf.ppo.config import PPOConfig

    cfg = PPOConfig(actor_model_name_or_path=actor, critic_model_name_or_path=critic, data=data_config(args),
                    output_dir=os.path.join(args.output_dir, "step3_ppo"), seed=args.seed, dtype=args.dtype,
                    offload=args.offload, progress_bar=args.progress)
    if args.lr_scheduler_type:
        cfg.lr_scheduler_type = args.lr_scheduler_type
    if _actor_name(args) in TINY_MODELS:
        applied = {k: v for k, v in TINY_PPO_DEFAULTS.items() if getattr(args, k) is None}
        for k, v in applied.items():
            setattr(cfg, k, v)
        if applied:
            logger.info("stage 3: CPU-sized defaults for %s: %s", _actor_name(args), applied)
    for f in dataclasses.fields(PPOConfig):
        v = getattr(args, f.name, None)
        if f.name in SHARED_STAGE_FLAGS:
            v = _stage_value(args, "ppo_", f.name)
        if v is not None and f.name not in ("actor_model_name_or_path", "critic_model_name_or_path", "data",
                                              "output_dir", "seed", "dtype", "offload"):
            setattr(cfg, f.name, v)
    return cfg


def _stage_model(ran_now: bool, out_dir: str, given: str | None, default: str, what: str) -> str:
    """Stage 3's input: this run's stage output, else the named model, else an earlier output."""
    if ran_now:
        return out_dir
    if given is not None:
        return given
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        logger.info("stage 3: using the %s output found at %s", what, out_dir)
        return out_dir
    logger.warning("stage 3: no %s output at %s and no model named; using %s", what, out_dir, default)
    return default


# ----------------------------------------------------------------------------- main
def _flatten(out: Any) -> dict:
    return {**out.metrics, "wall_time_s": round(out.wall_time_s, 2), "output_dir": out.output_dir}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    code = maybe_relaunch(args, argv)
    if code is not None:
        return code

    from rlhf import deepspeed_utils as dsu

    t0 = time.perf_counter()
    summary_path = os.path.join(args.output_dir, "summary.json")
    summary: dict = {}
    if os.path.isfile(summary_path):  # stages not run now keep their earlier results
        with open(summary_path) as f:
            summary = json.load(f)
    steps = sorted(set(args.step))
    dsu.print_rank0(f"[train] stages {steps} -> {args.output_dir} (actor {_actor_name(args)}, "
                    f"reward {args.reward_model or 'from stage 1'}, data {args.data_path})")

    if 1 in steps:
        from rlhf.sft import run_sft

        summary["sft"] = _flatten(run_sft(sft_config(args)))
    if 2 in steps:
        from rlhf.reward import run_reward

        start = reward_start(args, 1 in steps)
        dsu.print_rank0(f"[train] stage 2 starts from {start}")
        summary["reward"] = _flatten(run_reward(reward_config(args, start)))
    if 3 in steps:
        from rlhf.ppo.run import run_ppo

        actor = _stage_model(1 in steps, os.path.join(args.output_dir, "step1_sft"), args.actor_model,
                             _actor_name(args), "stage-1")
        critic = _stage_model(2 in steps, os.path.join(args.output_dir, "step2_reward"), args.reward_model,
                              args.reward_model or _actor_name(args), "stage-2")
        summary["ppo"] = _flatten(run_ppo(ppo_config(args, actor, critic)))
    summary["total_wall_time_s"] = round(time.perf_counter() - t0, 2)
    summary["stages_run"] = steps
    if dsu.is_rank0():
        os.makedirs(args.output_dir, exist_ok=True)
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=2, default=str)
        print_summary(summary, summary_path)
    return 0


def print_summary(summary: dict, path: str) -> None:
    rows = [("sft", "eval_loss"), ("sft", "initial_eval_loss"), ("reward", "eval_accuracy"), ("reward", "eval_accuracy_hard"),
            ("ppo", "reward_before"), ("ppo", "reward_after"), ("ppo", "kl"),
            ("ppo", "objective_score_before"), ("ppo", "objective_score_after")]
    print("\n===== hybrid-rlhf summary =====")
    for stage in ("sft", "reward", "ppo"):
        if stage in summary:
            print(f"  {stage:<7} wall time {summary[stage].get('wall_time_s', float('nan')):8.1f} s"
                  f"   -> {summary[stage].get('output_dir', '')}")
    for stage, key in rows:
        if stage in summary and key in summary[stage]:
            v = summary[stage][key]
            print(f"  {stage}.{key:<24} {v:.4f}" if isinstance(v, (int, float)) else f"  {stage}.{key:<24} {v}")
    print(f"  total wall time {summary.get('total_wall_time_s', 0):.1f} s; summary: {path}\n", flush=True)


if __name__ == "__main__":
    sys.exit(main())
