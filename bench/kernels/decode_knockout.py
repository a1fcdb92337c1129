"""What each part of an OPT decode step costs inside the real chain: knock it out and time the step.

    python -m bench.kernels.decode_knockout --batch 16 64 --ctx 384

Per-kernel durations from a profile overlap under programmatic dependent launch (a kernel's
prologue runs while its predecessor drains), so they do not add up to the step. This tool answers
the question a fusion has to answer instead: how much shorter does the step get when a part is not
there at all? Each knockout replaces one call of OPT's decode forward (hybrid/models/opt.py) with
no kernel at all (its input passed through, or a buffer of the right shape), recaptures the decode
graphs and times `steps` graph-replayed steps at OPT-1.3B shapes (random bf16 weights, every row at
`ctx` tokens). The tokens are garbage and nobody reads them; only the time is the point.

Knockouts (combinations with "+"):
  qkv    the fused qkv projection            (linear on qkv_w)
  attn   paged decode attention + KV write   (paged_attention)
  o      out_proj + residual add + LayerNorm (linear_add_norm)
  onorm  only out_proj's block end: its GEMM (linear()'s pick) kept, the residual add + LayerNorm
         kernel dropped (what a norm folded into the MLP's input would save; meaningful where the
         linear + norm autotune picks "unfused", OPT-1.3B at <= 16 rows)
  mlp    fc1 -> ReLU -> fc2 + add + LayerNorm (mlp_add_norm)
  mlpnorm  only the MLP block's end: the split-K reduce + add + LayerNorm kernel after the fused
         MLP kernel (linear_norm.splitk_add_norm as hybrid.ops.mlp calls it)
  head   lm_head (compute_logits)
`--mlp-variant V[:S[:P]]` adds cases "mlp=V...": nothing knocked out, every MLP block forced to
hybrid.ops.mlp variant V (flow variants with S K slices, P fc2 stages streamed before a slice
wait; cluster variants with clusters of S CTAs), the same process and card as the rest. `--norm-variant V` adds cases "norm=V": every
linear_add_norm (out_proj's block end) forced to hybrid.ops.linear_norm variant V; `--linear-variant
V[@N]` adds "lin=V[@N]": every plain projection of <= 64 rows (with N output features, if given)
forced to hybrid.ops.linear variant V.
The delta of a knockout is an upper bound for what fusing that part away can save; the part's own
floor (its bytes at the copy rate) is printed next to it, since a fused version still reads them.
Appends one row per (batch, knockout) to decode_knockout.jsonl (bench.rows.results_dir).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import time

import torch

log = logging.getLogger("bench.kernels.decode_knockout")

PARTS = ("qkv", "attn", "o", "onorm", "mlp", "mlpnorm", "head")


@contextlib.contextmanager
def knocked_out(model, parts: set[str]):
    """OPT's decode forward with `parts` replaced by no kernel (see the module docstring)."""
    from hybrid.models import opt

    unknown = parts - set(PARTS)
    if unknown:
        raise ValueError(f"unknown knockout(s) {sorted(unknown)}; choose from {PARTS}")
    saved = {name: getattr(opt, name) for name in ("linear", "paged_attention", "linear_add_norm", "mlp_add_norm")}
    saved_logits = model.compute_logits
    qkv_ws = {id(lay.qkv_w) for lay in model.layers}
    bufs: dict[tuple, torch.Tensor] = {}

    def buffer(shape, like):  # allocated once per capture (the graph's private pool), never written
        key = (tuple(shape), like.dtype)
        if key not in bufs:
            bufs[key] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return bufs[key]

    if "qkv" in parts:
        def linear(x, w, b=None, act=None):
            if id(w) in qkv_ws:
                return buffer((x.shape[0], w.shape[0]), x)
            return saved["linear"](x, w, b, act=act)
        opt.linear = linear
    if "attn" in parts:
        opt.paged_attention = lambda q, k, v, *a, **kw: q
    if "o" in parts:
        opt.linear_add_norm = lambda x, w, b, residual, *a, **kw: (x, residual)
    elif "onorm" in parts:  # out_proj's GEMM (linear()'s pick) kept, the add + norm kernel after it dropped
        opt.linear_add_norm = lambda x, w, b, residual, *a, **kw: (saved["linear"](x, w, b), residual)
    if "mlp" in parts:
        opt.mlp_add_norm = lambda x, w1, b1, w2, b2, residual, *a, **kw: (x, residual)
    if "head" in parts:
        model.compute_logits = lambda h: buffer((h.shape[0], model.vocab_size), h)
    from hybrid.ops import mlp as MLP

    real_ln = MLP.LN
    if "mlpnorm" in parts:
        class _NoNorm:  # linear_norm as the MLP variants see it, minus the block's end kernel
            def __getattr__(self, name):
                return getattr(real_ln, name)

            @staticmethod
            def splitk_add_norm(part, b, residual, *a, **kw):
                return buffer(residual.shape, residual), residual

        MLP.LN = _NoNorm()
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(opt, name, fn)
        model.compute_logits = saved_logits
        MLP.LN = real_ln


def part_bytes(model, part: str, batch: int, ctx: int) -> int:
    """Bytes the part must read per step (all layers): its weights, or the live KV for attention."""
    lay, n, elt = model.layers[0], model.num_layers, model.layers[0].qkv_w.element_size()
    if part == "qkv":
        return n * lay.qkv_w.numel() * elt
    if part == "attn":
        return n * batch * ctx * 2 * model.hidden * elt
    if part == "o":
        return n * lay.o_w.numel() * elt
    if part == "mlp":
        return n * (lay.fc1_w.numel() + lay.fc2_w.numel()) * elt
    if part == "head":
        return model.embed_tokens.numel() * elt
    if part in ("mlpnorm", "onorm"):
        return 0  # L2-resident partials and rows
    raise ValueError(part)


@contextlib.contextmanager
def mlp_forced(spec: str | None):
    """Every MLP block runs variant V (spec "V", "V:S" or "V:S:P": the flow variants' K slices and
    fc2 weight stages streamed before a slice wait; for the cluster variants S is the cluster size)."""
    from hybrid.ops import mlp as MLP

    if spec is None:
        yield
        return
    v, s, pf = (spec.split(":") + ["", ""])[:3]
    MLP.set_forced(v)
    if v.startswith("cluster"):  # "cluster_pdl:16": CTAs per cluster
        MLP.set_cluster_size(int(s or 0))
    else:
        MLP.set_flow_splits(int(s or 0), int(pf or -1))
    try:
        yield
    finally:
        MLP.set_forced(None)
        MLP.set_flow_splits(0)
        MLP.set_cluster_size(0)


@contextlib.contextmanager
def norm_forced(variant: str | None):
    """Every linear_add_norm runs linear_norm variant `variant`."""
    from hybrid.ops import linear_norm as LN

    LN.set_forced(variant)
    try:
        yield
    finally:
        LN.set_forced(None)


@contextlib.contextmanager
def linear_forced(spec: str | None):
    """Every plain projection (hybrid.ops.linear: qkv, lm_head, and fc1 / out_proj / fc2 where their
    blocks run unfused) of at most 64 rows runs linear variant V where it takes the shape; spec "V"
    or "V@N" (only the projections with N output features, e.g. 6144 = OPT-1.3B's qkv)."""
    from hybrid.ops import linear as L

    variant, only_n = spec, None
    if spec is not None and "@" in spec:
        variant, n = spec.split("@", 1)
        only_n = int(n)
    L.set_forced(variant, only_n=only_n)
    try:
        yield
    finally:
        L.set_forced(None)


def run(batches: list[int], ctx: int, steps: int, cases: list[str], repeats: int,
        mlp_variants: list[str] = (), norm_variants: list[str] = (), linear_variants: list[str] = ()) -> list[dict]:
    from bench.engine_decode import build_model
    from bench.hardware import measure_copy_bandwidth
    from hybrid.config import CacheConfig, EngineConfig, SamplingParams
    from hybrid.engine import HybridEngine
    from hybrid.runner import DecodeRow, SamplingFlags

    bw = measure_copy_bandwidth("cuda")
    hf = build_model("opt-1.3b", "cuda", torch.bfloat16)
    eng = HybridEngine(EngineConfig(cache=CacheConfig(gpu_memory_utilization=0.5), max_num_seqs=max(batches),
                                    max_model_len=512, dtype="bfloat16"))
    eng.load_weights(hf)
    del hf
    model = eng.model
    flags = SamplingFlags(all_greedy=True, filter_top_k_top_p=False, mask_eos=False)
    rows = []
    for b in batches:
        ids = torch.randint(4, 50000, (b, ctx), device="cuda")
        eng.generate(ids, torch.ones_like(ids), SamplingParams(max_new_tokens=steps + 1, ignore_eos=True))
        runner, per_row = eng.runner, -(-(ctx + steps + 1) // 16)

        def mk():
            return [DecodeRow(last_token=5 + i, position=ctx, remaining=steps, num_generated=1,
                              min_new_tokens=0, temperature=0.0, top_k=0, top_p=1.0, stop_on_eos=False,
                              block_table=list(range(i * per_row, (i + 1) * per_row))) for i in range(b)]

        def step_ms() -> float:
            runner.decode(mk(), steps, flags)  # capture + warm
            torch.cuda.synchronize()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                runner.decode(mk(), steps, flags)
                times.append(1e3 * (time.perf_counter() - t0) / steps)
            return sorted(times)[len(times) // 2]

        from hybrid.ops import mlp as MLP

        from hybrid.ops import linear_norm as LN

        picked = {k[-1]: t.chosen for k, t in MLP._timings.items() if k[-1] == runner._bucket(b)}
        print(f"batch {b}: the MLP autotune picked {sorted(set(picked.values())) or 'nothing'}", flush=True)
        lay = model.layers[0]
        o_pick = LN.choice(runner._bucket(b), *lay.o_w.shape, lay.o_w.dtype, lay.o_b is not None, "layer")
        print(f"batch {b}: out_proj's block end runs {o_pick}", flush=True)
        base = None
        extra = ([f"mlp={v}" for v in mlp_variants] + [f"norm={v}" for v in norm_variants] +
                 [f"lin={v}" for v in linear_variants])
        for case in ["none"] + [c for c in cases if c != "none"] + extra:
            forced = case[4:] if case.startswith("mlp=") else None
            nforced = case[5:] if case.startswith("norm=") else None
            lforced = case[4:] if case.startswith("lin=") else None
            parts = set() if case == "none" or forced or nforced or lforced else set(case.split("+"))
            runner.drop_graphs()
            with knocked_out(model, parts), mlp_forced(forced), norm_forced(nforced), linear_forced(lforced):
                ms = step_ms()
            runner.drop_graphs()
            base = ms if case == "none" else base
            floor_us = sum(part_bytes(model, p, b, ctx) for p in parts) / bw * 1e6
            row = dict(bench="decode_knockout", model="opt-1.3b", batch=b, ctx=ctx, knockout=case,
                       step_ms=round(ms, 4), delta_us=round(1e3 * (base - ms), 1),
                       delta_us_per_layer=round(1e3 * (base - ms) / model.num_layers, 2),
                       parts_floor_us=round(floor_us, 1), copy_tbps=round(bw / 1e12, 3),
                       mlp_autotuned=",".join(sorted(set(picked.values()))) or None, o_norm_autotuned=o_pick)
            rows.append(row)
            print(f"batch {b:4d} knockout {case:<16} {ms:7.4f} ms/step  saves {row['delta_us']:7.1f} us "
                  f"({row['delta_us_per_layer']:5.2f}/layer)  parts' floor {floor_us:7.1f} us", flush=True)
    eng.release()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--ctx", type=int, default=384)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mlp-variant", nargs="*", default=[], metavar="V[:S[:P]]",
                    help="also time the step with every MLP forced to hybrid.ops.mlp variant V (S: flow K slices or cluster size, P: prefetch)")
    ap.add_argument("--norm-variant", nargs="*", default=[], metavar="V",
                    help="extra cases norm=V: every linear_add_norm forced to hybrid.ops.linear_norm variant V")
    ap.add_argument("--linear-variant", nargs="*", default=[], metavar="V[@N]",
                    help="extra cases lin=V[@N]: every plain projection of <= 64 rows (with N output features, if "
                         "given) forced to hybrid.ops.linear variant V")
    ap.add_argument("--out", default=None, help="results directory (default: $OUT/reports/results or reports/results)")
    ap.add_argument("--cases", nargs="*", default=["qkv", "attn", "o", "mlp", "head", "qkv+attn", "o+mlp",
                                                   "qkv+attn+o+mlp"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rows = run(args.batch, args.ctx, args.steps, args.cases, args.repeats, args.mlp_variant, args.norm_variant,
               args.linear_variant)
    from bench.rows import append_row

    for r in rows:
        append_row(r, "decode_knockout", args.out)


if __name__ == "__main__":
    main()
