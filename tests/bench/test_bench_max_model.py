"""bench.max_model: the ladder walk (stops at the first size that does not fit) and a real attempt
in its own subprocess on a tiny model, with its row."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.max_model import OPTIONS, Attempt, walk_ladder
from bench.rows import read_rows

ROOT = Path(__file__).resolve().parents[2]


def test_walk_ladder_stops_at_first_failure():
    limits = {"plain": 2, "zero3-offload": 4, "lora": 0}  # index of the first size that does not fit
    ladder = ["s0", "s1", "s2", "s3", "s4", "s5"]
    tried = []

    def attempt(actor, option):
        tried.append((option, actor))
        return Attempt(actor, option, "ok" if ladder.index(actor) < limits[option] else "oom")

    res = walk_ladder(attempt, ladder, list(limits))
    assert tried == [("plain", "s0"), ("plain", "s1"), ("plain", "s2"),
                     ("zero3-offload", "s0"), ("zero3-offload", "s1"), ("zero3-offload", "s2"),
                     ("zero3-offload", "s3"), ("zero3-offload", "s4"), ("lora", "s0")]
    assert [r.status for r in res if r.option == "plain"] == ["ok", "ok", "oom"]
    assert set(OPTIONS) >= {"plain", "zero3", "zero3-offload", "lora"}


def test_max_model_real_attempt_in_subprocess(tmp_path):
    env = dict(os.environ)
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.max_model", "--critic", "tiny-opt", "--ladder", "tiny-opt", "--options", "lora",
         "--batch", "2", "--prompt-len", "16", "--gen-len", "8", "--results-dir", str(tmp_path / "results"),
         "--output-dir", str(tmp_path / "scratch"), "--timeout", "300"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = read_rows(tmp_path / "results")
    assert len(rows) == 1
    r = rows[0]
    assert (r["kind"], r["actor"], r["option"], r["status"]) == ("max_model", "tiny-opt", "lora", "ok"), r.get("error")
    assert r["step_time_s"] > 0 and r["actor_params"] > 0 and r["option_settings"]["actor_lora_dim"] == 128
    assert "lora               tiny-opt" in proc.stdout
