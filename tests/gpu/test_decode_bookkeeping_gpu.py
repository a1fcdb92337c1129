"""Fused decode-step bookkeeping on the GPU: the Triton ops equal the torch reference, graph-replayed
decode equals eager decode (EOS stops and the min_new_tokens ban included), and the kernels per
decode step of an OPT-1.3B-shaped model at batch 16 (CUDA graphs), fused against the torch-reference
bookkeeping on the same machine. Records to $OUT/decode_kernels.jsonl when $OUT is set.

    OMP_NUM_THREADS=4 python3 -m pytest -q -s -m gpu tests/gpu/test_decode_bookkeeping_gpu.py
"""
import json
import os
import time
from collections import Counter

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from hybrid import ops
from hybrid.config import CacheConfig, EngineConfig, SamplingParams
from hybrid.engine import HybridEngine
from hybrid.ops import reference
from hybrid.runner import DecodeRow, SamplingFlags

pytestmark = pytest.mark.gpu

BOOKKEEPING_OPS = ("decode_prepare", "ban_eos", "decode_advance")


@pytest.fixture(autouse=True)
def _restore_ops_backend():
    before = ops.get_backend()
    yield
    ops.set_backend(before)


def _record(row: dict) -> None:
    print(json.dumps(row))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "decode_kernels.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


def _torch_bookkeeping(monkeypatch) -> None:
    """The three bookkeeping ops on CUDA run their pure-torch reference (the eager chain the fused
    kernels replaced); every other op keeps its backend."""
    real = ops._impl  # patched at the lookup, not in ops._impls: set_backend / autoselect clear that

    def impl(op, device):
        return getattr(reference, op) if op in BOOKKEEPING_OPS else real(op, device)

    monkeypatch.setattr(ops, "_impl", impl)


# ---- the ops against the reference -------------------------------------------------------------

@pytest.mark.parametrize("b", [16, 200])
def test_bookkeeping_ops_equal_reference_cuda(b):
    dev, g = torch.device("cuda"), torch.Generator().manual_seed(b)
    bs, max_blocks = 16, 8
    ints = torch.zeros(6, b + 5, dtype=torch.int64)
    ints[0] = torch.randint(0, 100, (b + 5,), generator=g)
    ints[1] = torch.randint(0, bs * max_blocks + 40, (b + 5,), generator=g)  # some past the table
    ints[2] = torch.randint(-1, 5, (b + 5,), generator=g)
    ints[3] = torch.randint(0, 6, (b + 5,), generator=g)
    ints[4] = torch.randint(0, 6, (b + 5,), generator=g)
    ints[5] = torch.randint(0, 2, (b + 5,), generator=g)
    ints = ints.to(dev)
    bt = torch.randint(0, 1000, (b + 5, max_blocks), generator=g, dtype=torch.int32).to(dev)
    eos = torch.tensor([7, 11, 99], device=dev)
    pos, rem = ints[1, :b], ints[2, :b]
    for got, want in zip(ops.get_impl("decode_prepare", "triton")(pos, rem, bt[:b], bs),
                         reference.decode_prepare(pos, rem, bt[:b], bs)):
        assert torch.equal(got, want)
    logits = torch.randn(b, 1000, device=dev, dtype=torch.bfloat16)
    want = logits.clone()
    ops.get_impl("ban_eos", "triton")(logits, ints[3, :b], ints[4, :b], eos)
    reference.ban_eos(want, ints[3, :b], ints[4, :b], eos)
    assert torch.equal(logits, want)
    states = [[ints.clone(), torch.zeros(8, b + 5, dtype=torch.int64, device=dev),
               torch.tensor([3], device=dev)] for _ in range(2)]
    for step in range(4):
        nxt = torch.randint(0, 20, (b,), generator=g).to(dev)
        nxt[::3] = 7
        for fn, (st, out, idx) in zip((ops.get_impl("decode_advance", "triton"), reference.decode_advance),
                                      states):
            fn(nxt, st[0, :b], st[1, :b], st[2, :b], st[3, :b], st[5, :b], out[:, :b], idx, eos, 1)
    for got, want in zip(*states):
        assert torch.equal(got, want)


# ---- graph-replayed decode against eager decode, tiny model ------------------------------------

def tiny(family: str):
    torch.manual_seed(0)
    if family == "opt":
        cfg = OPTConfig(hidden_size=128, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4, vocab_size=257,
                        max_position_embeddings=256, word_embed_proj_dim=128, pad_token_id=1, eos_token_id=3)
        return OPTForCausalLM(cfg).cuda().eval().to(torch.bfloat16)
    cfg = LlamaConfig(hidden_size=128, num_hidden_layers=2, intermediate_size=192, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=257, max_position_embeddings=256, pad_token_id=0,
                      eos_token_id=2)
    return LlamaForCausalLM(cfg).cuda().eval().to(torch.bfloat16)


def _engine(graphs: bool, eos: int | None = None) -> HybridEngine:
    cfg = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=256), dtype="bfloat16", device="cuda",
                       enable_cuda_graph=graphs, max_num_seqs=16, max_model_len=256, decode_steps_per_sync=5)
    return HybridEngine(cfg, eos_token_id=eos)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_graph_decode_equals_eager_with_fused_bookkeeping(family, monkeypatch):
    model = tiny(family)
    g = torch.Generator().manual_seed(2)
    lens = [50, 7, 33, 12, 90]  # 5 rows: padded to the graph bucket of 8
    prompts = [torch.randint(4, 257, (n,), generator=g).tolist() for n in lens]
    free = _engine(False)
    free.load_weights(model)
    free_run = free.generate_token_ids(prompts, SamplingParams(max_new_tokens=30, ignore_eos=True))
    # a row's first token at step >= 3 not emitted before: with it as EOS the min_new_tokens=3 ban
    # never changes that row's argmax, so the row stops there
    r, k = next((r, k) for r, ans in enumerate(free_run) for k in range(3, 30) if ans[k] not in ans[:k])
    eos = free_run[r][k]
    params = SamplingParams(max_new_tokens=30, min_new_tokens=3)
    outs = {}
    for name, graphs in (("eager", False), ("graph", True), ("graph-torch-bookkeeping", True)):
        if name == "graph-torch-bookkeeping":
            _torch_bookkeeping(monkeypatch)
        eng = _engine(graphs, eos=eos)
        eng.load_weights(model)
        outs[name] = eng.generate_token_ids(prompts, params)
        assert (eng.stats.capture_s > 0) == graphs
        assert eng.stats.num_decode_chunks > 1
    assert outs["graph"] == outs["eager"] == outs["graph-torch-bookkeeping"]
    # (row r itself may drift from the free run: as rows finish, the batch shrinks, and bf16 GEMMs
    # of another M may round differently)
    assert any(len(a) < 30 for a in outs["graph"]), "some row should stop at the chosen EOS"
    assert all(a[-1] == eos and eos not in a[:-1] for a in outs["graph"] if len(a) < 30)
    assert all(eos not in a[:3] for a in outs["graph"]), "min_new_tokens bans EOS for 3 tokens"


# ---- kernels per decode step, OPT-1.3B shapes, batch 16 ----------------------------------------

def _kernel_names(fn) -> list[str]:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    # kernels replayed from a CUDA graph are reported one by one, like eager launches
    return [e.name for e in prof.events()
            if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))]


def _decode_rows(batch: int, start: int, blocks_per_row: int, min_new: int) -> list[DecodeRow]:
    return [DecodeRow(last_token=100 + i, position=start + i, remaining=10 ** 6, num_generated=0,
                      min_new_tokens=min_new, temperature=0.0, top_k=0, top_p=1.0, stop_on_eos=True,
                      block_table=list(range(i * blocks_per_row, (i + 1) * blocks_per_row)))
            for i in range(batch)]


def test_kernels_per_decode_step_opt_1_3b_batch16(monkeypatch):
    from rlhf.models import load_causal_lm

    with torch.device("cuda"):
        model = load_causal_lm("opt-1.3b", dtype=torch.bfloat16).eval()
    batch, bs, max_len = 16, 16, 512
    cfg = EngineConfig(cache=CacheConfig(block_size=bs, num_blocks=batch * max_len // bs + 8), dtype="bfloat16",
                       device="cuda", max_num_seqs=batch, max_model_len=max_len)
    eng = HybridEngine(cfg)
    eng.load_weights(model)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 256, (32,), generator=g).tolist() for _ in range(batch)]
    eng.generate_token_ids(prompts, SamplingParams(max_new_tokens=8))  # pool, kernel choice, compiles
    runner, short, long = eng.runner, 4, 36
    assert eng.eos_token_ids, "the ban kernel needs EOS ids"
    rows_at = 256  # context of each row: a mid-length rollout
    results, tokens = {}, {}
    for bookkeeping in ("fused", "torch"):
        if bookkeeping == "torch":
            _torch_bookkeeping(monkeypatch)
        for mask_eos in (False, True):
            flags = SamplingFlags(all_greedy=True, filter_top_k_top_p=False, mask_eos=mask_eos)
            runner.drop_graphs()
            rows = _decode_rows(batch, rows_at, max_len // bs, min_new=long + 10 if mask_eos else 0)
            tokens[bookkeeping, mask_eos] = runner.decode(rows, long, flags)  # captures, then runs
            # (kernels of `long` steps - kernels of `short` steps) / (long - short): the chunk's
            # fill and readback cancel
            names = {n: _kernel_names(lambda n=n: runner.decode(rows, n, flags)) for n in (short, long)}
            per_step = (len(names[long]) - len(names[short])) / (long - short)
            wall = {}
            for n in (short, long):
                times = []
                for _ in range(5):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    runner.decode(rows, n, flags)  # ends in a host sync
                    times.append(time.perf_counter() - t0)
                wall[n] = min(times)
            step_ms = 1e3 * (wall[long] - wall[short]) / (long - short)
            results[bookkeeping, mask_eos] = per_step
            _record({"test": "decode_kernels", "model": "opt-1.3b", "batch": batch, "context": rows_at,
                     "bookkeeping": bookkeeping, "mask_eos": mask_eos, "cuda_graphs": True,
                     "kernels_per_step": per_step, "step_ms": round(step_ms, 4),
                     "device": torch.cuda.get_device_name()})
            if bookkeeping == "fused" and not mask_eos:
                steps = Counter(names[long]) - Counter(names[short])
                print("kernels per step (fused, by name):")
                for name, c in steps.most_common():
                    print(f"  {c / (long - short):6.2f}  {name[:110]}")
    # both bookkeeping paths decode the same tokens from the same state and cache
    for mask_eos in (False, True):
        assert tokens["fused", mask_eos] == tokens["torch", mask_eos]
    for mask_eos in (False, True):
        assert results["fused", mask_eos] <= results["torch", mask_eos] - 15, results
