"""Stage 3 in two processes (gloo on CPU) through `python -m rlhf.train --num-gpus 2`, which
re-launches itself with torchrun: ZeRO-3 actor (synced_gpus generation), ZeRO-2 critic."""
import json
import os
import subprocess
import sys

import pytest

from rlhf.train import build_parser, maybe_relaunch


@pytest.mark.slow
def test_two_process_stage3_zero3(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "rlhf.train", "--step", "3", "--num-gpus", "2", "--launcher", "torchrun",
           "--output_dir", str(out), "--data_output_path", str(tmp_path / "cache"), "--no-progress",
           "--actor_zero_stage", "3", "--critic_zero_stage", "2", "--per_device_generation_batch_size", "4",
           "--per_device_training_batch_size", "2", "--max_answer_seq_len", "8", "--max_steps", "2",
           "--eval_prompts", "8", "--save_steps", "2", "--dtype", "fp32"]
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "world 2" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    ppo = summary["ppo"]
    assert ppo["steps"] == 2 and all(abs(ppo[k]) < 1e6 for k in ("reward_before", "reward_after", "kl"))
    rows = [json.loads(l) for l in (out / "step3_ppo" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["num_samples"] for r in train] == [8, 8]  # 4 prompts on each of the 2 ranks
    assert (out / "step3_ppo" / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # an earlier in-process ZeRO-3 test's switch would partition the load
    AutoModelForCausalLM.from_pretrained(str(out / "step3_ppo" / "actor"))


def test_relaunch_command_passes_flags_through(monkeypatch):
    """--num-gpus / --hostfile become launcher arguments; every other flag is passed on unchanged."""
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("HYBRID_RLHF_LAUNCHED", raising=False)
    argv = ["--num-gpus", "8", "--hostfile", "/etc/hosts.txt", "--step", "3", "--actor_zero_stage=3", "--offload"]
    assert maybe_relaunch(build_parser().parse_args(argv), argv) == 0
    cmd, env = calls[0]
    assert cmd[0].endswith("deepspeed") and cmd[1:5] == ["--hostfile", "/etc/hosts.txt", "--num_gpus", "8"]
    assert cmd[5:] == ["--module", "rlhf.train", "--step", "3", "--actor_zero_stage=3", "--offload"]
    assert env["HYBRID_RLHF_LAUNCHED"] == "1"
    assert env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 8))  # no oversubscribed cores
    argv = ["--num_gpus=2", "--launcher", "torchrun", "--output_dir", "o"]
    maybe_relaunch(build_parser().parse_args(argv), argv)
    assert calls[1][0][1:] == ["-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "rlhf.train", "--output_dir", "o"]
    monkeypatch.setenv("WORLD_SIZE", "2")  # already under a launcher: no second launch
    assert maybe_relaunch(build_parser().parse_args(argv), argv) is None
