"""Where the stream-K skinny GEMM's time goes (csrc/skinny_streamk.cu stamps), isolated launches.

    python -m bench.kernels.streamk_phases --m 16 64 --proj qkv fc1 o

Each launch runs on its own weight copy (rotated over more than the L2), eagerly, after a
synchronize (and the same launches back to back in a CUDA graph give the time per call), with per-CTA %globaltimer stamps: start (past the PDL wait), first unit landed, last
unit consumed, after the last flush. Prints min / median / max over CTAs of each stamp, in us
after the earliest start, the median over launches; and the unit count per CTA with the bytes that
implies at the card's copy rate. Appends one row per (proj, m) to streamk_phases.jsonl.
"""
from __future__ import annotations

import argparse
import statistics

import torch

SHAPES = {"qkv": (6144, 2048), "o": (2048, 2048), "fc1": (8192, 2048), "fc2": (2048, 8192)}
NAMES = ("start", "first_unit", "last_unit", "flush_partial", "flush_ticket", "flush_sum", "end")
STAMP_INDEX = (0, 1, 2, 4, 5, 6, 7)


def run(ms: list[int], projs: list[str], launches: int, ctas: int) -> list[dict]:
    from bench.hardware import measure_copy_bandwidth
    from hybrid.ops import cuda_streamk as sk

    dev = torch.device("cuda")
    bw = measure_copy_bandwidth(dev)
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size or (50 << 20)
    rows = []
    for proj in projs:
        n, k = SHAPES[proj]
        copies = max(4, -(-2 * l2 // (n * k * 2)))
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * k ** -0.5 for _ in range(copies)]
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            g = ctas or sk.default_ctas(n, k, dev)
            st = torch.zeros(g * sk.STAMPS, dtype=torch.int64, device=dev)
            for i in range(4):  # warm-up: build, tensor-map entry point, allocator
                sk.skinny_gemm_streamk(x, ws[i % copies], None, False, ctas=g)
            per = {name: [] for name in NAMES}
            elapsed = []
            for i in range(launches):
                st.zero_()
                torch.cuda.synchronize()
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                sk.skinny_gemm_streamk(x, ws[i % copies], None, False, ctas=g, stamps=st)
                e1.record()
                torch.cuda.synchronize()
                elapsed.append(1e3 * e0.elapsed_time(e1))
                raw = st.view(g, sk.STAMPS)
                t = raw.double()
                t = (t - t[:, 0].min()) / 1e3
                for j, name in zip(STAMP_INDEX, NAMES):
                    col = t[:, j].sort().values
                    if name.startswith("flush"):  # written only where the last tile was split / summed
                        col = t[:, j][raw[:, j] > 0].sort().values
                        if len(col) == 0:
                            per[name].append((float("nan"),) * 3)
                            continue
                    per[name].append((col[0].item(), col[len(col) // 2].item(), col[-1].item()))
            from hybrid.ops.linear import graph_us

            fns = [lambda w=w: sk.skinny_gemm_streamk(x, w, None, False, ctas=g) for w in ws]
            in_graph = graph_us(fns)
            units = (n // 64) * (k // 64)
            share = units / g * 64 * 64 * 2
            row = dict(bench="streamk_phases", proj=proj, n=n, k=k, m=m, ctas=g, launches=launches, nvcc_extra=_nvcc_extra(),
                       units_per_cta=round(units / g, 2), bytes_per_cta=int(share),
                       stream_us_at_copy_rate=round(share * g / bw * 1e6, 2),
                       event_us=round(statistics.median(elapsed), 2), graph_us=round(in_graph, 2), copy_tbps=round(bw / 1e12, 3))
            for name in NAMES:
                row[name] = [round(statistics.median(v[j] for v in per[name]), 2) for j in range(3)]
            rows.append(row)
            print(f"{proj:>4} M={m:<3} ctas {g} units/CTA {units / g:6.2f}  graph {in_graph:6.2f} us  "
                  f"(bytes at copy rate {row['stream_us_at_copy_rate']:.2f} us)  " +
                  "  ".join(f"{name} {row[name][0]:.2f}/{row[name][1]:.2f}/{row[name][2]:.2f}" for name in NAMES),
                  flush=True)
    return rows


def _nvcc_extra() -> str:
    """The build's experiment flags (HYBRID_NVCC_EXTRA; "" = the default build), kept in every row."""
    from hybrid.ops import cuda_backend as cb

    return " ".join(cb.extra_nvcc_flags())


def trace_summary(raw: list[int], units: int) -> tuple[list[list[float]], dict[str, float]]:
    """The trace build's 257 stamps (4 x 64 per-unit %globaltimer ns: copy issued, data ready,
    wgmma issued, wgmma done; then CTA 0's start) -> the 4 columns in us after the start for the
    CTA's `units` units, and the medians: ready -> done, issue -> ready (units past the 12-deep
    prologue, whose copies wait for a free slot) and the spacing of consecutive ready times."""
    t0 = raw[256]
    cols = [[(raw[64 * c + i] - t0) / 1e3 for i in range(units)] for c in range(4)]
    steady = range(min(12, units - 1), units)
    gaps = {"ready_to_done": statistics.median(cols[3][i] - cols[1][i] for i in range(units)),
            "issue_to_ready": statistics.median(cols[1][i] - cols[0][i] for i in steady),
            "ready_spacing": statistics.median(cols[1][i + 1] - cols[1][i] for i in range(units - 1))}
    return cols, gaps


def trace(m: int, proj: str, ctas: int) -> dict:
    """One launch of a HYBRID_NVCC_EXTRA="-DHYBRID_STREAMK_TRACE=1" build: CTA 0's per-unit times (us
    after its start) of the producer's copy issue, the data seen ready, the wgmma group issued and
    done; prints them and the median gaps."""
    from hybrid.ops import cuda_streamk as sk

    n, k = SHAPES[proj]
    dev = torch.device("cuda")
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * k ** -0.5
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    g = ctas or sk.default_ctas(n, k, dev)
    st = torch.zeros(max(g * sk.STAMPS, 257), dtype=torch.int64, device=dev)
    for _ in range(3):
        sk.skinny_gemm_streamk(x, w, None, False, ctas=g)
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(4)]  # W from DRAM, not L2
    torch.cuda.synchronize()
    sk.skinny_gemm_streamk(x, ws[-1], None, False, ctas=g, stamps=st)
    torch.cuda.synchronize()
    units = min(64, (n // 64) * (k // 64) // g)  # CTA 0 holds units [0, U // G)
    cols, gaps = trace_summary(st[:257].tolist(), units)
    print(f"{proj} M={m} ctas {g}: CTA 0, us after its start (issued / ready / mma issued / mma done)")
    for i in range(units):
        print(f"  unit {i:2d} wg {i % 2}  {cols[0][i]:7.3f} {cols[1][i]:7.3f} {cols[2][i]:7.3f} {cols[3][i]:7.3f}")
    print("  medians: " + ", ".join(f"{k_} {v:.3f} us" for k_, v in gaps.items()))
    return dict(bench="streamk_trace", proj=proj, n=n, k=k, m=m, ctas=g, units=units, nvcc_extra=_nvcc_extra(),
                issued=cols[0], ready=cols[1], mma_issued=cols[2], mma_done=cols[3],
                **{f"median_{k_}_us": round(v, 3) for k_, v in gaps.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--proj", nargs="+", default=["qkv", "fc1", "o"], choices=sorted(SHAPES))
    ap.add_argument("--launches", type=int, default=16)
    ap.add_argument("--ctas", type=int, default=0, help="grid size (0: one per SM)")
    ap.add_argument("--out", default=None, help="results directory (default: $OUT/reports/results or reports/results)")
    ap.add_argument("--trace", action="store_true",
                    help="per-unit times of CTA 0 (needs HYBRID_NVCC_EXTRA=-DHYBRID_STREAMK_TRACE=1)")
    args = ap.parse_args()
    if args.trace:
        from bench.rows import append_row

        for proj in args.proj:
            for m in args.m:
                append_row(trace(m, proj, args.ctas), "streamk_trace", args.out)
        return
    rows = run(args.m, args.proj, args.launches, args.ctas)
    from bench.rows import append_row

    for r in rows:
        append_row(r, "streamk_phases", args.out)


if __name__ == "__main__":
    main()
