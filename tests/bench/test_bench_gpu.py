"""GPU checks of the harness (run on the lent device: pytest -m gpu tests/bench).

Rows go to $OUT/bench-gpu-test (fetched with the run) or a temp dir: they are test runs at small
shapes, never the committed results."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.hardware import card_spec, device_name, measure_copy_bandwidth
from bench.rows import read_rows

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.gpu


def test_copy_bandwidth_is_plausible_for_the_card():
    bw = measure_copy_bandwidth()
    spec = card_spec(device_name())
    print(f"{device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s (read + write)"
          + (f", datasheet HBM {spec.hbm_tb_s} TB/s" if spec else ""))
    if spec is None:
        pytest.skip(f"{device_name()} is not in bench/hardware.py's table")
    assert 0.5 * spec.hbm_tb_s * 1e12 < bw < 1.05 * spec.hbm_tb_s * 1e12


def test_e2e_small_opt_all_systems_on_gpu(tmp_path):
    out = Path(os.environ["OUT"]) / "bench-gpu-test" if os.environ.get("OUT") else tmp_path
    results = out / "results"
    cmd = [sys.executable, "-m", "bench.e2e", "--model", "opt-125m", "--critic", "opt-125m", "--system", "all",
           "--batch", "8", "--prompt-len", "64", "--gen-len", "32", "--warmup", "1", "--iters", "2",
           "--no-progress", "--results-dir", str(results), "--output-dir", str(tmp_path / "scratch")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stderr[-6000:]
    rows = read_rows(results)
    assert sorted(r["system"] for r in rows) == ["hf-ddp", "hf-static", "ours"]
    for r in rows:
        assert r["status"] == "ok", r.get("error")
        assert r["card"] != "cpu" and r["peak_memory_gib"] > 0
        assert 0 < r["decode_mbu"] < 1.2, r["decode_mbu"]
        assert r["tflops_effective"] > 0 and r["epoch_usd"] > 0
    print({r["system"]: (r["generation_path"], round(r["time_generation_s"], 3)) for r in rows})


def test_oom_becomes_a_row_with_batch_and_memory(tmp_path):
    """A batch far too large is caught, reported with batch and memory, and recorded as an oom row."""
    if torch.cuda.get_device_properties(0).total_memory > 200 * 2**30:
        pytest.skip("card too large for this OOM probe")
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "bench.e2e", "--model", "opt-1.3b", "--critic", "opt-350m", "--system", "hf-ddp",
           "--batch", "4096", "--prompt-len", "256", "--gen-len", "256", "--warmup", "0", "--iters", "1",
           "--no-progress", "--results-dir", str(results)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "OUT OF MEMORY" in proc.stdout and "batch 4096" in proc.stdout and "GiB" in proc.stdout
    (row,) = read_rows(results)
    assert row["status"] == "oom" and "batch 4096" in row["error"]
