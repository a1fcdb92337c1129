"""Standalone CUDA microbenchmarks (bench/kernels/*.cu, each its own main): build with nvcc for
sm_90a, run, print the table, and append the binary's --json lines as rows with the environment
(card, versions, commit). Used by bench.kernels.wgmma_rate and bench.kernels.stream_consume."""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"


def nvcc() -> str:
    from torch.utils.cpp_extension import CUDA_HOME

    found = shutil.which("nvcc") or (str(Path(CUDA_HOME) / "bin" / "nvcc") if CUDA_HOME else None)
    if not found or not Path(found).exists():
        raise RuntimeError("nvcc not found: the CUDA microbenchmarks need the CUDA toolkit")
    return found


def build(source: Path, out_dir: Path) -> Path:
    """nvcc -O3 for sm_90a, csrc/ on the include path; returns the executable."""
    exe = out_dir / source.stem
    cmd = [nvcc(), "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", f"-I{CSRC}", str(source),
           "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc {source.name} failed:\n{res.stderr[-4000:]}")
    return exe


def parse(stdout: str) -> list[dict]:
    """The binary's --json output: one object per non-empty line (anything else is an error)."""
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def run(source: Path, name: str, args: list[str], out: str | None) -> list[dict]:
    """Builds `source`, prints its table (run with `args`), then appends its --json rows to
    <results>/<name>.jsonl (bench.rows.append_row, each with `args`); returns the rows."""
    from bench.rows import append_row

    with tempfile.TemporaryDirectory() as tmp:
        exe = build(source, Path(tmp))
        table = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600, check=True)
        print(table.stdout, end="")
        rows = parse(subprocess.run([str(exe), "--json", *args], capture_output=True, text=True, timeout=600,
                                    check=True).stdout)
    for r in rows:
        r["args"] = " ".join(args)
        append_row(r, name, out)
    return rows
