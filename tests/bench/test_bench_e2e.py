"""python -m bench.e2e end to end on tiny models: every system, 1 process and 2 (torchrun, gloo).

Each run goes through a subprocess exactly as a user types it, so the rows checked here are what
the command writes (to a temp dir, never to reports/results)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.rows import E2E_REQUIRED, read_rows

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model", "tiny-opt", "--critic", "tiny-opt", "--batch", "2", "--prompt-len", "16", "--gen-len", "8",
        "--warmup", "1", "--iters", "1", "--no-progress", "--gpu-hour-price", "1.25"]


def _run(tmp_path, *extra, timeout=400):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext")))
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, "-m", "bench.e2e", *TINY, "--results-dir", str(tmp_path / "results"),
                           "--output-dir", str(tmp_path / "scratch"), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc, read_rows(tmp_path / "results")


def _check_rows(rows, gpus):
    assert sorted(r["system"] for r in rows) == ["hf-ddp", "hf-static", "ours"]
    for r in rows:
        missing = [k for k in E2E_REQUIRED if k not in r]
        assert not missing, (r["system"], missing)
        assert r["status"] == "ok" and r["gpus"] == gpus and r["batch"] == 2
        assert (r["model"], r["critic"], r["prompt_len"], r["gen_len"]) == ("tiny-opt", "tiny-opt", 16, 8)
        phases = r["time_generation_s"] + r["time_experience_s"] + r["time_training_s"]
        assert 0 < phases <= r["time_e2e_s"] * 1.001
        assert r["samples_per_s"] == pytest.approx(2 * gpus / r["time_e2e_s"], rel=1e-9)
        assert r["tokens_per_s_per_gpu"] == pytest.approx(2 * 24 / r["time_e2e_s"], rel=1e-9)
        for k in ("tflops_generation", "tflops_training", "tflops_effective", "decode_mbu", "epoch_hours", "epoch_usd"):
            assert r[k] > 0, k
        assert r["epoch_usd"] == pytest.approx(r["epoch_gpu_hours"] * 1.25)
        assert len(r["iter_e2e_s"]) == 1 and len(r["warmup_e2e_s"]) == 1
        assert r["git_commit"] and r["torch"] and r["command"].startswith("python -m bench.e2e")
        assert r["extra"]["critic_loss"] == r["extra"]["critic_loss"]  # a number, not NaN
    paths = {r["system"]: r["generation_path"] for r in rows}
    assert paths["hf-ddp"] == "hf-generate" and paths["hf-static"] == "hf-generate-static"
    assert paths["ours"] in ("hf-generate", "hybrid-engine")


def test_e2e_all_systems_one_process(tmp_path):
    """Default: each system in its own child process; rows name the command the user typed."""
    proc, rows = _run(tmp_path, "--system", "all")
    _check_rows(rows, gpus=1)
    assert proc.stdout.count("running: python -m bench.e2e") == 3
    assert {r["command"] for r in rows} == {r["command"] for r in rows[:1]} and "--system all" in rows[0]["command"]


@pytest.mark.slow
def test_e2e_all_systems_two_processes(tmp_path):
    proc, rows = _run(tmp_path, "--system", "all", "--gpus", "2", "--in-process")
    assert "launching 2 ranks" in proc.stdout
    _check_rows(rows, gpus=2)  # rank 0 alone writes the rows


def test_batch_auto_orchestration_across_children(monkeypatch):
    """--batch auto with several systems: a search child per system, then each system at its best
    batch and at the smallest best (equal batch); a system that fits nothing records its OOM at 1.
    The children are faked here (the real search is tested in test_bench_batch_search)."""
    import json

    import bench.e2e as e2e

    best = {"ours": 48, "hf-ddp": 32, "hf-static": None}
    calls = []

    def fake_call(cmd):
        argv = cmd[cmd.index("bench.e2e") + 1:]
        args = e2e.parse_args(argv)
        calls.append((args.systems[0], args.batch, args.batch_mode, args.search_only))
        if args.search_only:
            with open(args.search_result, "w") as f:
                json.dump({"system": args.systems[0], "best": best[args.systems[0]]}, f)
        return 0

    monkeypatch.setattr(e2e.subprocess, "call", fake_call)
    monkeypatch.delenv("BENCH_COMMAND", raising=False)
    argv = ["--model", "tiny-opt", "--system", "all", "--batch", "auto"]
    try:
        assert e2e.run_each_system_apart(argv, e2e.parse_args(argv)) == 0
        assert e2e.os.environ["BENCH_COMMAND"] == "python -m bench.e2e " + " ".join(argv)
    finally:
        e2e.os.environ.pop("BENCH_COMMAND", None)  # set by the code under test, not by monkeypatch
    assert calls == [
        ("ours", "auto", None, True), ("hf-ddp", "auto", None, True), ("hf-static", "auto", None, True),
        ("ours", 48, "auto-best", False), ("ours", 32, "auto-equal", False),
        ("hf-ddp", 32, "auto-best", False),
        ("hf-static", 1, "auto-best", False),
    ]


def test_e2e_rejects_bad_arguments(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.e2e", "--system", "vllm"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown ['vllm']" in proc.stderr
