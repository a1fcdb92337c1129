"""Every cuBLASLt heuristic candidate for the decode GEMMs, timed in CUDA graphs (on the GPU).

    python -m bench.kernels.lt_algos --model opt-1.3b --m 16 64

Per projection and row count: F.linear (torch's cuBLAS pick), the other variants hybrid.ops.linear's
autotune offers, and each cuBLASLt heuristic candidate (hybrid.ops.cublaslt), each timed over
rotating weight copies larger than L2 (linear.graph_us / weight_copies), checked against F.linear.
Prints one table per shape; rows go to $OUT/lt_algos.jsonl when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import logging
import os

import torch


def model_shapes(cfg) -> list[tuple[str, "object"]]:
    """(name, LinearShape) of the decode projections of an OPT or LLaMA config."""
    from hybrid.ops.linear import LinearShape

    h, v = cfg.hidden_size, cfg.vocab_size
    if cfg.model_type == "opt":
        f = cfg.ffn_dim
        return [("qkv", LinearShape(3 * h, h, True)), ("o", LinearShape(h, h, True)),
                ("fc1", LinearShape(f, h, True, "relu")), ("fc2", LinearShape(h, f, True)),
                ("lm_head", LinearShape(v, h))]
    f, kv = cfg.intermediate_size, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    hd = h // cfg.num_attention_heads
    return [("qkv", LinearShape(h + 2 * kv * hd, h)), ("o", LinearShape(h, h)), ("gate_up", LinearShape(2 * f, h)),
            ("down", LinearShape(h, f)), ("lm_head", LinearShape(v, h))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="opt-1.3b")
    ap.add_argument("--m", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--max-algos", type=int, default=16)
    ap.add_argument("--proj", nargs="*", default=None, help="only these projections (qkv, o, fc1, fc2, lm_head)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from hybrid.ops import cublaslt
    from hybrid.ops import linear as L
    from rlhf.models import resolve_config

    dev = torch.device("cuda")
    dtype = torch.bfloat16
    shapes = [s for s in model_shapes(resolve_config(args.model)) if args.proj is None or s[0] in args.proj]
    bw = L.copy_bandwidth(dev)
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    print(f"{torch.cuda.get_device_name()} copy bandwidth {bw / 1e12:.2f} TB/s, L2 {l2 >> 20} MB")
    out = open(os.path.join(os.environ["OUT"], "lt_algos.jsonl"), "a") if os.environ.get("OUT") else None
    for proj, shape in shapes:
        ws, bs = L.weight_copies(shape.n, shape.k, shape.has_bias, dev, dtype, l2, 8)
        wbytes = shape.n * shape.k * 2
        for m in args.m:
            x = torch.empty(m, shape.k, device=dev, dtype=dtype).normal_()
            ref = L._cublas(x, ws[0], bs[0], shape.act)
            us = {}
            for v in L.candidates(shape, dev, m, dtype):
                try:
                    us[v] = L.graph_us([lambda w=w, b=b, v=v: L.run_variant(v, x, w, b, shape.act)
                                        for w, b in zip(ws, bs)])
                except Exception as err:  # noqa: BLE001
                    print(f"  {v}: {err!r}"[:200])
            p = cublaslt.plan(m, shape.n, shape.k, dtype, shape.has_bias, shape.act, dev.index or 0, args.max_algos)
            lt = {}
            for info in p.infos:
                try:
                    y = p.run(info.index, x, ws[0], bs[0])
                    err = (y.float() - ref.float()).abs().max().item()
                    if not L._close(y, ref):
                        print(f"  lt{info.index} {info.describe()}: WRONG (max err {err:.3g})")
                        continue
                    lt[info.index] = L.graph_us([lambda w=w, b=b, i=info.index: p.run(i, x, w, b)
                                                 for w, b in zip(ws, bs)])
                except Exception as err:  # noqa: BLE001
                    print(f"  lt{info.index} {info.describe()}: {err!r}"[:200])
            floor = wbytes / bw * 1e6
            best_v = min(us, key=us.get)
            best_lt = min(lt, key=lt.get) if lt else None
            print(f"\n{proj} {shape.n}x{shape.k} M={m} floor {floor:.1f} us | cublas {us.get('cublas', 0):.1f} | "
                  f"best variant {best_v} {us[best_v]:.1f} | best lt "
                  + (f"lt{best_lt} {lt[best_lt]:.1f} ({p.infos[best_lt].describe()})" if lt else "none"))
            print("   variants: " + ", ".join(f"{v} {t:.1f}" for v, t in sorted(us.items(), key=lambda kv: kv[1])))
            for i, t in sorted(lt.items(), key=lambda kv: kv[1]):
                print(f"   lt{i:<2} {t:6.1f} us {100 * floor / t:5.1f}%  {p.infos[i].describe()}")
            if out:
                out.write(json.dumps(dict(bench="lt_algos", model=args.model, proj=proj, n=shape.n, k=shape.k,
                                          m=m, device=torch.cuda.get_device_name(), floor_us=round(floor, 2),
                                          variants={v: round(t, 2) for v, t in us.items()},
                                          lt={f"lt{i}": dict(us=round(t, 2), cfg=p.infos[i].describe())
                                              for i, t in lt.items()})) + "\n")
            del x, ref
        del ws, bs
    if out:
        out.close()


if __name__ == "__main__":
    main()
