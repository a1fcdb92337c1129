"""Tensor-core issue rates per SM on this card (bench/kernels/wgmma_rate.cu): wgmma m64nNk16 from
shared memory or registers, waited per unit or pipelined, 1-3 warpgroups; and mma.sync m16n8k16 with
and without the 4-tile skinny GEMM's ldmatrix mix. Builds the CUDA file with nvcc (sm_90a), runs it,
prints its table and appends its rows to wgmma_rate.jsonl with the environment (card, commit).

    python -m bench.kernels.wgmma_rate [--iters 4000] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("wgmma_rate.cu")


def nvcc() -> str:
    from torch.utils.cpp_extension import CUDA_HOME

    found = shutil.which("nvcc") or (str(Path(CUDA_HOME) / "bin" / "nvcc") if CUDA_HOME else None)
    if not found or not Path(found).exists():
        raise RuntimeError("nvcc not found: wgmma_rate needs the CUDA toolkit")
    return found


def build(out_dir: Path) -> Path:
    exe = out_dir / "wgmma_rate"
    cmd = [nvcc(), "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", str(SOURCE), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed:\n{res.stderr[-4000:]}")
    return exe


def parse(stdout: str) -> list[dict]:
    """The binary's --json lines (one object per line; anything else is an error)."""
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=4000, help="units of 4 k16 steps per warpgroup (short: warm-up shows)")
    ap.add_argument("--out", default=None, help="results directory (default: $OUT/reports/results or reports/results)")
    args = ap.parse_args()
    from bench.rows import append_row

    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        table = subprocess.run([str(exe), "--iters", str(args.iters)], capture_output=True, text=True, timeout=600,
                               check=True)
        print(table.stdout, end="")
        rows = parse(subprocess.run([str(exe), "--json", "--iters", str(args.iters)], capture_output=True,
                                    text=True, timeout=600, check=True).stdout)
    for r in rows:
        r["iters"] = args.iters
        append_row(r, "wgmma_rate", args.out)


if __name__ == "__main__":
    main()
