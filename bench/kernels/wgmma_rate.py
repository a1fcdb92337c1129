"""Tensor-core issue rates per SM on this card (bench/kernels/wgmma_rate.cu): wgmma m64nNk16 from
shared memory or registers, waited per unit or pipelined, 1-3 warpgroups; and mma.sync m16n8k16 with
and without the 4-tile skinny GEMM's ldmatrix mix. Builds the CUDA file with nvcc (sm_90a), runs it,
prints its table and appends its rows to wgmma_rate.jsonl with the environment (card, commit).

    python -m bench.kernels.wgmma_rate [--iters 4000] [--out DIR]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from bench.kernels import cuda_micro

SOURCE = Path(__file__).with_name("wgmma_rate.cu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=4000, help="units of 4 k16 steps per warpgroup (short: warm-up shows)")
    ap.add_argument("--out", default=None, help="results directory (default: $OUT/reports/results or reports/results)")
    args = ap.parse_args()
    cuda_micro.run(SOURCE, "wgmma_rate", ["--iters", str(args.iters)], args.out)


if __name__ == "__main__":
    main()
