"""Timing and accounting shared by the kernel benchmarks.

Each benchmark times a kernel with CUDA events (triton.testing.do_bench: warm-up, L2 flushed
before every repetition so KV/activations come from HBM as they do inside a full decode step,
median of the repetitions), counts the bytes the op must move (each input read once, each output
written once), and reports GB/s and % of the card's measured copy bandwidth (read + write, as the
decode MBU uses). pytest-benchmark's own table times the same call plus a synchronize; the
authoritative figures are the event-timed ones in `extra_info`, the summary table printed at the
end of the session (bench/kernels/conftest.py), and the rows appended to kernels.jsonl
(bench/rows.py: $OUT/reports/results when OUT is set).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

ROWS: list[dict] = []
"""Every row recorded in this session, for the summary table."""


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gb_s() -> float:
    from bench.hardware import measure_copy_bandwidth

    return measure_copy_bandwidth(nbytes=2 << 30, iters=20) / 1e9


def time_ms(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median event-timed milliseconds of fn() with a flushed L2 before each repetition."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def record(benchmark, fn: Callable[[], object], *, kernel: str, backend: str, shape: dict,
           bytes_moved: int, flops: float | None = None) -> dict:
    """Times fn, stores GB/s and % of copy bandwidth in benchmark.extra_info and a kernels row,
    and lets pytest-benchmark time fn + synchronize for its own table."""
    ms = time_ms(fn)
    peak = copy_bandwidth_gb_s()
    gb_s = bytes_moved / (ms * 1e-3) / 1e9
    row = {
        "kind": "kernel", "kernel": kernel, "backend": backend, **shape,
        "time_us": round(ms * 1e3, 2), "bytes": bytes_moved, "gb_s": round(gb_s, 1),
        "copy_bw_gb_s": round(peak, 1), "pct_of_copy_bw": round(100 * gb_s / peak, 1),
    }
    if flops is not None:
        row["tflops"] = round(flops / (ms * 1e-3) / 1e12, 1)
    benchmark.extra_info.update(row)
    ROWS.append(row)
    try:
        from bench.rows import append_row

        append_row(row, "kernels")
    except Exception as e:  # noqa: BLE001 - a row that cannot be written must not hide the figure
        row["row_error"] = repr(e)

    def synced():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=20, warmup_rounds=3, iterations=1)
    return row


def summary_table(rows: list[dict]) -> str:
    """Markdown table of the session's rows (kernel, backend, shape, us, GB/s, % of copy bw)."""
    if not rows:
        return ""
    lines = ["| kernel | backend | shape | us | GB/s | % copy bw | TFLOP/s |",
             "|---|---|---|---:|---:|---:|---:|"]
    skip = {"kind", "kernel", "backend", "time_us", "bytes", "gb_s", "copy_bw_gb_s",
            "pct_of_copy_bw", "tflops", "row_error"}
    for r in rows:
        shape = " ".join(f"{k}={v}" for k, v in r.items() if k not in skip)
        lines.append(f"| {r['kernel']} | {r['backend']} | {shape} | {r['time_us']} | {r['gb_s']} | "
                     f"{r['pct_of_copy_bw']} | {r.get('tflops', '')} |")
    return "\n".join(lines)
