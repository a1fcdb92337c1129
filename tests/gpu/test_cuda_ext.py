"""CUDA extension (csrc/) on the GPU: it builds (JIT, or hybrid._C from setup.py), both ops match the
fp32 torch reference (hybrid/ops/reference.py) at real model shapes in bf16 / fp16 (fp32 too), over
odd sequence lengths, GQA ratios 1/2/4/8, random non-contiguous block tables, a pool past 2^31
elements, forced split-K and heads-per-CTA variants; CUDA-graph replay equals eager; and a
bandwidth table (GB/s, % of measured copy bandwidth, Triton alongside) for the lead.

Run on the device: `pytest -q -s -m gpu tests/gpu/test_cuda_ext.py` (JSON under $OUT if set).
"""
import json
import math
import os

import pytest
import torch

from hybrid.ops import cuda_backend as cb
from hybrid.ops import reference
from hybrid.ops.testing import assert_matches, random_block_tables

pytestmark = pytest.mark.gpu
DEV = "cuda"
DTYPES = [torch.bfloat16, torch.float16]
SHAPES = {  # name: (num_heads, num_kv_heads, head_size)
    "opt-1.3b": (32, 32, 64),
    "llama-7b": (32, 32, 128),
    "llama3-8b": (32, 8, 128),
    "gqa8-128": (64, 8, 128),
    "opt-2.7b": (32, 32, 80),
    "gqa2-96": (16, 8, 96),
    "gqa4-64": (16, 4, 64),
    "gqa2-256": (8, 4, 256),
    "mha-32": (8, 8, 32),
}
ODD_LENS = [1, 15, 16, 17, 1000, 0, 33, 257, 2, 511]


@pytest.fixture(scope="module", autouse=True)
def ext():
    ok = cb.load(verbose=True)
    assert ok, f"CUDA extension failed to load: {cb.load_error()}"
    print(f"\nhybrid CUDA ops from {cb.origin()}")
    return cb


def make_inputs(shape, seq_lens, dtype, block_size=16, slack_blocks=64, max_blocks=None,
                num_blocks=None, top_of_pool=False, seed=0):
    """Random q and pools; disjoint random blocks per row, garbage ids past each row's blocks."""
    num_heads, num_kv_heads, head_size = SHAPES[shape] if isinstance(shape, str) else shape
    g = torch.Generator().manual_seed(seed)
    need = sum((n + block_size - 1) // block_size for n in seq_lens)
    max_need = max([(n + block_size - 1) // block_size for n in seq_lens] + [1])
    max_blocks = max_blocks or max_need + 3
    num_blocks = num_blocks or need + slack_blocks
    bt = random_block_tables(seq_lens, block_size, num_blocks if not top_of_pool else need + 1,
                             max_blocks, g, DEV)
    if top_of_pool:  # ids near the end of a huge pool: element offsets beyond 2^31
        bt = (num_blocks - 1 - bt).int()
    kc = torch.randn(num_blocks, block_size, num_kv_heads, head_size, device=DEV, dtype=dtype)
    vc = torch.randn_like(kc)
    q = torch.randn(len(seq_lens), num_heads, head_size, device=DEV, dtype=dtype)
    sl = torch.tensor(seq_lens, device=DEV, dtype=torch.int32)
    return q, kc, vc, bt, sl


def fp32_reference(q, kc, vc, bt, sl, scale, budget_bytes=1 << 30):
    """reference.paged_decode_attention in fp32 on a compacted copy of the blocks each row chunk
    names (so a huge pool is never upcast whole), chunked over rows to bound the gather."""
    batch, max_blocks = bt.shape
    row_bytes = max_blocks * kc[0].numel() * 4 * 4
    chunk = max(1, min(batch, budget_bytes // max(row_bytes, 1)))
    outs = []
    for i in range(0, batch, chunk):
        rows = bt[i:i + chunk].long()  # [b, max_blocks]
        used, local = torch.unique(rows, return_inverse=True)
        outs.append(reference.paged_decode_attention(
            q[i:i + chunk].float(), kc[used].float(), vc[used].float(), local.int(),
            sl[i:i + chunk], scale))
    return torch.cat(outs)  # [B, H, D] fp32


def poison_next_output(shape, dtype):
    """Leaves a NaN-filled block of the output's size in the caching allocator, which the op's
    at::empty output then reuses: an element the kernel forgets to write stays NaN."""
    torch.empty(shape, device=DEV, dtype=dtype).fill_(float("nan"))


def run_decode(q, kc, vc, bt, sl, scale, **kw):
    poison_next_output(q.shape, q.dtype)
    return cb.paged_decode_attention(q, kc, vc, bt, sl, scale, **kw)


@pytest.mark.parametrize("num_splits", [0, 1, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_paged_decode_matches_reference(shape, dtype, num_splits):
    q, kc, vc, bt, sl = make_inputs(shape, ODD_LENS, dtype, seed=len(shape) + num_splits)
    scale = q.shape[-1] ** -0.5
    ref = fp32_reference(q, kc, vc, bt, sl, scale)
    out = run_decode(q, kc, vc, bt, sl, scale, num_splits=num_splits)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert_matches(out, ref, dtype, what=f"cuda {shape} splits={num_splits}")
    assert (out[ODD_LENS.index(0)] == 0).all(), "seq_len 0 row must be zeros"
    single = vc[bt[0, 0].long(), 0].float().repeat_interleave(q.shape[1] // kc.shape[2], dim=0)
    torch.testing.assert_close(out[0].float(), single, rtol=1e-3, atol=0,
                               msg="seq_len 1 row must equal its single value row")


@pytest.mark.parametrize("dtype", [torch.float32], ids=str)
@pytest.mark.parametrize("shape", ["opt-1.3b", "llama3-8b", "gqa2-256"])
def test_paged_decode_fp32(shape, dtype):
    q, kc, vc, bt, sl = make_inputs(shape, ODD_LENS, dtype)
    scale = q.shape[-1] ** -0.5
    for splits in (0, 3):
        out = run_decode(q, kc, vc, bt, sl, scale, num_splits=splits)
        assert_matches(out, fp32_reference(q, kc, vc, bt, sl, scale), dtype, what=f"fp32 {shape}")


@pytest.mark.parametrize("shape,batch,max_ctx", [("opt-1.3b", 256, 600), ("llama3-8b", 256, 600),
                                                 ("llama-7b", 64, 2048), ("llama3-8b", 3, 4096)])
def test_paged_decode_batches_and_strided_query(shape, batch, max_ctx):
    """Random lengths; the query is a slice of a fused qkv projection (row stride > H * D)."""
    num_heads, num_kv_heads, head_size = SHAPES[shape]
    g = torch.Generator().manual_seed(batch)
    lens = torch.randint(1, max_ctx + 1, (batch,), generator=g).tolist()
    lens[0] = max_ctx
    _, kc, vc, bt, sl = make_inputs(shape, lens, torch.bfloat16, max_blocks=(max_ctx + 15) // 16)
    qkv = torch.randn(batch, (num_heads + 2 * num_kv_heads) * head_size, device=DEV,
                      dtype=torch.bfloat16)
    q = qkv[:, : num_heads * head_size].view(batch, num_heads, head_size)  # [B, H, D] strided
    assert not q.is_contiguous()
    scale = head_size ** -0.5
    ref = fp32_reference(q, kc, vc, bt, sl, scale)
    assert_matches(run_decode(q, kc, vc, bt, sl, scale), ref, torch.bfloat16, what="strided q")
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # head_size stride != 1: copied inside
    assert_matches(run_decode(q_t, kc, vc, bt, sl, scale), ref, torch.bfloat16, what="transposed q")


@pytest.mark.parametrize("shape,variants", [("gqa8-128", [1, 2, 4, 8]), ("llama3-8b", [1, 2, 4]),
                                            ("gqa2-256", [1, 2])])
def test_heads_per_cta_variants(shape, variants):
    lens = [1, 17, 300, 1000, 4095, 64, 0, 5]
    q, kc, vc, bt, sl = make_inputs(shape, lens, torch.bfloat16)
    scale = q.shape[-1] ** -0.5
    ref = fp32_reference(q, kc, vc, bt, sl, scale)
    for gq in variants:
        for splits in (0, 1, 7):
            out = run_decode(q, kc, vc, bt, sl, scale, num_splits=splits, heads_per_cta=gq)
            assert_matches(out, ref, torch.bfloat16, what=f"heads_per_cta={gq} splits={splits}")


@pytest.mark.parametrize("block_size", [8, 32])
def test_other_block_sizes(block_size):
    q, kc, vc, bt, sl = make_inputs("llama3-8b", ODD_LENS, torch.float16, block_size=block_size)
    scale = q.shape[-1] ** -0.5
    ref = fp32_reference(q, kc, vc, bt, sl, scale)
    for splits in (0, 4):
        assert_matches(run_decode(q, kc, vc, bt, sl, scale, num_splits=splits), ref, torch.float16)


def test_pool_beyond_2_31_elements():
    """40000 blocks x 16 x 32 x 128 = 2.6e9 elements per pool (5.2 GB bf16): 64-bit offsets."""
    num_blocks = 40000
    assert num_blocks * 16 * 32 * 128 > 2**31
    lens = [1, 17, 1000, 2048]
    q, kc, vc, bt, sl = make_inputs("llama-7b", lens, torch.bfloat16, num_blocks=num_blocks,
                                    top_of_pool=True)
    assert int(bt[:, 0].min()) * 16 * 32 * 128 > 2**31
    scale = q.shape[-1] ** -0.5
    ref = fp32_reference(q, kc, vc, bt, sl, scale)
    for splits in (0, 1, 8):
        assert_matches(run_decode(q, kc, vc, bt, sl, scale, num_splits=splits), ref,
                       torch.bfloat16, what=f"big pool splits={splits}")
    k_new = torch.randn(4, 32, 128, device=DEV, dtype=torch.bfloat16)
    slots = (bt[:, 0].long() * 16 + torch.arange(4, device=DEV))  # [4] slots past 2^31 / (H*D)
    cb.write_kv_cache(k_new, -k_new, kc, vc, slots)
    assert torch.equal(kc.view(-1, 32, 128)[slots], k_new)
    assert torch.equal(vc.view(-1, 32, 128)[slots], -k_new)
    del kc, vc
    torch.cuda.empty_cache()


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float32], ids=str)
@pytest.mark.parametrize("shape", ["opt-1.3b", "llama3-8b", "opt-2.7b"])
def test_write_kv_cache_matches_reference(shape, dtype, strided):
    num_heads, num_kv_heads, head_size = SHAPES[shape]
    num_blocks, block_size, tokens = 512, 16, 300
    g = torch.Generator().manual_seed(tokens)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[::7] = -1  # padding rows of a CUDA-graph bucket
    slots = slots.to(DEV)
    if strided:  # key / value as views of a fused qkv projection
        qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_size, device=DEV, dtype=dtype)
        k = qkv[:, num_heads * head_size:(num_heads + num_kv_heads) * head_size]
        v = qkv[:, (num_heads + num_kv_heads) * head_size:]
        k, v = k.view(tokens, num_kv_heads, head_size), v.view(tokens, num_kv_heads, head_size)
    else:
        k = torch.randn(tokens, num_kv_heads, head_size, device=DEV, dtype=dtype)
        v = torch.randn_like(k)
    kc = torch.randn(num_blocks, block_size, num_kv_heads, head_size, device=DEV, dtype=dtype)
    vc = torch.randn_like(kc)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    reference.write_kv_cache(k, v, kc_ref, vc_ref, slots)
    cb.write_kv_cache(k, v, kc, vc, slots)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    cb.write_kv_cache(k[:0], v[:0], kc, vc, slots[:0])  # no tokens: a no-op, no launch error
    assert torch.equal(kc, kc_ref)


def test_cuda_graph_replay_equals_eager():
    """write_kv_cache + decode (auto and forced split) captured once, replayed on new inputs."""
    shape, batch, max_ctx, bs = "llama3-8b", 48, 1024, 16
    num_heads, num_kv_heads, head_size = SHAPES[shape]
    max_blocks = max_ctx // bs
    num_blocks = batch * max_blocks + 1
    kc = torch.randn(num_blocks, bs, num_kv_heads, head_size, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.empty(batch, num_heads, head_size, device=DEV, dtype=torch.bfloat16)
    k_new = torch.empty(batch, num_kv_heads, head_size, device=DEV, dtype=torch.bfloat16)
    v_new = torch.empty_like(k_new)
    bt = torch.empty(batch, max_blocks, device=DEV, dtype=torch.int32)
    sl = torch.empty(batch, device=DEV, dtype=torch.int32)
    slots = torch.empty(batch, device=DEV, dtype=torch.int64)
    scale = head_size ** -0.5

    def fill(seed):
        g = torch.Generator(device=DEV).manual_seed(seed)
        q.normal_(generator=g)
        k_new.normal_(generator=g)
        v_new.normal_(generator=g)
        perm = torch.randperm(num_blocks - 1, device=DEV, generator=g)[: batch * max_blocks]
        bt.copy_(perm.view(batch, max_blocks).int())
        sl.copy_(torch.randint(0, max_ctx, (batch,), device=DEV, generator=g).int())
        last = (sl.long() - 1).clamp(min=0)  # the new token is the row's last position
        slots.copy_(torch.where(sl > 0, bt.long().gather(1, (last // bs)[:, None])[:, 0] * bs
                                + last % bs, -1))

    def step():
        cb.write_kv_cache(k_new, v_new, kc, vc, slots)
        return (cb.paged_decode_attention(q, kc, vc, bt, sl, scale),
                cb.paged_decode_attention(q, kc, vc, bt, sl, scale, num_splits=6))

    fill(1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture stream, as torch recommends
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = step()
    for seed in (2, 3):
        fill(seed)
        kc_before, vc_before = kc.clone(), vc.clone()
        graph.replay()
        torch.cuda.synchronize()
        kc_graph, vc_graph = kc.clone(), vc.clone()
        kc.copy_(kc_before)
        vc.copy_(vc_before)
        eager = step()
        assert torch.equal(kc, kc_graph) and torch.equal(vc, vc_graph)
        for g_out, e_out in zip(graph_out, eager):
            assert torch.equal(g_out, e_out), "graph replay differs from eager"
        ref = fp32_reference(q, kc, vc, bt, sl, scale)
        assert_matches(eager[0], ref, torch.bfloat16, what="eager auto")
        assert_matches(eager[1], ref, torch.bfloat16, what="eager split 6")


def test_rejects_bad_inputs():
    q, kc, vc, bt, sl = make_inputs("opt-1.3b", [5, 9], torch.bfloat16)
    with pytest.raises(RuntimeError, match="seq_lens"):
        cb.paged_decode_attention(q, kc, vc, bt, sl.long(), 0.125)
    with pytest.raises(RuntimeError, match="dtype"):
        cb.paged_decode_attention(q.half(), kc, vc, bt, sl, 0.125)
    with pytest.raises(RuntimeError, match="head_size"):
        cb.paged_decode_attention(q[..., :48].contiguous(), kc[..., :48].contiguous(),
                                  vc[..., :48].contiguous(), bt, sl, 0.125)
    with pytest.raises(RuntimeError, match="heads_per_cta"):
        cb.paged_decode_attention(q, kc, vc, bt, sl, 0.125, heads_per_cta=2)  # MHA: group 1
    with pytest.raises(RuntimeError, match="slot_mapping"):
        cb.write_kv_cache(q[:, :32], q[:, :32], kc, vc, sl)


_RAW_BAD_CALL = """
import torch
from hybrid.ops import cuda_backend as cb
assert cb.load(), cb.load_error()
q = torch.randn(2, 32, 64, device="cuda", dtype=torch.bfloat16)
kc = torch.randn(8, 16, 32, 64, device="cuda", dtype=torch.bfloat16)
bt = torch.zeros(2, 4, device="cuda", dtype=torch.int32)
sl = torch.ones(2, device="cuda", dtype=torch.int64)  # wrong dtype: csrc/ops.cpp's TORCH_CHECK fires
try:
    torch.ops.hybrid.paged_decode_attention(q, kc, kc.clone(), bt, sl, 0.125, 0, 0)
except RuntimeError as e:
    print("RAISED", str(e).splitlines()[0][:120])
# messages with numbers and sizes in them: these crashed (SIGSEGV) before csrc/check.h
x = torch.randn(16, 2048, device="cuda", dtype=torch.bfloat16)
for w in (torch.randn(100, 2048, device="cuda", dtype=torch.bfloat16),
          torch.randn(128, 1024, device="cuda", dtype=torch.bfloat16)):
    try:
        torch.ops.hybrid.skinny_gemm(x, w, None, False, 0, False, None, None, None, 0)
    except RuntimeError as e:
        print("RAISED", str(e).splitlines()[0][:160])
"""


def test_raw_op_check_failure_raises_not_crashes():
    """The C++ TORCH_CHECK path itself (the Python wrappers check first, so this is the op alone),
    in a subprocess so a crash fails this test instead of the session; on a crash, gdb's backtrace
    (where gdb exists) goes into the failure message."""
    import shutil
    import subprocess
    import sys

    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    run = subprocess.run([sys.executable, "-c", _RAW_BAD_CALL], capture_output=True, text=True,
                         env=env, timeout=300)
    if run.returncode != 0 and shutil.which("gdb"):
        bt = subprocess.run(["gdb", "-batch", "-ex", "run", "-ex", "bt 25", "--args", sys.executable,
                             "-c", _RAW_BAD_CALL], capture_output=True, text=True, env=env, timeout=300)
        print(bt.stdout[-6000:])
    print(run.stdout[-2000:], run.stderr[-3000:])
    assert run.returncode == 0, (run.returncode, run.stderr[-3000:])
    raised = [line for line in run.stdout.splitlines() if line.startswith("RAISED")]
    assert len(raised) == 3, run.stdout
    assert "N % 64 == 0, got 100" in raised[1], raised
    assert "[16, 2048]" in raised[2] and "[128, 1024]" in raised[2], raised


def _copy_bandwidth_gb_s() -> float:
    from bench.hardware import measure_copy_bandwidth

    return measure_copy_bandwidth(nbytes=2 << 30, iters=20) / 1e9


def _graph_time_us(fn, sets, reps=20):
    """Per-call microseconds of fn over rotating input sets, from CUDA-graph replays (no launch
    gaps); the sets together exceed L2 so KV comes from HBM as in a real decode step."""
    for args in sets:
        fn(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in sets:
            fn(*args)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (reps * len(sets)))
    return sorted(times)[len(times) // 2]


def test_decode_bandwidth_table():
    """GB/s of live KV + q + out (+ block table) at batch 16-256, context 256-4096; Triton alongside
    when importable. Asserts a sanity floor (>= 30% of copy bandwidth on large shapes) only."""
    try:
        from hybrid.ops.paged_attention import paged_decode_attention as triton_decode
    except Exception:  # noqa: BLE001
        triton_decode = None
    copy_bw = _copy_bandwidth_gb_s()
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    rows, bs, dtype = [], 16, torch.bfloat16
    for shape in ("opt-1.3b", "llama-7b", "llama3-8b"):
        num_heads, num_kv_heads, head_size = SHAPES[shape]
        for batch in (16, 64, 256):
            for ctx in (256, 1024, 4096):
                kv_bytes = 2 * batch * ctx * num_kv_heads * head_size * 2
                if kv_bytes > (9 << 30):
                    continue
                n_sets = max(1, min(16, math.ceil(4 * l2 / kv_bytes)))
                per_row = ctx // bs
                num_blocks = n_sets * batch * per_row
                kc = torch.randn(num_blocks, bs, num_kv_heads, head_size, device=DEV, dtype=dtype)
                vc = torch.randn_like(kc)
                perm = torch.randperm(num_blocks, device=DEV).int().view(n_sets, batch, per_row)
                sl = torch.full((batch,), ctx, device=DEV, dtype=torch.int32)
                q = torch.randn(batch, num_heads, head_size, device=DEV, dtype=dtype)
                sets = [(q, kc, vc, perm[i], sl) for i in range(n_sets)]
                moved = kv_bytes + 2 * q.numel() * 2 + perm[0].numel() * 4 + batch * 4
                scale = head_size ** -0.5
                row = {"shape": shape, "batch": batch, "ctx": ctx,
                       "splits": cb.decode_num_splits(batch, num_heads, num_kv_heads, head_size,
                                                      ctx, dtype)}
                cuda_us = _graph_time_us(lambda *a: cb.paged_decode_attention(*a, scale), sets)
                row.update(cuda_us=round(cuda_us, 2), cuda_gb_s=round(moved / cuda_us / 1e3, 1))
                row["cuda_pct"] = round(100 * row["cuda_gb_s"] / copy_bw, 1)
                if triton_decode is not None:
                    try:
                        tri_us = _graph_time_us(lambda *a: triton_decode(*a, scale), sets)
                        row.update(triton_us=round(tri_us, 2),
                                   triton_gb_s=round(moved / tri_us / 1e3, 1))
                        row["triton_pct"] = round(100 * row["triton_gb_s"] / copy_bw, 1)
                        out_t, out_c = triton_decode(*sets[0], scale), cb.paged_decode_attention(
                            *sets[0], scale)
                        assert_matches(out_c, out_t.float(), dtype, scale=2.0, what="cuda vs triton")
                    except AssertionError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - a Triton failure must not hide ours
                        row["triton_error"] = repr(exc)[:200]
                rows.append(row)
                del kc, vc, sets
                torch.cuda.empty_cache()
    name = torch.cuda.get_device_name()
    print(f"\npaged decode attention, bf16, {name}, copy bandwidth {copy_bw:.0f} GB/s")
    print("| shape | batch | ctx | splits | cuda us | cuda GB/s | cuda % | triton us | triton GB/s "
          "| triton % |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['batch']} | {r['ctx']} | {r['splits']} | {r['cuda_us']} | "
              f"{r['cuda_gb_s']} | {r['cuda_pct']} | {r.get('triton_us', '-')} | "
              f"{r.get('triton_gb_s', '-')} | {r.get('triton_pct', '-')} |")
    if os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "cuda_ext_decode_bandwidth.json")
        with open(path, "w") as f:
            json.dump({"device": name, "copy_bw_gb_s": copy_bw, "rows": rows}, f, indent=1)
    large = [r for r in rows if r["batch"] * r["ctx"] >= 64 * 1024]
    assert large and min(r["cuda_pct"] for r in large) >= 30.0, "decode far below bandwidth"
