"""A/B of CUDA-extension builds inside the real decode step.

Some kernel choices are compile-time only (e.g. the MLP's ring depth, `-DHYBRID_MLP_STAGES_M16=N`),
so they cannot be compared in one process as `decode_knockout --mlp-variant` compares variants. One
process per build, though, measures that build's step together with that process's luck. The same
build measured 1.450 and 1.474 ms per OPT-1.3B step at 16 rows in two processes on an H200
(csrc/NOTES.md, Session 9): as large as the differences in question.

This tool runs `bench.kernels.decode_knockout`'s baseline (nothing knocked out, plus any
`--mlp-variant` cases) once per flag set per round, in alternating order (A B A B ...). It then
reports each build's median over the rounds next to its spread. Every flag set is JIT-built once,
in a directory of its own (hybrid/ops/cuda_backend.py, HYBRID_NVCC_EXTRA).

    python -m bench.kernels.build_ab --flags "" "-DHYBRID_MLP_STAGES_M16=4" --rounds 3 --batch 16

Rows: decode_knockout.jsonl, each with `nvcc_extra` (the flag set, "" = the default build) and
`ab_round`; the summary is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def knockout_cmd(batches: list[int], repeats: int, steps: int, mlp_variants: list[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "bench.kernels.decode_knockout", "--batch", *map(str, batches), "--repeats",
            str(repeats), "--steps", str(steps), "--cases", "--mlp-variant", *mlp_variants, "--out", str(out)]


def run_rounds(flag_sets: list[str], rounds: int, batches: list[int], repeats: int = 5, steps: int = 64,
               mlp_variants: list[str] | None = None, run=subprocess.run) -> list[dict]:
    """Every flag set once per round, in order, in a subprocess of its own; returns their rows with
    `nvcc_extra` and `ab_round` added. `run` is subprocess.run (a stand-in in tests)."""
    if rounds < 1 or not flag_sets:
        raise ValueError("build_ab needs at least one flag set and one round")
    if len(set(flag_sets)) != len(flag_sets):
        raise ValueError(f"flag sets must differ: {flag_sets}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="build_ab_") as tmp:
        for r in range(rounds):
            for i, flags in enumerate(flag_sets):
                out = Path(tmp) / f"r{r}_b{i}"
                env = dict(os.environ, HYBRID_NVCC_EXTRA=flags)
                print(f"[build_ab] round {r + 1}/{rounds}: build {i} ({flags or 'default'})", flush=True)
                run(knockout_cmd(batches, repeats, steps, mlp_variants or [], out), env=env, check=True)
                path = out / "decode_knockout.jsonl"
                if not path.exists():
                    raise RuntimeError(f"decode_knockout wrote no rows for flags {flags!r} (round {r})")
                for line in path.read_text().splitlines():
                    row = json.loads(line)
                    row.update(nvcc_extra=flags, ab_round=r)
                    rows.append(row)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per (batch, case, flag set): the median step over the rounds, its min / max and round count."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        groups.setdefault((row["batch"], row["knockout"], row["nvcc_extra"]), []).append(row["step_ms"])
    return [dict(batch=b, case=c, nvcc_extra=f, median_ms=round(statistics.median(v), 4), min_ms=min(v),
                 max_ms=max(v), rounds=len(v)) for (b, c, f), v in sorted(groups.items())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flags", nargs="+", required=True, help='one nvcc flag set per build ("" = the default)')
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, nargs="+", default=[16])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--mlp-variant", nargs="*", default=[], help="decode_knockout --mlp-variant cases, each build")
    ap.add_argument("--out", default=None, help="results directory (default: $OUT/reports/results or reports/results)")
    args = ap.parse_args()
    rows = run_rounds(args.flags, args.rounds, args.batch, args.repeats, args.steps, args.mlp_variant)
    from bench.rows import append_row

    for row in rows:
        append_row(row, "decode_knockout", args.out)
    for s in summarize(rows):
        print(f"batch {s['batch']:4d} {s['case']:<22} {s['nvcc_extra'] or 'default':<32} median {s['median_ms']:.4f} ms "
              f"(min {s['min_ms']:.4f}, max {s['max_ms']:.4f}, {s['rounds']} rounds)", flush=True)


if __name__ == "__main__":
    main()
