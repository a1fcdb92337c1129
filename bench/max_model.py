"""Largest actor that runs stage 3 on this card per memory option (DeepSpeed-Chat's Table 3).

    python -m bench.max_model --critic opt-350m

For each memory option, walks up a ladder of built-in OPT sizes and runs ONE PPO step of ours
(prompt 256 + answer 256 by default) per actor size, each attempt in its own subprocess so an OOM
(or a host-memory kill) cannot poison the next one; stops an option's ladder at the first size that
does not fit. Every attempt appends a row (kind "max_model") to reports/results/max_model.jsonl.

Options (actor and critic alike; gradient checkpointing on unless --no-gradient-checkpointing):
  plain          ZeRO-0 (no partitioning)
  zero3          ZeRO-3 (partitions across GPUs; on one GPU it mainly changes how weights are fetched)
  zero3-offload  ZeRO-3 with optimizer state and parameters offloaded to CPU
  lora           ZeRO-0 with LoRA (rank 128) on the actor, only the LoRA weights trained
  zero3-offload-lora  both (not in the default list)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

OPTIONS: dict[str, dict] = {
    "plain": dict(actor_zero_stage=0, critic_zero_stage=0),
    "zero3": dict(actor_zero_stage=3, critic_zero_stage=3),
    "zero3-offload": dict(actor_zero_stage=3, critic_zero_stage=3, offload=True),
    "lora": dict(actor_zero_stage=0, critic_zero_stage=0, actor_lora_dim=128),
    "zero3-offload-lora": dict(actor_zero_stage=3, critic_zero_stage=3, offload=True, actor_lora_dim=128),
}
DEFAULT_OPTIONS = ("plain", "zero3", "zero3-offload", "lora")
LADDER = ("opt-1.3b", "opt-2.7b", "opt-6.7b", "opt-13b", "opt-30b", "opt-66b")
RESULT_TAG = "MAX_MODEL_RESULT "


@dataclass
class Attempt:
    actor: str
    option: str
    status: str
    """ok | oom | timeout | error."""
    step_time_s: float | None = None
    peak_memory_gib: float | None = None
    error: str | None = None


def walk_ladder(attempt: Callable[[str, str], Attempt], ladder, options) -> list[Attempt]:
    """Per option, try the ladder in ascending order until the first size that is not ok."""
    out = []
    for option in options:
        for actor in ladder:
            res = attempt(actor, option)
            out.append(res)
            if res.status != "ok":
                break
    return out


# ------------------------------------------------------------------------------ child: one attempt
def run_attempt(args: argparse.Namespace) -> int:
    """Runs inside the subprocess: build ours with the option, one PPO step, print the result."""
    import torch

    from bench.measure import is_oom, memory_summary, random_prompts
    from bench.systems import OursRunner, SystemSpec
    from rlhf.models import resolve_config

    spec = SystemSpec(model=args.actor, critic=args.critic, batch=args.batch, prompt_len=args.prompt_len,
                      gen_len=args.gen_len, gradient_checkpointing=not args.no_gradient_checkpointing,
                      enable_hybrid_engine=not args.no_hybrid_engine, output_dir=args.output_dir,
                      **OPTIONS[args.option])
    res = Attempt(actor=args.actor, option=args.option, status="ok")
    try:
        runner = OursRunner(spec)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        prompts = random_prompts(resolve_config(args.actor), args.batch, args.prompt_len, seed=rank)
        t0 = time.perf_counter()
        runner.step(prompts)
        res.step_time_s = time.perf_counter() - t0
        if torch.cuda.is_available():
            res.peak_memory_gib = torch.cuda.max_memory_allocated() / 2**30
    except Exception as err:  # noqa: BLE001 - the verdict is the point; the parent records it
        res.status = "oom" if is_oom(err) else "error"
        res.error = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''} ({memory_summary()})"
        if res.status == "error":
            import traceback

            traceback.print_exc()
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(RESULT_TAG + json.dumps(res.__dict__), flush=True)
    sys.stdout.flush()
    os._exit(0 if res.status == "ok" else 3)  # skip teardown of a possibly broken process group


def subprocess_attempt(args: argparse.Namespace) -> Callable[[str, str], Attempt]:
    def attempt(actor: str, option: str) -> Attempt:
        child = ["-m", "bench.max_model", "--attempt", "--actor", actor, "--option", option,
                 "--critic", args.critic, "--batch", str(args.batch), "--prompt-len", str(args.prompt_len),
                 "--gen-len", str(args.gen_len), "--output-dir", args.output_dir]
        child += ["--no-gradient-checkpointing"] if args.no_gradient_checkpointing else []
        child += ["--no-hybrid-engine"] if args.no_hybrid_engine else []
        cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}"]
                                  if args.gpus > 1 else []) + child
        print(f"[bench.max_model] {option:18s} {actor:10s} ...", end=" ", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"timeout after {args.timeout}s", flush=True)
            return Attempt(actor, option, "timeout", error=f"no result within {args.timeout}s")
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
        if found:
            res = Attempt(**json.loads(found[-1][len(RESULT_TAG):]))
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            res = Attempt(actor, option, "error", error=f"exit {proc.returncode}, no result: " + " | ".join(tail))
        peak = f", peak {res.peak_memory_gib:.1f} GiB" if res.peak_memory_gib else ""
        print(f"{res.status}{peak} ({time.perf_counter() - t0:.0f}s){'' if res.status == 'ok' else ': ' + str(res.error)}",
              flush=True)
        if res.status == "error" and proc.stderr:
            print("\n".join(proc.stderr.strip().splitlines()[-15:]), file=sys.stderr, flush=True)
        return res

    return attempt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.max_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--critic", default="opt-350m")
    p.add_argument("--ladder", default=",".join(LADDER), help="actor sizes to try, ascending")
    p.add_argument("--options", default=",".join(DEFAULT_OPTIONS), help=f"from {list(OPTIONS)}")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--batch", type=int, default=4, help="per-GPU generation = training batch")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--gen-len", type=int, default=256)
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--no-hybrid-engine", action="store_true")
    p.add_argument("--timeout", type=int, default=900, help="seconds per attempt")
    p.add_argument("--name", default="max_model")
    p.add_argument("--results-dir", default=None)
    p.add_argument("--output-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "bench-max-model"))
    p.add_argument("--attempt", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--actor", help=argparse.SUPPRESS)
    p.add_argument("--option", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.attempt:
        return run_attempt(args)
    options = [o.strip() for o in args.options.split(",") if o.strip()]
    bad = [o for o in options if o not in OPTIONS]
    if bad:
        p.error(f"unknown --options {bad}; choose from {list(OPTIONS)}")
    ladder = [m.strip() for m in args.ladder.split(",") if m.strip()]
    from bench.rows import append_row
    from rlhf.models import count_parameters

    attempt = subprocess_attempt(args)

    def attempt_and_record(actor: str, option: str) -> Attempt:
        res = attempt(actor, option)
        append_row({"kind": "max_model", **res.__dict__, "critic": args.critic, "gpus": args.gpus,
                    "batch": args.batch, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
                    "actor_params": count_parameters(actor), "option_settings": OPTIONS[option],
                    "gradient_checkpointing": not args.no_gradient_checkpointing,
                    "hybrid_engine_requested": not args.no_hybrid_engine}, args.name, args.results_dir)
        return res

    results = walk_ladder(attempt_and_record, ladder, options)
    print("[bench.max_model] largest actor per option:")
    for option in options:
        ok = [r.actor for r in results if r.option == option and r.status == "ok"]
        print(f"    {option:18s} {ok[-1] if ok else 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
