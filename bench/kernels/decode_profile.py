"""Where a decode step's time goes, on the GPU (one device call prints both tables).

    python -m bench.kernels.decode_profile --batch 16 64 --ctx 384 --attn-cases 16:256 16:512 64:512

1. attention: paged decode attention variants (Triton partitions / tile sizes, the CUDA extension's
   split counts) timed inside CUDA graphs over rotating input sets larger than L2, at OPT-1.3B
   shapes (32 heads x 64, bf16): us per call and % of the measured copy bandwidth.
2. step: the engine's decode step at OPT-1.3B (random bf16 weights) per batch: step ms from graph
   replays back to back, then a torch.profiler per-kernel breakdown (GPU us per step, calls per
   step) of eager steps, so the sum of kernel time vs the step time shows the launch / gap share.
Writes decode_profile.json under $OUT when set.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections import defaultdict

import torch

log = logging.getLogger("bench.kernels.decode_profile")


def graph_us(fn_sets, reps: int = 3) -> float:
    """us per call of a list of zero-arg callables captured back to back in one graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for fn in fn_sets:
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            for fn in fn_sets:
                fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / (reps * len(fn_sets)))
    return sorted(times)[2]


def attention_table(cases: list[str], bw: float) -> list[dict]:
    from hybrid.ops import cuda_backend as cb
    from hybrid.ops.paged_attention import paged_decode_attention as tri

    have_cuda = cb.available()
    rows = []
    for case in cases:
        batch, ctx = (int(x) for x in case.split(":"))
        heads, hd, bs = 32, 64, 16
        per_row = -(-ctx // bs)
        width = 32  # the engine's block-table width at max_model_len 512
        kv = batch * ctx * heads * hd * 2 * 2
        nsets = max(2, -(-(256 << 20) // kv))
        sets = []
        for _ in range(nsets):
            nb = batch * per_row + 1
            kc = torch.randn(nb, bs, heads, hd, device="cuda", dtype=torch.bfloat16)
            vc = torch.randn_like(kc)
            bt = torch.zeros(batch, max(width, per_row), dtype=torch.int32, device="cuda")
            bt[:, :per_row] = torch.randperm(batch * per_row, device="cuda").view(batch, per_row).int()
            sl = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
            q = torch.randn(batch, heads, hd, device="cuda", dtype=torch.bfloat16)
            sets.append((q, kc, vc, bt, sl))
        variants = {"triton": {}, "triton-p64": dict(partition_size=64),
                    "triton-p128": dict(partition_size=128), "triton-p256": dict(partition_size=256),
                    "triton-p0": dict(partition_size=0), "triton-bn32-p0": dict(partition_size=0, block_n=32),
                    "triton-bn32-p128": dict(partition_size=128, block_n=32)}
        impls = {k: (lambda a, kw=kw: tri(*a, 0.125, **kw)) for k, kw in variants.items()}
        if have_cuda:
            impls["cuda"] = lambda a: cb.paged_decode_attention(*a, 0.125)
            for s in (1, 2, 4, 8):
                impls[f"cuda-s{s}"] = lambda a, s=s: cb.paged_decode_attention(*a, 0.125, num_splits=s)
        for name, fn in impls.items():
            try:
                us = graph_us([lambda a=a: fn(a) for a in sets])
            except Exception as err:  # noqa: BLE001 - report and go on
                rows.append(dict(part="attention", case=case, variant=name, error=repr(err)[:160]))
                continue
            rows.append(dict(part="attention", case=case, variant=name, us=round(us, 2),
                             pct_copy=round(100 * kv / (us * 1e-6) / bw, 1)))
        del sets
        torch.cuda.empty_cache()
    return rows


def step_profile(batches: list[int], ctx: int, backend: str, steps: int, timeline: bool = False) -> list[dict]:
    from bench.engine_decode import build_model
    from hybrid.config import CacheConfig, EngineConfig, SamplingParams
    from hybrid.engine import HybridEngine
    from hybrid.runner import DecodeRow, SamplingFlags

    model = build_model("opt-1.3b", "cuda", torch.bfloat16)
    eng = HybridEngine(EngineConfig(cache=CacheConfig(gpu_memory_utilization=0.5), max_num_seqs=max(batches),
                                    max_model_len=512, dtype="bfloat16", backend=backend))
    eng.load_weights(model)
    del model
    rows = []
    flags = SamplingFlags(all_greedy=True, filter_top_k_top_p=False, mask_eos=False)
    for b in batches:
        ids = torch.randint(4, 50000, (b, ctx), device="cuda")
        eng.generate(ids, torch.ones_like(ids), SamplingParams(max_new_tokens=steps + 1, ignore_eos=True))
        runner, per_row = eng.runner, -(-(ctx + steps + 1) // 16)
        assert eng.storage.num_blocks >= b * per_row, (eng.storage.num_blocks, b * per_row)

        def mk():
            return [DecodeRow(last_token=5 + i, position=ctx, remaining=steps, num_generated=1,
                              min_new_tokens=0, temperature=0.0, top_k=0, top_p=1.0, stop_on_eos=False,
                              block_table=list(range(i * per_row, (i + 1) * per_row))) for i in range(b)]
        runner.decode(mk(), steps, flags)  # warm (graph captured)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        runner.decode(mk(), steps, flags)
        step_ms = 1e3 * (time.perf_counter() - t0) / steps
        if timeline:
            rows += graph_timeline(runner, mk, steps, flags, b)
        # eager steps under the profiler: per-kernel GPU time (graph replays hide kernel names)
        runner._fill(mk(), runner._bucket(b))
        bb = runner._bucket(b)
        for _ in range(2):
            runner._decode_step(bb, flags)
        torch.cuda.synchronize()
        runner._fill(mk(), bb)
        from torch.profiler import ProfilerActivity, profile

        n_prof = 4
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n_prof):
                runner._decode_step(bb, flags)
            torch.cuda.synchronize()
        per = defaultdict(lambda: [0.0, 0])
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                dt = e.time_range.elapsed_us()
                per[e.name][0] += dt / n_prof
                per[e.name][1] += 1 / n_prof
        total = sum(v[0] for v in per.values())
        ncalls = sum(v[1] for v in per.values())
        rows.append(dict(part="step", batch=b, ctx=ctx, backend=backend, step_ms=round(step_ms, 4),
                         kernel_us_sum=round(total, 1), kernels_per_step=round(ncalls, 1)))
        for name, (us, n) in sorted(per.items(), key=lambda kv: -kv[1][0])[:30]:
            rows.append(dict(part="kernel", batch=b, name=name[:110], us_per_step=round(us, 1),
                             calls_per_step=round(n, 1)))
    from hybrid.ops import linear as L, linear_norm as LN, mlp as MLP

    for name, table in (("linear", L._table), ("linear_norm", LN._table), ("mlp", MLP._table)):
        for key, (ms, vs) in table.items():
            rows.append(dict(part="autotune", table=name, key=str(key), buckets=list(ms), variants=list(vs)))
    eng.release()
    return rows


def graph_timeline(runner, mk, steps: int, flags, b: int) -> list[dict]:
    """Kernel start / end times of CUDA-graph decode steps (CUPTI reports graph kernel nodes): per
    kernel name the summed duration and the summed idle gap before it (negative = overlap, PDL),
    per step. The gap total is the step time no kernel covers."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.decode(mk(), steps, flags)
        torch.cuda.synchronize()
    ev = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA and "memcpy" not in e.name.lower()
                 and "memset" not in e.name.lower()), key=lambda t: t[0])
    if len(ev) < 20:
        log.warning("graph timeline: only %d kernel events (CUPTI did not report graph nodes?)", len(ev))
        return [dict(part="timeline_missing", batch=b, events=len(ev))]
    # steady window: drop the first and last 2 steps' worth of kernels
    per_step = len(ev) / steps
    lo, hi = int(2 * per_step), int(len(ev) - 2 * per_step)
    win = ev[lo:hi]
    n_steps = (hi - lo) / per_step
    agg = defaultdict(lambda: [0.0, 0.0, 0])
    for prev, cur in zip(win, win[1:]):
        a = agg[cur[2]]
        a[0] += cur[1] - cur[0]
        a[1] += cur[0] - prev[1]
        a[2] += 1
    span = win[-1][1] - win[0][0]
    out = [dict(part="timeline", batch=b, us_per_step=round(span / n_steps, 1), kernels_per_step=round(per_step, 1),
                busy_us_per_step=round(sum(v[0] for v in agg.values()) / n_steps, 1),
                gap_us_per_step=round(sum(v[1] for v in agg.values()) / n_steps, 1))]
    for name, (d, g, n) in sorted(agg.items(), key=lambda kv: -(kv[1][0] + kv[1][1])):
        out.append(dict(part="timeline_kernel", batch=b, name=name[:110], us_per_step=round(d / n_steps, 1),
                        gap_before_us_per_step=round(g / n_steps, 1), calls_per_step=round(n / n_steps, 1),
                        us_per_call=round(d / n, 2), gap_per_call=round(g / n, 2)))
    # one layer's sequence, as it ran (kernel, duration, gap before), from the middle of the window
    mid = len(win) // 2
    for prev, cur in zip(win[mid:mid + 14], win[mid + 1:mid + 15]):
        out.append(dict(part="timeline_seq", batch=b, name=cur[2][:80], us=round(cur[1] - cur[0], 2),
                        gap_before=round(cur[0] - prev[1], 2)))
    return out


def prefill_profile(cases: list[str], backend: str) -> list[dict]:
    """One prefill of B prompts x L tokens (the engine's eager prefill path, OPT-1.3B random bf16
    weights): wall ms (median of 5 after a warm-up) and the per-kernel GPU time of one profiled pass,
    with the GEMM FLOPs over that time so the compute floor is visible."""
    from bench.engine_decode import build_model
    from hybrid.config import CacheConfig, EngineConfig
    from hybrid.engine import HybridEngine
    from torch.profiler import ProfilerActivity, profile

    model = build_model("opt-1.3b", "cuda", torch.bfloat16)
    n_params = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    eng = HybridEngine(EngineConfig(cache=CacheConfig(gpu_memory_utilization=0.5), max_num_seqs=256,
                                    max_model_len=512, dtype="bfloat16", backend=backend))
    eng.load_weights(model)
    del model
    rows = []
    for case in cases:
        b, ln = (int(x) for x in case.split(":"))
        eng._ensure_pool(b * (-(-ln // 16)), -(-ln // 16))
        ids = torch.randint(4, 50000, (b, ln)).tolist()
        tables = [list(range(i * -(-ln // 16), (i + 1) * -(-ln // 16))) for i in range(b)]
        eng.runner.prefill(ids, tables)
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            eng.runner.prefill(ids, tables)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        wall_ms = 1e3 * sorted(times)[2]
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            eng.runner.prefill(ids, tables)
            torch.cuda.synchronize()
        per = defaultdict(lambda: [0.0, 0])
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                per[e.name][0] += e.time_range.elapsed_us()
                per[e.name][1] += 1
        total = sum(v[0] for v in per.values())
        tflop = 2 * n_params * b * ln / 1e12
        rows.append(dict(part="prefill", case=case, backend=backend, wall_ms=round(wall_ms, 2),
                         kernel_ms_sum=round(total / 1e3, 2), kernels=sum(v[1] for v in per.values()),
                         layer_gemm_tflop=round(tflop, 2), tflops_at_wall=round(tflop / (wall_ms / 1e3), 1)))
        for name, (us, n) in sorted(per.items(), key=lambda kv: -kv[1][0])[:25]:
            rows.append(dict(part="prefill_kernel", case=case, name=name[:110], us=round(us, 1), calls=n))
    eng.release()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="*", default=[16, 64])
    ap.add_argument("--ctx", type=int, default=384)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--backend", nargs="+", default=["triton"])
    ap.add_argument("--attn-cases", nargs="*", default=["16:256", "16:384", "16:512", "64:384", "64:512"])
    ap.add_argument("--timeline", action="store_true",
                    help="also time the kernels inside graph replays (duration + idle gap before each)")
    ap.add_argument("--prefill", nargs="*", default=[], metavar="B:L",
                    help="also profile one prefill of B prompts x L tokens per case")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from bench.hardware import measure_copy_bandwidth

    bw = measure_copy_bandwidth("cuda")
    print(f"{torch.cuda.get_device_name()} copy bandwidth {bw / 1e12:.2f} TB/s")
    rows = attention_table(args.attn_cases, bw) if args.attn_cases else []
    for r in rows:
        print(f"attn {r['case']:>8} {r['variant']:<18} " + (f"{r['us']:8.2f} us {r['pct_copy']:5.1f}%"
                                                          if "us" in r else r["error"]))
    for backend in args.backend:
        if args.batch:
            rows += (srows := step_profile(args.batch, args.ctx, backend, args.steps, args.timeline))
            for r in srows:
                if r["part"].startswith("timeline") or r["part"] == "autotune":
                    print("  timeline", {k: v for k, v in r.items() if k != "part"})
                elif r["part"] == "step":
                    print(f"\nstep batch {r['batch']} ctx {r['ctx']} {backend}: {r['step_ms']:.3f} ms/step, "
                          f"kernel sum {r['kernel_us_sum']:.0f} us, {r['kernels_per_step']:.0f} kernels")
                else:
                    print(f"  {r['us_per_step']:8.1f} us x{r['calls_per_step']:5.1f}  {r['name']}")
    for backend in args.backend if args.prefill else []:
        rows += (prows := prefill_profile(args.prefill, backend))
        for r in prows:
            if r["part"] == "prefill":
                print(f"\nprefill {r['case']} {backend}: {r['wall_ms']:.2f} ms wall, kernel sum "
                      f"{r['kernel_ms_sum']:.2f} ms, {r['kernels']} kernels, layer GEMMs {r['layer_gemm_tflop']} "
                      f"TFLOP -> {r['tflops_at_wall']} TFLOP/s at wall")
            else:
                print(f"  {r['us']:9.1f} us x{r['calls']:4d}  {r['name']}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "decode_profile.json"), "a") as f:
            json.dump(rows, f)
            f.write("\n")


if __name__ == "__main__":
    main()
