"""EngineConfig.keep_graphs_across_release, off vs on in one process: what the rollout after
release() + load_weights() costs (what every PPO step pays), and what the kept graphs hold while
training has the memory.

    python -m bench.keep_graphs --model opt-1.3b --batch 16 64 --churn-mb 0 4096

Per (batch, churn, keep): a warm generate (decode graphs captured), release(), the memory still
allocated / reserved (what training does not get back), then `churn` MB allocated and freed
(training's tensors: the allocator keeps them cached, so the next pool may land elsewhere),
load_weights(), and the timed generate: its seconds, per-step ms, graph capture seconds and whether
the graphs were reused. Random-weight bf16 model (bench.engine_decode.build_model). Rows:
keep_graphs.jsonl (bench.rows.results_dir).
"""
from __future__ import annotations

import argparse
import logging

import torch

log = logging.getLogger("bench.keep_graphs")


def run(model_name: str, batches: list[int], churns: list[int], prompt_len: int, gen_len: int,
        device: str, out: str | None) -> list[dict]:
    from bench.engine_decode import build_model, sync_time
    from bench.rows import append_row
    from hybrid.config import CacheConfig, EngineConfig, SamplingParams
    from hybrid.engine import HybridEngine

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hf = build_model(model_name, device, dtype)
    max_len = prompt_len + gen_len
    blocks = None if device == "cuda" else max(batches) * -(-max_len // 16)  # CPU: no memory budget to size from
    eng = HybridEngine(EngineConfig(cache=CacheConfig(gpu_memory_utilization=0.5, num_blocks=blocks),
                                    max_num_seqs=max(batches), max_model_len=max_len,
                                    dtype=str(dtype).removeprefix("torch."), device=device))
    params = SamplingParams(max_new_tokens=gen_len, ignore_eos=True)
    cuda = device == "cuda"
    mb = lambda f: round(f() / 2**20, 1) if cuda else None  # noqa: E731
    rows = []
    for b in batches:
        ids = torch.randint(4, hf.config.vocab_size, (b, prompt_len), device=device)
        mask = torch.ones_like(ids)
        for churn in churns:
            for keep in (False, True):
                eng.config.keep_graphs_across_release = keep
                eng.load_weights(hf)
                eng.generate(ids, mask, params)  # warm: graphs captured for the buckets this passes
                eng.release()
                held = dict(allocated_mb=mb(torch.cuda.memory_allocated), reserved_mb=mb(torch.cuda.memory_reserved))
                if churn:
                    t = torch.empty(churn << 20, dtype=torch.uint8, device=device)
                    del t  # freed to the allocator's cache, not to the driver
                eng.load_weights(hf)
                t0 = sync_time()
                eng.generate(ids, mask, params)
                total = sync_time() - t0
                st = eng.stats
                row = dict(bench="keep_graphs", model=model_name, batch=b, prompt_len=prompt_len, gen_len=gen_len,
                           keep_graphs=keep, churn_mb=churn, generate_s=round(total, 4),
                           per_step_ms=round(st.per_step_ms, 4) if st.per_step_ms else None,
                           capture_s=round(st.capture_s, 4), graphs_reused=bool(st.graphs_reused),
                           after_release_allocated_mb=held["allocated_mb"],
                           after_release_reserved_mb=held["reserved_mb"])
                rows.append(row)
                append_row(row, "keep_graphs", out)
                print(f"batch {b:4d} churn {churn:6d} MB keep {str(keep):5}: generate {total:.4f} s, "
                      f"step {row['per_step_ms']} ms, capture {st.capture_s:.4f} s, reused {bool(st.graphs_reused)}, "
                      f"held after release {held['allocated_mb']} MB allocated / {held['reserved_mb']} MB reserved",
                      flush=True)
                eng.release()
                if eng.runner is not None:  # the next case starts from no graphs
                    eng.runner.drop_graphs()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="opt-1.3b")
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--churn-mb", type=int, nargs="+", default=[0, 4096],
                    help="MB allocated and freed between release() and the next rollout (training's tensors)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="results directory (default: $OUT/reports/results or reports/results)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run(args.model, args.batch, args.churn_mb, args.prompt_len, args.gen_len, args.device, args.out)


if __name__ == "__main__":
    main()
