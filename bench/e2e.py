"""Stage-3 end-to-end benchmark: `python -m bench.e2e --model opt-1.3b --critic opt-350m --gpus 1`.

DeepSpeed-Chat's benchmark setting: prompt 256 + answer 256 forced to full length (ignore_eos),
one PPO epoch, one generation batch, generation batch = training batch. Systems (`--system`):
ours (rlhf PPOTrainer: DeepSpeed + hybrid engine), hf-ddp, hf-static (bench/systems.py), or all.
Warm-up iterations are timed and reported apart from the measured ones. Each measured
configuration appends one row to reports/results/<--name>.jsonl (or $OUT/reports/results).

`--gpus N` with N > 1 relaunches itself under torchrun (one rank per GPU; on CPU, N gloo
processes). `--batch auto` finds the largest batch that fits for each system, then measures each
system at its own best batch and all of them at the smallest of those (equal batch).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile

import torch

from bench import cost, flops
from bench.hardware import card_spec, default_gpu_hour_price, device_name, measure_copy_bandwidth
from bench.measure import (
    Measurement, any_rank, find_max_batch, fits_with_rebuild, free_memory, is_oom, measure,
    memory_summary, random_prompts,
)
from bench.rows import E2ERow, append_row
from bench.systems import SYSTEMS, SystemSpec, build_system, critic_param_count

logger = logging.getLogger("bench.e2e")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="opt-1.3b", help="actor: built-in name or local HF directory")
    p.add_argument("--critic", default="opt-350m", help="critic and reward model")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (ranks); > 1 relaunches under torchrun")
    p.add_argument("--system", default="all", help="ours | hf-ddp | hf-static | all, or a comma list")
    p.add_argument("--batch", default="64", help="per-GPU generation (= training) batch, or 'auto'")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--gen-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2, help="untimed-for-throughput iterations (reported apart)")
    p.add_argument("--iters", type=int, default=3, help="measured iterations")
    p.add_argument("--gpu-hour-price", type=float, default=None,
                   help="$ per GPU-hour for the epoch cost (default: bench/hardware.py's table for this card)")
    p.add_argument("--actor-zero-stage", type=int, default=2)
    p.add_argument("--critic-zero-stage", type=int, default=2)
    p.add_argument("--offload", action="store_true", help="ours: ZeRO offload to CPU")
    p.add_argument("--no-hybrid-engine", action="store_true", help="ours: generate with HF generate")
    p.add_argument("--gradient-checkpointing", action="store_true", help="all systems (FLOPs factor 4)")
    p.add_argument("--actor-lora-dim", type=int, default=0, help="LoRA rank on the actor's decoder linears, only LoRA trained (ours: own LoRA, merged for generation; baselines: PEFT)")
    p.add_argument("--hf-precision", default="amp", choices=["amp", "bf16"],
                   help="baselines: fp32 weights + bf16 autocast (amp) or bf16 weights")
    p.add_argument("--batch-start", type=int, default=16, help="--batch auto: first batch tried")
    p.add_argument("--max-batch", type=int, default=512, help="--batch auto: largest batch tried")
    p.add_argument("--batch-granularity", type=int, default=8, help="--batch auto: bisection stops here")
    p.add_argument("--name", default="e2e", help="rows go to <results-dir>/<name>.jsonl")
    p.add_argument("--results-dir", default=None, help="default $BENCH_RESULTS_DIR, $OUT/reports/results, reports/results")
    p.add_argument("--output-dir", default=None, help="scratch dir for ours (default: a temp dir)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--in-process", action="store_true",
                   help="run all systems in this process (faster start; by default each gets its own)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--search-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--search-result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch-mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    systems = list(SYSTEMS) if args.system == "all" else [s.strip() for s in args.system.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad or not systems:
        p.error(f"--system: unknown {bad}; choose from {list(SYSTEMS)} or all")
    args.systems = systems
    if args.batch != "auto":
        try:
            args.batch = int(args.batch)
        except ValueError:
            p.error(f"--batch must be an integer or 'auto', got {args.batch!r}")
        if args.batch < 1:
            p.error("--batch must be >= 1")
    if args.gpus < 1 or args.warmup < 0 or args.iters < 1:
        p.error("need --gpus >= 1, --warmup >= 0, --iters >= 1")
    return args


def relaunch_under_torchrun(argv: list[str], nproc: int) -> int:
    """Run this module again under torchrun with the same arguments; returns its exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "bench.e2e", *argv]
    print(f"[bench.e2e] launching {nproc} ranks: {' '.join(cmd)}", flush=True)
    return subprocess.call(cmd)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _max_over_ranks(value: float | None) -> float | None:
    if value is None or not torch.distributed.is_initialized():
        return value
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=dev)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


class Bench:
    """Everything one invocation shares: shapes, copy bandwidth, price, where rows go."""

    def __init__(self, args: argparse.Namespace) -> None:
        from rlhf.models import count_parameters, resolve_config

        self.args = args
        self.world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.actor_config = resolve_config(args.model)
        self.critic_config = resolve_config(args.critic)
        self.actor_params = count_parameters(self.actor_config)
        self.critic_params = critic_param_count(self.critic_config)
        self.actor_shape = flops.ModelShape.from_config(self.actor_config, self.actor_params)
        self.critic_shape = flops.ModelShape.from_config(self.critic_config, self.critic_params)
        self.copy_bw = measure_copy_bandwidth()
        self.gpu_name = device_name()
        if args.gpu_hour_price is not None:
            self.price, self.price_source = args.gpu_hour_price, "--gpu-hour-price"
        else:
            spec = card_spec(self.gpu_name)
            self.price = default_gpu_hour_price(self.gpu_name)
            self.price_source = f"bench/hardware.py table ({spec.name})" if spec else None
        out = args.output_dir or os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench-e2e-{os.getpid()}")
        self.output_dir = out

    def spec(self, batch: int) -> SystemSpec:
        a = self.args
        return SystemSpec(
            model=a.model, critic=a.critic, batch=batch, prompt_len=a.prompt_len, gen_len=a.gen_len,
            actor_zero_stage=a.actor_zero_stage, critic_zero_stage=a.critic_zero_stage,
            enable_hybrid_engine=not a.no_hybrid_engine, offload=a.offload,
            gradient_checkpointing=a.gradient_checkpointing, actor_lora_dim=a.actor_lora_dim,
            hf_precision=a.hf_precision, seed=a.seed, output_dir=self.output_dir,
        )

    def prompts(self, batch: int, i: int) -> dict:
        # Every rank draws different prompts (data parallel), same shapes.
        return random_prompts(self.actor_config, batch, self.args.prompt_len, seed=self.args.seed + 7919 * i + _rank())

    # ------------------------------------------------------------------------------ search
    def search(self, system: str) -> int | None:
        a = self.args
        fits, close = fits_with_rebuild(lambda: build_system(system, self.spec(a.max_batch)), self.prompts, system)
        try:
            result = find_max_batch(fits, start=a.batch_start, max_batch=a.max_batch, granularity=a.batch_granularity)
        finally:
            close()
        if _rank() == 0:
            tried = ", ".join(f"{b}:{'ok' if ok else 'OOM'}" for b, ok in result.tried.items())
            print(f"[bench.e2e] {system}: largest batch that fits = {result.best} (tried {tried})", flush=True)
        return result.best

    # ------------------------------------------------------------------------------ one run
    def run(self, system: str, batch: int, batch_mode: str) -> dict:
        a = self.args
        runner, err_msg, status, m = None, None, "ok", None
        try:
            runner = build_system(system, self.spec(batch))
            m = measure(runner, self.prompts, batch, a.warmup, a.iters, progress=not a.no_progress and _rank() == 0,
                        desc=f"{system} b={batch}")
        except Exception as err:  # noqa: BLE001 - OOM becomes a row; anything else propagates
            if not is_oom(err):
                raise
            status = "oom"
            err_msg = (f"{system}: batch {batch} per GPU does not fit on {self.gpu_name} "
                       f"({memory_summary()}): {str(err).splitlines()[0][:300]}")
        oom = any_rank(status == "oom")
        path = runner.generation_path if runner is not None else None
        if runner is not None:
            runner.close()
        del runner
        free_memory()
        if oom:
            status = "oom"
            err_msg = err_msg or f"{system}: batch {batch} ran out of memory on another rank"
            if _rank() == 0:
                print(f"[bench.e2e] OUT OF MEMORY: {err_msg}. Try a smaller --batch or --batch auto.", flush=True)
            row = self.row(system, batch, batch_mode, None, path)
            row.status, row.error = "oom", err_msg
        else:
            m.peak_memory_gib = _max_over_ranks(m.peak_memory_gib)
            m.peak_memory_warmup_gib = _max_over_ranks(m.peak_memory_warmup_gib)
            row = self.row(system, batch, batch_mode, m, path)
        data = row.__dict__
        if _rank() == 0:
            where = append_row(row, a.name, a.results_dir)
            print_summary(data, where)
        return data

    def row(self, system: str, batch: int, batch_mode: str, m: Measurement | None, path: str | None) -> E2ERow:
        a = self.args
        row = E2ERow(
            system=system, model=a.model, critic=a.critic, gpus=self.world, batch=batch,
            prompt_len=a.prompt_len, gen_len=a.gen_len, batch_mode=batch_mode, warmup=a.warmup,
            iters=a.iters, generation_path=path, actor_params=self.actor_params,
            critic_params=self.critic_params, usd_per_gpu_hour=self.price, price_source=self.price_source,
            copy_bandwidth_gb_s=self.copy_bw / 1e9,
            extra={"actor_zero_stage": a.actor_zero_stage, "critic_zero_stage": a.critic_zero_stage,
                   "offload": a.offload, "gradient_checkpointing": a.gradient_checkpointing,
                   "actor_lora_dim": a.actor_lora_dim, "hf_precision": a.hf_precision,
                   "hybrid_engine_requested": not a.no_hybrid_engine},
        )
        if m is None:
            return row
        fill_row(row, m, self.actor_shape, self.critic_shape, self.copy_bw,
                 bytes_per_param=2 if torch.cuda.is_available() else 4)
        return row


def fill_row(row: E2ERow, m: Measurement, actor: flops.ModelShape, critic: flops.ModelShape,
             copy_bw: float, bytes_per_param: int) -> None:
    """Throughput, TFLOPs (DeepSpeed-Chat accounting), MBU and the epoch projection from timings."""
    for p in ("generation", "experience", "training"):
        setattr(row, f"time_{p}_s", m.mean(f"time_{p}_s"))
        setattr(row, f"cold_{p}_s", m.cold.get(f"time_{p}_s"))
    row.time_e2e_s = m.mean("e2e_s")
    row.cold_e2e_s = m.cold["e2e_s"]
    row.iter_e2e_s = [it["e2e_s"] for it in m.measured]
    row.warmup_e2e_s = [it["e2e_s"] for it in m.warmup]
    row.peak_memory_gib, row.peak_memory_warmup_gib = m.peak_memory_gib, m.peak_memory_warmup_gib
    gpus, B, P, G = row.gpus, row.batch, row.prompt_len, row.gen_len
    row.samples_per_s = B * gpus / row.time_e2e_s
    row.tokens_per_s_per_gpu = B * (P + G) / row.time_e2e_s
    row.gen_tokens_per_s_per_gpu = B * G / row.time_generation_s
    f = flops.step3_flops(
        actor, critic, B, gpus, P, G,
        actor_gradient_checkpointing=row.extra.get("gradient_checkpointing", False),
        critic_gradient_checkpointing=row.extra.get("gradient_checkpointing", False),
        actor_lora_dim=row.extra.get("actor_lora_dim", 0),
    )
    row.tflops_generation = flops.tflops_per_gpu(f.generation, row.time_generation_s + row.time_experience_s, gpus)
    row.tflops_training = flops.tflops_per_gpu(f.training, row.time_training_s, gpus)
    row.tflops_effective = flops.tflops_per_gpu(f.total, row.time_e2e_s, gpus)
    row.decode_ms_per_token = row.time_generation_s / G * 1e3
    row.decode_bytes = flops.decode_bytes(actor, B, P, G, bytes_per_param=bytes_per_param)
    decode_time = m.mean("time_decode_s")
    row.extra["mbu_time_basis"] = "time_decode_s" if decode_time else "time_generation_s (prefill included)"
    row.decode_mbu = flops.decode_mbu(row.decode_bytes, decode_time or row.time_generation_s, copy_bw)
    proj = cost.project_epoch(row.tokens_per_s_per_gpu, gpus, row.usd_per_gpu_hour)
    row.epoch_hours, row.epoch_gpu_hours, row.epoch_usd = proj.hours, proj.gpu_hours, proj.usd
    for key in ("actor_loss", "critic_loss", "reward_score"):
        if m.mean(key) is not None:
            row.extra[key] = m.mean(key)


def print_summary(row: dict, where) -> None:
    if row["status"] != "ok":
        print(f"[bench.e2e] {row['system']} batch {row['batch']}: {row['status'].upper()} -> {where}", flush=True)
        return
    usd = f"${row['epoch_usd']:.0f}" if row.get("epoch_usd") is not None else "n/a"
    print(
        f"[bench.e2e] {row['system']:9s} {row['model']}+{row['critic']} gpus={row['gpus']} batch={row['batch']} "
        f"({row['batch_mode']}) via {row['generation_path']}\n"
        f"    e2e {row['time_e2e_s']:.2f}s (cold {row['cold_e2e_s']:.2f}s) = gen {row['time_generation_s']:.2f} "
        f"+ exp {row['time_experience_s']:.2f} + train {row['time_training_s']:.2f}; "
        f"{row['samples_per_s']:.2f} samples/s, {row['tokens_per_s_per_gpu']:.0f} tok/s/GPU\n"
        f"    TFLOPs/GPU gen {row['tflops_generation']:.3g} train {row['tflops_training']:.3g} "
        f"effective {row['tflops_effective']:.3g}; decode {row['decode_ms_per_token']:.2f} ms/token, "
        f"MBU {row['decode_mbu']:.1%}; peak mem {row['peak_memory_gib'] or 0:.1f} GiB\n"
        f"    DS-Chat epoch (135.3M tokens): {row['epoch_hours']:.2f} h, {usd} -> {where}",
        flush=True,
    )


def run_each_system_apart(argv: list[str], args: argparse.Namespace) -> int:
    """One child process (or torchrun job) per system, so no system's leftovers (allocator caches,
    compiled graphs, DeepSpeed state) share the GPU with the next one. With --batch auto: a search
    child per system first, then each system at its best batch and at the smallest best (equal)."""
    os.environ.setdefault("BENCH_COMMAND", _user_command(argv))  # rows name what the user typed

    def child(extra: list[str]) -> int:
        cmd = [sys.executable, "-m", "bench.e2e", *argv, *extra]
        print(f"[bench.e2e] running: python -m bench.e2e {' '.join(argv + extra)}", flush=True)
        return subprocess.call(cmd)

    failed: list[str] = []
    if args.batch != "auto":
        for s in args.systems:
            if child(["--system", s]) != 0:
                failed.append(s)
    else:
        best: dict[str, int | None] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for s in args.systems:
                path = os.path.join(tmp, f"{s}.json")
                rc = child(["--system", s, "--search-only", "--search-result", path])
                best[s] = json.load(open(path))["best"] if rc == 0 and os.path.exists(path) else None
                if rc != 0:
                    failed.append(f"{s} (search)")
        fitting = [b for b in best.values() if b]
        equal = min(fitting) if fitting else None
        print(f"[bench.e2e] largest batch per system: {best}; equal-batch comparison at {equal}", flush=True)
        for s in args.systems:
            # A system that fits no batch gets one run at batch 1 that records the OOM row.
            if child(["--system", s, "--batch", str(best[s] or 1), "--batch-mode", "auto-best"]) != 0:
                failed.append(s)
            if best[s] and equal is not None and equal != best[s]:
                if child(["--system", s, "--batch", str(equal), "--batch-mode", "auto-equal"]) != 0:
                    failed.append(f"{s}@{equal}")
    if failed:
        print(f"[bench.e2e] FAILED (see the errors above): {failed}", flush=True)
    return 1 if failed else 0


def _user_command(argv: list[str]) -> str:
    return "python -m bench.e2e " + " ".join(shlex.quote(a) for a in argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    launched = "LOCAL_RANK" in os.environ
    if len(args.systems) > 1 and not args.in_process and not launched:
        return run_each_system_apart(argv, args)
    os.environ.setdefault("BENCH_COMMAND", _user_command(argv))
    if args.gpus > 1 and not launched:
        return relaunch_under_torchrun(argv, args.gpus)
    from rlhf.deepspeed_utils import init_distributed

    init_distributed()
    world = torch.distributed.get_world_size()
    if world != args.gpus:
        raise SystemExit(f"--gpus {args.gpus} but the launcher started {world} ranks")
    bench = Bench(args)
    if _rank() == 0:
        print(f"[bench.e2e] {bench.gpu_name} x{world}; actor {args.model} ({bench.actor_params/1e9:.3f}B), "
              f"critic {args.critic} ({bench.critic_params/1e9:.3f}B); copy bandwidth "
              f"{bench.copy_bw/1e12:.2f} TB/s; systems {args.systems}", flush=True)
    rows = []
    if args.search_only:
        if args.batch != "auto" or len(args.systems) != 1:
            raise SystemExit("--search-only needs --batch auto and one --system")
        best = bench.search(args.systems[0])
        if _rank() == 0 and args.search_result:
            with open(args.search_result, "w") as f:
                json.dump({"system": args.systems[0], "best": best}, f)
    elif args.batch != "auto":
        for system in args.systems:
            rows.append(bench.run(system, args.batch, args.batch_mode or "fixed"))
    else:
        best = {s: bench.search(s) for s in args.systems}
        fitting = [b for b in best.values() if b]
        equal = min(fitting) if fitting else None
        for system in args.systems:
            if best[system] is None:
                rows.append(bench.run(system, 1, "auto-best"))  # records the OOM at batch 1
                continue
            rows.append(bench.run(system, best[system], "auto-best"))
            if equal is not None and equal != best[system]:
                rows.append(bench.run(system, equal, "auto-equal"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if _rank() == 0 and not args.search_only:
        failed = [f"{r['system']}@{r['batch']}" for r in rows if r["status"] != "ok"]
        print(f"[bench.e2e] wrote {len(rows)} rows" + (f"; out of memory: {failed}" if failed else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
