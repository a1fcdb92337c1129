"""Stage 2 in two processes (torchrun, gloo, ZeRO-3) against one process (ZeRO-0): same losses.

Both runs see the same global batches (DistributedSampler splits each seeded global batch of 8 pairs
into 2 x 4), and the pairwise loss is a mean over pairs, so the per-step losses agree to float
rounding. The 2-process ZeRO-3 output is then reloaded here and must score the eval split as the
2-process run reported: partitioned weights were gathered and saved whole.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf import deepspeed_utils as dsu
from rlhf.metrics import read_metrics

SCRIPTS = Path(__file__).parent / "scripts"
REPO = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"rlhf_mp_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_two_process_zero3_reward_matches_one_process(tmp_path):
    from rlhf.data import build_stage_data
    from rlhf.data.collate import collate_pairs
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.reward import create_reward_model, evaluate_reward

    data_path = _load("easy_pairs").write_easy_pairs(str(tmp_path / "pairs.jsonl"), num_pairs=400, seed=1)
    base = tmp_path / "base"  # same starting weights for ZeRO-0 and ZeRO-3 (zero.Init draws differently)
    load_causal_lm("tiny-opt", torch.float32, seed=2).save_pretrained(str(base))
    load_tokenizer("tiny-opt").save_pretrained(str(base))
    common = ["--stage", "reward", "--model", str(base), "--data_path", data_path,
              "--data_output_path", str(tmp_path / "cache"), "--max_steps", "6", "--learning_rate", "3e-3"]

    one = tmp_path / "one"
    _load("run_stage12").main(common + ["--output_dir", str(one), "--zero_stage", "0",
                                         "--per_device_train_batch_size", "8"])
    two = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(SCRIPTS / "run_stage12.py"), *common, "--output_dir", str(two), "--zero_stage", "3",
           "--per_device_train_batch_size", "4"]
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    result = json.loads((two / "stage_output.json").read_text())
    assert result["world_size"] == 2 and result["metrics"]["steps"] == 6
    losses_one = torch.tensor([r["loss"] for r in read_metrics(str(one), split="train")])
    losses_two = torch.tensor([r["loss"] for r in read_metrics(str(two), split="train")])
    assert len(losses_one) == len(losses_two) == 6
    torch.testing.assert_close(losses_two, losses_one, rtol=1e-4, atol=1e-5)

    tok = load_tokenizer(str(two))
    rm = create_reward_model(str(two), torch.float32)
    data = build_stage_data(_load("run_stage12").DataConfig(data_path=[data_path], max_seq_len=128,
                                                            data_output_path=str(tmp_path / "cache")), tok, 2)
    assert len(data.eval) % 2 == 0  # no DistributedSampler padding: both runs scored the same pairs
    loader = dsu.build_dataloader(data.eval, 16, lambda b: collate_pairs(b, tok.pad_token_id), shuffle=False, seed=0)
    again = evaluate_reward(rm, loader)
    for k in ("eval_accuracy", "chosen_mean", "rejected_mean"):
        assert again[k] == pytest.approx(result["metrics"][k], rel=1e-5, abs=1e-6), k
