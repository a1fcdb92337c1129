"""Decode speed of the hybrid engine against HF generate, on one GPU, same run, same card.

    python -m bench.engine_decode --model opt-1.3b --batch 16 64 128 256 --prompt-len 256 --gen-len 256
    python -m bench.engine_decode --systems hybrid --fuse-kv-write both --batch 16 64   # fused KV write A/B

Random-weight bf16 model of the named architecture (shapes are what matter). Per batch size:
- hybrid: the engine's generate(), answers forced to full length (ignore_eos). "cold" is the first
  pass at that batch (pool allocation, Triton compilation, CUDA-graph capture, and in the first one
  of the process the GEMM / fused-variant autotune: autotune_s), "steady" the next
  one, "after_release" a pass after release() + load_weights() (what every PPO step pays: pool
  re-allocation and graph re-capture, no compilation). Per-step time from the engine's own
  decode timer (one host sync per generate: decode steps run back to back).
- hf / hf-static: transformers generate, greedy, min_new_tokens = max_new_tokens, dynamic cache
  and cache_implementation="static" (compiled decode). A warm-up pass first; per decode step =
  (time(gen_len new tokens) - time(1 new token)) / (gen_len - 1).
- --fuse-kv-write on|both: EngineConfig.fuse_kv_write (the decode steps' KV-cache write fused into
  the attention launch); "both" runs the default engine first, then the fused one as system
  "hybrid-fused", same process, same card.
- --fuse-linear-norm on|off|both: EngineConfig.fuse_linear_norm (split-K out_proj / fc2 with the
  residual add + norm in its reduce, where autotune measures it faster); both adds system
  "hybrid-unfused-norm" (GEMM + separate norm launch), same process.
- --force-linear VARIANT[:MAX_M] ...: one more variant each, every projection with <= MAX_M rows
  through that linear variant (e.g. cuda_skinny_pdl: the CUDA skinny GEMM with programmatic
  dependent launch), fused linear+norm off, as system "hybrid-lin-VARIANT-MAX_M".
- --fuse-mlp on|off|both: EngineConfig.fuse_mlp (fc1 -> ReLU -> fc2 as one persistent launch where
  its autotune measures it faster; on by default); off: rows named hybrid-nomlp...; both: the
  default engine, then "hybrid-nomlp", same process.
- --l2-prefetch MODE:MB ...: one more variant each, EngineConfig.l2_prefetch_mode / l2_prefetch_mb
  (next-weight L2 prefetch, hybrid/ops/l2_prefetch.py), as system "hybrid-pf-MODE-MB".
MBU = (weight bytes + live KV bytes, averaged over the decode steps) / step time / the card's
measured device-to-device copy bandwidth (bytes read + written). Also load_weights + release time.
Prints a table; appends one JSON row per (system, batch, phase) to $OUT/engine_decode.jsonl
($OUT set) or reports/results/engine_decode.jsonl.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import time

import torch

from bench.hardware import measure_copy_bandwidth
from bench.rows import append_row
from hybrid.config import CacheConfig, EngineConfig, SamplingParams
from hybrid.engine import HybridEngine, set_pdl_launch
from hybrid.models.base import set_fuse_kv_write, set_prefill_impl
from hybrid.ops import linear as linear_ops
from hybrid.ops import mlp as mlp_ops
from hybrid.ops.l2_prefetch import MODES as L2_MODES

log = logging.getLogger("bench.engine_decode")


def build_model(name: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    from rlhf.models import resolve_config

    cfg = resolve_config(name)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def kv_bytes_per_token(cfg) -> int:
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * heads * head_dim * 2  # keys + values, bf16 (CPU smoke runs: same count)


def sync_time() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def hf_step_ms(model, ids, mask, gen_len: int, static: bool, repeats: int = 1) -> tuple[float, list[float], float]:
    """(cold full generate s, `repeats` steady full generate s, steady per decode step ms from
    their median)."""
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=model.config.pad_token_id)
    if static:
        kw["cache_implementation"] = "static"

    def run(n):
        t0 = sync_time()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        return sync_time() - t0

    cold = run(gen_len)
    one = min(run(1) for _ in range(2))
    fulls = [run(gen_len) for _ in range(max(1, repeats))]
    return cold, fulls, 1e3 * (statistics.median(fulls) - one) / (gen_len - 1)


def _env_switch(arg: str, env: str, default) -> bool:
    """--flag default|on|off of a switch read from the environment: on / off set env for this
    process; the result is what the engine will use (env if set to 0 / 1, else default())."""
    if arg != "default":
        os.environ[env] = "1" if arg == "on" else "0"
    val = os.environ.get(env)
    return val == "1" if val in ("0", "1") else bool(default())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="opt-1.3b", help="built-in name (rlhf.models) or local HF dir")
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 64, 128, 256])
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--systems", nargs="+", default=["hybrid", "hf", "hf-static"],
                    choices=["hybrid", "hf", "hf-static"])
    ap.add_argument("--backend", default="auto", help="hybrid ops backend: auto | triton | cuda")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--prefill-attention", default="ops", choices=["ops", "sdpa", "flash"])
    ap.add_argument("--no-autotune-linear", action="store_true",
                    help="every projection through F.linear (EngineConfig.autotune_linear=False)")
    ap.add_argument("--fuse-kv-write", default="off", choices=["off", "on", "both"],
                    help="EngineConfig.fuse_kv_write; both = default then fused (system hybrid-fused)")
    ap.add_argument("--fuse-linear-norm", default="on", choices=["off", "on", "both"],
                    help="EngineConfig.fuse_linear_norm; both = default (on) then off (system hybrid-unfused-norm)")
    ap.add_argument("--fuse-mlp", default="on", choices=["off", "on", "both"],
                    help="EngineConfig.fuse_mlp (persistent fc1 + fc2 launch, csrc/decode_mlp.cu; on by default); "
                         "off: rows hybrid-nomlp...; both: default then hybrid-nomlp")
    ap.add_argument("--force-linear", nargs="+", default=[], metavar="VARIANT[:MAX_M]",
                    help="extra hybrid variants running every projection with <= MAX_M (default 64) rows "
                         "through one linear variant (hybrid.ops.linear.set_forced, e.g. cuda_skinny_pdl), "
                         "fused linear+norm off (system hybrid-lin-VARIANT)")
    ap.add_argument("--l2-prefetch", nargs="+", default=[], metavar="MODE:MB",
                    help="extra hybrid variants with EngineConfig.l2_prefetch_mode / _mb, e.g. side-bulk:16 "
                         "inline-line:8 (system hybrid-pf-MODE-MB), after the default engine, same process")
    ap.add_argument("--pdl", default="on", choices=["off", "on", "both"],
                    help="programmatic dependent launch of the decode kernels (EngineConfig.pdl_launch, on "
                         "by default); off: rows named hybrid-nopdl; both: hybrid and hybrid-nopdl")
    ap.add_argument("--skinny-gemm", default="default", choices=["default", "on", "off"],
                    help="offer the CUDA skinny GEMM to the linear autotune (EngineConfig.skinny_gemm, on by "
                         "default; sets HYBRID_SKINNY_GEMM for this process); rows without it are named "
                         "hybrid-noskinny...")
    ap.add_argument("--lt-gemm", default="default", choices=["default", "on", "off"],
                    help="offer cuBLASLt's other heuristic candidates to the linear autotune "
                         "(EngineConfig.cublaslt_gemm, off by default; sets HYBRID_LT_GEMM for this process); "
                         "rows with them are named hybrid-lt...")
    ap.add_argument("--attn-prefetch", default="default", choices=["default", "on", "off"],
                    help="EngineConfig.attn_prefetch (the CUDA decode attention's first KV tile loaded before "
                         "waiting for the previous kernel; on by default; sets HYBRID_ATTN_PREFETCH for this "
                         "process); rows without it are named hybrid-noapf...")
    ap.add_argument("--gemm-kv-write", default="default", choices=["default", "on", "off"],
                    help="EngineConfig.gemm_kv_write (the qkv skinny GEMM stores k / v in the cache; off by "
                         "default; sets HYBRID_GEMM_KV_WRITE for this process); rows with it are named "
                         "hybrid-gkv...")
    ap.add_argument("--mlp-variant", nargs="+", default=[], metavar="VARIANT",
                    help="also run the engine with every MLP block forced to this hybrid.ops.mlp variant "
                         "(e.g. flow_pdl, persistent_pdl, unfused): system hybrid-mlp-VARIANT")
    ap.add_argument("--repeats", type=int, default=3,
                    help="steady-state generates per system and batch; rows report the median (one run's "
                         "HF static time varied 1.35-1.53 s at batch 64 on one H200)")
    ap.add_argument("--load-release-iters", type=int, default=5)
    ap.add_argument("--keep-graphs", choices=["on", "off"], default="on",
                    help="EngineConfig.keep_graphs_across_release (on by default): the after_release pass reuses "
                         "the decode graphs where the pool comes back at their address (rows: graphs_reused)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="directory of engine_decode.jsonl")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of this script")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    # process-wide switches, each an environment variable the engine reads (set here for this process)
    skinny_offered = _env_switch(args.skinny_gemm, "HYBRID_SKINNY_GEMM", linear_ops.skinny_offered)
    lt_offered = _env_switch(args.lt_gemm, "HYBRID_LT_GEMM", linear_ops.lt_offered)
    attn_prefetch = _env_switch(args.attn_prefetch, "HYBRID_ATTN_PREFETCH", lambda: EngineConfig.attn_prefetch)
    gemm_kv = _env_switch(args.gemm_kv_write, "HYBRID_GEMM_KV_WRITE", lambda: EngineConfig.gemm_kv_write)
    bandwidth = measure_copy_bandwidth(args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    log.info("%s: measured copy bandwidth %.2f TB/s (read + write)", name, bandwidth / 1e12)
    model = build_model(args.model, args.device, getattr(torch, args.dtype))
    cfg = model.config
    kvpt = kv_bytes_per_token(cfg)
    max_len = args.prompt_len + args.gen_len
    engine = HybridEngine(EngineConfig(
        cache=CacheConfig(gpu_memory_utilization=args.gpu_memory_utilization,
                          num_blocks=None if args.device == "cuda" else max(args.batch) * -(-max_len // 16)),
        max_num_seqs=max(args.batch), max_model_len=max_len, dtype=args.dtype, backend=args.backend,
        device=args.device, prefill_attention=args.prefill_attention,
        autotune_linear=not args.no_autotune_linear, fuse_kv_write=args.fuse_kv_write == "on",
        keep_graphs_across_release=args.keep_graphs == "on"))
    t0 = time.perf_counter()
    engine.load_weights(model)
    first_load_ms = 1e3 * (time.perf_counter() - t0)
    weight_bytes = engine.model.weight_bytes()
    base = dict(bench="engine_decode", model=args.model, prompt_len=args.prompt_len, gen_len=args.gen_len,
                copy_bandwidth_tb_s=bandwidth / 1e12, weight_bytes=weight_bytes, kv_bytes_per_token=kvpt,
                ops_backend=args.backend, autotune_linear=not args.no_autotune_linear,
                skinny_gemm_offered=skinny_offered, lt_gemm_offered=lt_offered, attn_prefetch=attn_prefetch,
                gemm_kv_write=gemm_kv, keep_graphs=args.keep_graphs == "on")
    rows = []

    def emit(system, batch, phase, step_ms, **extra):
        live_kv = batch * (args.prompt_len + args.gen_len / 2) * kvpt  # mean over decode steps
        moved = weight_bytes + live_kv
        floor_ms = 1e3 * moved / bandwidth
        row = dict(base, system=system, batch=batch, phase=phase, decode_step_ms=step_ms,
                   floor_ms=floor_ms, bytes_per_step=moved,
                   mbu=(floor_ms / step_ms) if step_ms else None, **extra)
        rows.append(row)
        append_row(row, "engine_decode", args.out)

    # (system, fuse_kv_write, fuse_linear_norm, l2 prefetch mode, MB, forced linear, PDL) per hybrid
    # variant; without the CUDA skinny GEMM offered to the autotune every hybrid system is named
    # hybrid-noskinny..., so its rows never pass for the default engine's
    fln = args.fuse_linear_norm != "off"
    variants = [("hybrid-fused" if f else "hybrid", f, fln, "side-bulk", 0.0, None)
                for f in {"off": [False], "on": [True], "both": [False, True]}[args.fuse_kv_write]]
    if args.fuse_linear_norm == "both":
        variants.append(("hybrid-unfused-norm", False, False, "side-bulk", 0.0, None))
    for spec in args.l2_prefetch:
        mode, _, mb = spec.partition(":")
        if mode not in L2_MODES or not mb:
            ap.error(f"--l2-prefetch {spec!r}: MODE:MB with MODE in {L2_MODES}")
        variants.append((f"hybrid-pf-{mode}-{mb}", False, fln, mode, float(mb), None))
    for v in args.mlp_variant:
        if v not in mlp_ops.VARIANTS:
            ap.error(f"--mlp-variant {v!r}: choose from {mlp_ops.VARIANTS}")
        variants.append((f"hybrid-mlp-{v}", False, fln, "side-bulk", 0.0, None))
    for spec in args.force_linear:
        v, _, max_m = spec.partition(":")
        if not linear_ops.known_variant(v):
            ap.error(f"--force-linear {spec!r}: unknown variant")
        variants.append((f"hybrid-lin-{spec.replace(':', '-')}", False, False, "side-bulk", 0.0,
                         (v, int(max_m or 64))))

    # + PDL launch; names say where a row differs from the default engine (PDL on, skinny offered)
    if args.pdl == "off":
        variants = [(v[0].replace("hybrid", "hybrid-nopdl", 1), *v[1:], False) for v in variants]
    else:
        variants = [(*v, True) for v in variants]
        if args.pdl == "both":
            variants.insert(1, ("hybrid-nopdl", *variants[0][1:-1], False))
    # rows of a non-default switch say so in their system name
    for differs, tag in ((not skinny_offered, "noskinny"), (lt_offered, "lt"), (not attn_prefetch, "noapf"),
                         (gemm_kv, "gkv")):
        if differs:
            variants = [(f"hybrid-{tag}" + v[0][len("hybrid"):], *v[1:]) for v in variants]
    # + the persistent MLP (on by default): off renames every variant, both adds one without it
    if args.fuse_mlp == "off":
        variants = [(v[0].replace("hybrid", "hybrid-nomlp", 1), *v[1:]) for v in variants]
    elif args.fuse_mlp == "both":
        variants.insert(1, (variants[0][0].replace("hybrid", "hybrid-nomlp", 1), *variants[0][1:]))
    mlp_systems = {v[0] for v in variants if not v[0].startswith("hybrid-nomlp")}

    def set_variant(fuse: bool, fuse_norm: bool, mode: str, mb: float, forced, use_pdl: bool,
                    fuse_mlp: bool, mlp_forced: str | None = None) -> None:
        # module-level switches read while tracing a step: release() first drops captured graphs
        engine.release()
        mlp_ops.set_forced(mlp_forced)
        engine.config.fuse_mlp = fuse_mlp
        engine.config.pdl_launch = use_pdl
        set_pdl_launch(use_pdl, engine.device)
        engine.config.fuse_kv_write, engine.config.fuse_linear_norm = fuse, fuse_norm
        engine.config.l2_prefetch_mode, engine.config.l2_prefetch_mb = mode, mb
        set_fuse_kv_write(fuse)
        linear_ops.set_forced(*(forced or (None,)))
        engine.load_weights(model)  # sets the prefetch plan from the config

    def picks(batch: int) -> dict:
        """What the autotunes picked for this batch's bucket: the block ends (out_proj, fc2 via
        linear_norm) and the MLP, so a row says which kernels its step ran."""
        from hybrid.ops import linear_norm as LN

        model_, m = engine.model, engine.runner._bucket(batch)
        dt = model_.layers[0].o_w.dtype
        out = {f"norm_{i}_{s.n}x{s.k}": LN.choice(m, s.n, s.k, dt, s.has_bias, s.norm)
               for i, s in enumerate(model_.linear_norm_shapes())}
        if hasattr(model_, "mlp_shapes"):
            out.update({f"mlp_{s.hidden}x{s.ffn}": mlp_ops.choice(m, s, dt) for s in model_.mlp_shapes()})
        return out

    for batch in args.batch:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(4, cfg.vocab_size, (batch, args.prompt_len), generator=g).to(args.device)
        mask = torch.ones_like(ids)
        params = SamplingParams(max_new_tokens=args.gen_len, ignore_eos=True)
        for hybrid, fuse, fuse_norm, pf_mode, pf_mb, forced, use_pdl in variants if "hybrid" in args.systems else []:
            set_variant(fuse, fuse_norm, pf_mode, pf_mb, forced, use_pdl, hybrid in mlp_systems,
                        hybrid.split("-mlp-", 1)[1] if "-mlp-" in hybrid else None)
            try:
                for phase in ("cold", "steady", "after_release"):
                    if phase == "after_release":
                        engine.release()
                        engine.load_weights(model)
                    runs = []  # steady: the median of --repeats generates (total time, its stats)
                    for _ in range(args.repeats if phase == "steady" else 1):
                        t0 = sync_time()
                        out = engine.generate(ids, mask, params)
                        runs.append((sync_time() - t0, copy.copy(engine.stats)))
                        assert out.shape == (batch, max_len)
                    total, st = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
                    emit(hybrid, batch, phase, st.per_step_ms, status="ok", generate_s=total, fuse_kv_write=fuse,
                         pdl_launch=use_pdl, fuse_mlp=hybrid in mlp_systems,
                         fuse_linear_norm=fuse_norm, forced_linear=":".join(map(str, forced)) if forced else None,
                         l2_prefetch=f"{pf_mode}:{pf_mb:g}" if pf_mb else "off",
                         prefill_s=st.prefill_s, decode_s=st.decode_s, capture_s=st.capture_s,
                         graphs_reused=st.graphs_reused,
                         pool_alloc_s=st.pool_alloc_s, autotune_s=st.autotune_s, num_blocks=st.num_blocks,
                         decode_steps=st.num_decode_steps, decode_chunks=st.num_decode_chunks,
                         preemptions=st.num_preemptions, repeats=len(runs),
                         generate_s_all=[round(r[0], 4) for r in runs], picks=picks(batch))
                # prefill attention: the varlen kernel vs SDPA vs torch's varlen flash (prompt-only
                # passes; once per batch: the decode switches do not change the prefill)
                for impl in ("ops", "sdpa", "flash") if hybrid in ("hybrid", "hybrid-noskinny") else ():
                    set_prefill_impl(impl)
                    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
                    engine.generate(ids, mask, one)  # warm-up
                    engine.generate(ids, mask, one)
                    emit(f"{hybrid}-prefill-{impl}", batch, "prefill", None, status="ok",
                         prefill_s=engine.stats.prefill_s, prefill_steps=engine.stats.num_prefill_steps)
                set_prefill_impl(args.prefill_attention)
            except torch.cuda.OutOfMemoryError as err:
                emit(hybrid, batch, "steady", None, status=f"oom: {str(err)[:120]}", fuse_kv_write=fuse)
            engine.release()
        for system in ("hf", "hf-static"):
            if system not in args.systems:
                continue
            try:
                cold, fulls, step = hf_step_ms(model, ids, mask, args.gen_len, static=system == "hf-static",
                                               repeats=args.repeats)
                emit(system, batch, "cold", None, status="ok", generate_s=cold)
                emit(system, batch, "steady", step, status="ok", generate_s=statistics.median(fulls),
                     repeats=len(fulls), generate_s_all=[round(f, 4) for f in fulls])
            except torch.cuda.OutOfMemoryError as err:
                emit(system, batch, "steady", None, status=f"oom: {str(err)[:120]}")
            if args.device == "cuda":
                torch.cuda.empty_cache()

    cycles = []
    for _ in range(args.load_release_iters):
        t0 = sync_time()
        engine.load_weights(model)
        engine.release()
        cycles.append(1e3 * (sync_time() - t0))
    load_ms = []
    for _ in range(args.load_release_iters):
        t0 = sync_time()
        engine.load_weights(model)
        load_ms.append(1e3 * (sync_time() - t0))
    emit("hybrid", 0, "load_weights+release", None, status="ok", first_load_ms=first_load_ms,
         load_release_ms=statistics.median(cycles), load_weights_ms=statistics.median(load_ms),
         release_ms=1e3 * engine.last_release_s)

    print(f"\n{args.model} on {name}, prompt {args.prompt_len} + {args.gen_len} new tokens, {args.dtype}, "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, linear autotune {'off' if args.no_autotune_linear else 'on'}")
    print(f"{'system':<22}{'batch':>6} {'phase':<14}{'step ms':>9}{'floor ms':>9}{'MBU':>7}  generate s")
    for r in rows:
        if r["phase"] == "load_weights+release":
            continue
        step = f"{r['decode_step_ms']:.2f}" if r.get("decode_step_ms") else "-"
        mbu = f"{100 * r['mbu']:.0f}%" if r.get("mbu") else "-"
        gen = f"{r['generate_s']:.2f}" if r.get("generate_s") else (
            f"prefill {r['prefill_s']:.3f}" if r.get("prefill_s") else r["status"][:12])
        print(f"{r['system']:<22}{r['batch']:>6} {r['phase']:<14}{step:>9}{r['floor_ms']:>9.2f}{mbu:>7}  {gen}")
    print(f"load_weights + release: {statistics.median(cycles):.1f} ms median "
          f"(load_weights alone {statistics.median(load_ms):.1f} ms; first load {first_load_ms:.0f} ms)")


if __name__ == "__main__":
    main()
