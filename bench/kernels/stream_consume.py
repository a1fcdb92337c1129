"""How fast the skinny GEMM's cp.async ring streams W when its consumer does the real kernel's
ldmatrix + mma.sync work for 1-4 m16 tiles, less, or nothing, with x streamed or kept, 3-7 stages
(bench/kernels/stream_consume.cu). Builds it with nvcc (sm_90a), runs it, prints its table and
appends its rows to stream_consume.jsonl with the environment (card, commit).

    python -m bench.kernels.stream_consume [--out DIR]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from bench.kernels import cuda_micro

SOURCE = Path(__file__).with_name("stream_consume.cu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="results directory (default: $OUT/reports/results or reports/results)")
    args = ap.parse_args()
    cuda_micro.run(SOURCE, "stream_consume", [], args.out)


if __name__ == "__main__":
    main()
