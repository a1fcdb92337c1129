"""Tuning sweep of the Triton paged decode attention: tile (block_n), warps, pipeline stages,
tensor-core vs broadcast-sum path and split-K partition, per decode shape, on the GPU.

    python -m bench.kernels.sweep_paged_attention [--quick] [--cases opt-1.3b:16:512,...]

Prints, per case, the fastest configurations with time, GB/s and % of the measured copy bandwidth,
the default configuration's figures beside them, and writes every measurement to
$OUT/sweep_paged_attention.json (or ./sweep_paged_attention.json). The defaults in
hybrid/ops/paged_attention.py are chosen from this table.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import torch

from bench.kernels.harness import copy_bandwidth_gb_s, time_ms
from bench.kernels.test_bench_paged_attention import decode_inputs
from hybrid.ops import reference
from hybrid.ops.paged_attention import paged_decode_attention

DEFAULT_CASES = ["opt-1.3b:16:256", "opt-1.3b:16:512", "opt-1.3b:64:512", "opt-1.3b:256:512",
                 "llama-7b:64:512", "llama3-8b:16:2048"]


def _configs(quick: bool, mha: bool):
    tiles = [32, 64] if quick else [16, 32, 64, 128]
    warps = [4] if quick else [2, 4, 8]
    stages = [2, 3] if quick else [1, 2, 3, 4]
    for bn, w, s in itertools.product(tiles, warps, stages):
        yield {"block_n": bn, "num_warps": w, "num_stages": s, "use_dot": True}
    if mha:
        for bn, w in itertools.product([32, 64], [2, 4]):
            yield {"block_n": bn, "num_warps": w, "num_stages": 1, "use_dot": False}


def run_case(case: str, quick: bool) -> list[dict]:
    shape, batch, ctx = case.split(":")
    batch, ctx = int(batch), int(ctx)
    args, moved = decode_inputs(shape, batch, ctx)
    q = args[0]
    scale = q.shape[-1] ** -0.5
    ref = reference.paged_decode_attention(q.float(), args[1].float(), args[2].float(), *args[3:],
                                           scale)
    peak = copy_bandwidth_gb_s()
    mha = q.shape[1] == args[1].shape[2]
    results = []

    def measure(cfg):
        try:
            out = paged_decode_attention(*args, scale, **cfg)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            ms = time_ms(lambda: paged_decode_attention(*args, scale, **cfg))
        except Exception as e:  # noqa: BLE001 - a config that fails to compile is reported, not fatal
            results.append({"case": case, **cfg, "error": repr(e)[:200]})
            return None
        row = {"case": case, **cfg, "time_us": round(ms * 1e3, 2),
               "gb_s": round(moved / ms / 1e6, 1), "pct": round(100 * moved / ms / 1e6 / peak, 1),
               "rel_err": err}
        results.append(row)
        return row

    default = measure({})
    if default:
        default["config"] = "default"
    for cfg in _configs(quick, mha):
        measure({**cfg, "partition_size": 0})
    ok = [r for r in results if "time_us" in r and r.get("config") != "default"]
    best = min(ok, key=lambda r: r["time_us"])
    base = {k: best[k] for k in ("block_n", "num_warps", "num_stages", "use_dot")}
    for part in ([128, 256] if quick else [64, 128, 256, 512]):
        if part < ctx and part % base["block_n"] == 0:
            measure({**base, "partition_size": part})
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES),
                    help="comma list of model:batch:context (models: opt-1.3b, llama-7b, llama3-8b)")
    ap.add_argument("--quick", action="store_true", help="a smaller grid of configurations")
    ap.add_argument("--top", type=int, default=5, help="configurations shown per case")
    a = ap.parse_args()
    t0 = time.time()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {copy_bandwidth_gb_s():.0f} GB/s")
    all_rows = []
    for case in a.cases.split(","):
        rows = run_case(case, a.quick)
        all_rows += rows
        ok = sorted((r for r in rows if "time_us" in r), key=lambda r: r["time_us"])
        default = next((r for r in rows if r.get("config") == "default"), None)
        print(f"\n## {case}   (default: {default and default['time_us']} us, {default and default['pct']}%)")
        print("| block_n | warps | stages | dot | partition | us | GB/s | % copy | rel err |")
        print("|---:|---:|---:|---|---:|---:|---:|---:|---:|")
        for r in ok[: a.top] + [r for r in ok if r.get("partition_size", 0) not in (0, None)]:
            print(f"| {r.get('block_n', '-')} | {r.get('num_warps', '-')} | {r.get('num_stages', '-')} | "
                  f"{r.get('use_dot', '-')} | {r.get('partition_size', 'auto')} | {r['time_us']} | "
                  f"{r['gb_s']} | {r['pct']} | {r['rel_err']:.1e} |")
        failed = [r for r in rows if "error" in r]
        if failed:
            print(f"{len(failed)} configs failed, first: {failed[0]}")
    path = os.path.join(os.environ.get("OUT", "."), "sweep_paged_attention.json")
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "copy_bw_gb_s": copy_bandwidth_gb_s(),
                   "rows": all_rows}, f, indent=1)
    print(f"\nwrote {path} ({len(all_rows)} rows) in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
