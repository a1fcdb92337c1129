"""hybrid.ops on the GPU at real model shapes, bf16 and fp16, every available backend (triton, and
cuda where csrc/ is built) against the fp32 torch reference; CUDA-graph capture of the decode-step
ops and the sampler. Run on the device: `pytest -m gpu tests/gpu/test_ops_gpu.py`.
"""
import pytest
import torch

import hybrid.ops as ops
from hybrid.ops import reference
from hybrid.ops.testing import assert_matches, random_block_tables
from hybrid.sampler import sample

pytestmark = pytest.mark.gpu
DEV = "cuda"
DTYPES = [torch.bfloat16, torch.float16]
SHAPES = {  # name: (num_heads, num_kv_heads, head_size, hidden, intermediate)
    "opt-1.3b": (32, 32, 64, 2048, 8192),
    "llama-7b": (32, 32, 128, 4096, 11008),
    "llama3-8b": (32, 8, 128, 4096, 14336),
}
DECODE_CASES = [  # (shape, batch, max context)
    ("opt-1.3b", 256, 512), ("opt-1.3b", 16, 4096),
    ("llama-7b", 64, 512), ("llama-7b", 4, 4096),
    ("llama3-8b", 64, 2048), ("llama3-8b", 1, 4096),
]


def _backends(op):
    out = ["triton"]
    if op in ops.CUDA_OPS and ops.cuda_ext_available():
        out.append("cuda")
    return out


def _decode_inputs(shape, batch, max_ctx, dtype, block_size=16, seed=0):
    num_heads, num_kv_heads, head_size = SHAPES[shape][:3]
    g = torch.Generator().manual_seed(seed)
    seq_lens = torch.randint(1, max_ctx + 1, (batch,), generator=g)
    seq_lens[0] = max_ctx
    if batch > 2:
        seq_lens[1] = 0  # CUDA-graph padding row
    need = sum((int(n) + block_size - 1) // block_size for n in seq_lens)
    num_blocks = need + need // 8 + 1
    max_blocks = (max_ctx + block_size - 1) // block_size
    bt = random_block_tables(seq_lens.tolist(), block_size, num_blocks, max_blocks, g, DEV)
    kc = torch.randn(num_blocks, block_size, num_kv_heads, head_size, device=DEV, dtype=dtype)
    vc = torch.randn_like(kc)
    q = torch.randn(batch, num_heads, head_size, device=DEV, dtype=dtype)
    return q, kc, vc, bt, seq_lens.to(DEV, torch.int32)


def _fp32_decode_reference(q, kc, vc, bt, sl, scale, chunk=16):
    outs = []
    for i in range(0, q.shape[0], chunk):  # bounded gather memory
        outs.append(reference.paged_decode_attention(q[i:i + chunk].float(), kc.float(), vc.float(),
                                                     bt[i:i + chunk], sl[i:i + chunk], scale))
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,batch,max_ctx", DECODE_CASES)
def test_paged_decode_gpu(shape, batch, max_ctx, dtype):
    q, kc, vc, bt, sl = _decode_inputs(shape, batch, max_ctx, dtype)
    scale = q.shape[-1] ** -0.5
    ref = _fp32_decode_reference(q, kc, vc, bt, sl, scale)
    for backend in _backends("paged_decode_attention"):
        fn = ops.get_impl("paged_decode_attention", backend)
        out = fn(q, kc, vc, bt, sl, scale)
        assert_matches(out, ref, dtype, what=f"{backend} {shape} B={batch} ctx={max_ctx}")
        if batch > 2:
            assert (out[1] == 0).all(), f"{backend}: seq_len 0 row must be zeros"
    from hybrid.ops.paged_attention import paged_decode_attention

    for partition in (0, 256):  # both Triton paths whatever the heuristic picks
        out = paged_decode_attention(q, kc, vc, bt, sl, scale, partition_size=partition)
        assert_matches(out, ref, dtype, what=f"triton partition={partition}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_write_kv_cache_gpu(shape, dtype):
    num_heads, num_kv_heads, head_size = SHAPES[shape][:3]
    T, num_blocks, block_size = 256, 2048, 16
    for backend in _backends("write_kv_cache"):
        kc = torch.randn(num_blocks, block_size, num_kv_heads, head_size, device=DEV, dtype=dtype)
        vc = torch.randn_like(kc)
        qkv = torch.randn(T, (num_heads + 2 * num_kv_heads) * head_size, device=DEV, dtype=dtype)
        k = qkv[:, num_heads * head_size:(num_heads + num_kv_heads) * head_size].view(
            T, num_kv_heads, head_size)
        v = qkv[:, (num_heads + num_kv_heads) * head_size:].view(T, num_kv_heads, head_size)
        slots = torch.randperm(num_blocks * block_size, device=DEV)[:T]
        slots[torch.arange(0, T, 7, device=DEV)] = -1
        rk, rv = kc.clone(), vc.clone()
        reference.write_kv_cache(k, v, rk, rv, slots)
        ops.get_impl("write_kv_cache", backend)(k, v, kc, vc, slots)
        assert torch.equal(kc, rk) and torch.equal(vc, rv), backend


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ["opt-1.3b", "llama3-8b"])
def test_prefill_attention_gpu(shape, dtype):
    num_heads, num_kv_heads, head_size = SHAPES[shape][:3]
    lens = [512, 300, 17, 1]
    T = sum(lens)
    q = torch.randn(T, num_heads, head_size, device=DEV, dtype=dtype)
    k = torch.randn(T, num_kv_heads, head_size, device=DEV, dtype=dtype)
    v = torch.randn(T, num_kv_heads, head_size, device=DEV, dtype=dtype)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=DEV, dtype=torch.int32)
    scale = head_size ** -0.5
    ref = reference.prefill_attention(q.float(), k.float(), v.float(), cu, max(lens), scale)
    out = ops.get_impl("prefill_attention", "triton")(q, k, v, cu, max(lens), scale)
    assert_matches(out, ref, dtype, what=f"prefill {shape}")
    # the model-level alternatives: batched SDPA per run of equal lengths, torch's varlen flash
    from hybrid.models import base

    assert_matches(base._sdpa_varlen(q, k, v, lens, scale), ref, dtype, what=f"sdpa {shape}")
    if base.flash_varlen_available(q, k):
        assert_matches(base._flash_varlen(q, k, v, cu, max(lens), scale), ref, dtype, what=f"flash {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("num_tokens", [1, 7, 256])
def test_norms_rotary_activations_gpu(shape, num_tokens, dtype):
    num_heads, num_kv_heads, head_size, hidden, inter = SHAPES[shape]
    torch.manual_seed(num_tokens)
    x = torch.randn(num_tokens, hidden, device=DEV, dtype=dtype)
    res = torch.randn_like(x)
    w = torch.randn(hidden, device=DEV, dtype=dtype)
    b = torch.randn(hidden, device=DEV, dtype=dtype)
    for name, args in [("add_layernorm", (x, res, w, b, 1e-5)), ("add_rmsnorm", (x, res, w, 1e-6))]:
        got = ops.get_impl(name, "triton")(*args)
        want = getattr(reference, name)(*args)  # fp32 math, same roundings
        assert_matches(got[0], want[0], dtype, what=f"{name} normed")
        assert torch.equal(got[1], want[1]), f"{name} residual_out"

    positions = torch.randint(0, 4096, (num_tokens,), device=DEV)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_size, 2, device=DEV).float() / head_size)
    freqs = torch.outer(torch.arange(4096, device=DEV).float(), inv_freq)
    cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [4096, head_size] fp32
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_size, device=DEV,
                      dtype=dtype)
    q = qkv[:, :num_heads * head_size].view(num_tokens, num_heads, head_size)
    k = qkv[:, num_heads * head_size:(num_heads + num_kv_heads) * head_size].view(
        num_tokens, num_kv_heads, head_size)
    rq, rk = q.clone(), k.clone()
    reference.rotary_embedding(positions, rq, rk, cache, True)
    ops.get_impl("rotary_embedding", "triton")(positions, q, k, cache, True)
    assert_matches(q, rq, dtype, what="rotary q")
    assert_matches(k, rk, dtype, what="rotary k")

    gate_up = torch.randn(num_tokens, 2 * inter, device=DEV, dtype=dtype)
    assert_matches(ops.get_impl("silu_and_mul", "triton")(gate_up),
                   reference.silu_and_mul(gate_up.float()), dtype, what="silu_and_mul")
    h = torch.randn(num_tokens, inter, device=DEV, dtype=dtype)
    assert torch.equal(ops.get_impl("relu", "triton")(h), torch.relu(h))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_decode_step_ops_capture_in_cuda_graph(backend):
    """write_kv_cache + paged attention + sample captured once, replayed with new metadata written
    into the static buffers in place (the runner's pattern), against eager reference results."""
    if backend == "cuda" and not ops.cuda_ext_available():
        pytest.skip("CUDA extension not built")
    dtype, batch, block_size, max_blocks, vocab = torch.bfloat16, 48, 16, 64, 5000
    num_heads, num_kv_heads, head_size = SHAPES["llama3-8b"][:3]
    num_blocks = batch * max_blocks
    kc = torch.randn(num_blocks, block_size, num_kv_heads, head_size, device=DEV, dtype=dtype)
    vc = torch.randn_like(kc)
    s_q = torch.empty(batch, num_heads, head_size, device=DEV, dtype=dtype)
    s_k = torch.empty(batch, num_kv_heads, head_size, device=DEV, dtype=dtype)
    s_v = torch.empty_like(s_k)
    s_slots = torch.empty(batch, device=DEV, dtype=torch.int64)
    s_bt = torch.empty(batch, max_blocks, device=DEV, dtype=torch.int32)
    s_lens = torch.empty(batch, device=DEV, dtype=torch.int32)
    s_proj = torch.randn(num_heads * head_size, vocab, device=DEV, dtype=dtype)
    s_temp = torch.zeros(batch, device=DEV)
    s_topk = torch.zeros(batch, device=DEV, dtype=torch.int32)
    s_topp = torch.ones(batch, device=DEV)
    write = ops.get_impl("write_kv_cache", backend)
    attend = ops.get_impl("paged_decode_attention", backend)

    def step():
        write(s_k, s_v, kc, vc, s_slots)
        out = attend(s_q, kc, vc, s_bt, s_lens, head_size ** -0.5)  # [B, H, D]
        logits = out.view(batch, -1) @ s_proj  # [B, V]
        return out, sample(logits, s_temp, s_topk, s_topp)

    def fill(seed):
        g = torch.Generator().manual_seed(seed)
        lens = torch.randint(1, max_blocks * block_size, (batch,), generator=g)
        lens[-3:] = 0  # padding rows of the bucket
        bt = random_block_tables(lens.tolist(), block_size, num_blocks, max_blocks, g, DEV)
        slots = torch.full((batch,), -1, dtype=torch.int64)
        live = lens > 0
        last = (lens - 1).clamp(min=0)
        blk = bt.cpu()[torch.arange(batch), (last // block_size)].long()
        slots[live] = (blk * block_size + last % block_size)[live]
        for dst, src in [(s_q, torch.randn_like(s_q)), (s_k, torch.randn_like(s_k)),
                         (s_v, torch.randn_like(s_v)), (s_slots, slots), (s_bt, bt),
                         (s_lens, lens.int())]:
            dst.copy_(src)

    fill(0)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up: Triton compiles outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_tokens = step()
    for seed in (1, 2):
        fill(seed)
        kc_ref, vc_ref = kc.clone(), vc.clone()
        reference.write_kv_cache(s_k, s_v, kc_ref, vc_ref, s_slots)
        want = _fp32_decode_reference(s_q, kc_ref, vc_ref, s_bt, s_lens, head_size ** -0.5)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
        assert_matches(g_out, want, dtype, what=f"graph replay {seed}")
        logits = g_out.view(batch, -1) @ s_proj
        assert torch.equal(g_tokens, logits.argmax(-1)), "greedy tokens from the replayed graph"


def test_sampler_gpu_distribution_and_graph():
    torch.manual_seed(0)
    batch, vocab = 8192, 50272
    row = torch.randn(vocab, device=DEV) * 4
    logits = row.expand(batch, -1).contiguous()  # fp32: no ties at the nucleus boundary
    temp = torch.ones(batch, device=DEV)
    topk = torch.zeros(batch, device=DEV, dtype=torch.int32)
    topp = torch.full((batch,), 0.9, device=DEV)
    tokens = sample(logits, temp, topk, topp)
    sorted_p, order = torch.softmax(logits[0].float(), -1).sort(descending=True)
    n_keep = int(((sorted_p.cumsum(0) - sorted_p) < 0.9).sum())
    assert torch.isin(tokens, order[:n_keep]).all(), "top-p nucleus respected"
    want = sorted_p[:3] / sorted_p[:n_keep].sum()
    got = torch.stack([(tokens == order[i]).float().mean() for i in range(3)])
    assert (got - want).abs().max() < 0.03, (got, want)
    graph = torch.cuda.CUDAGraph()
    sample(logits[:64], temp[:64], topk[:64], topp[:64])  # warm-up
    with torch.cuda.graph(graph):
        g_tokens = sample(logits[:64], temp[:64], topk[:64], topp[:64])
    graph.replay()
    first = g_tokens.clone()
    graph.replay()
    assert not torch.equal(first, g_tokens), "each replay draws fresh random numbers"


def test_pick_decode_backends_sets_auto_choice():
    if not ops.cuda_ext_available():
        pytest.skip("CUDA extension not built")
    try:
        ops.set_backend("auto")
        winners = ops.pick_decode_backends(32, 32, 64, 16, 64, 512, torch.bfloat16)
        for op, backend in winners.items():
            assert ops.resolve_backend(op, torch.device(DEV)) == backend, (op, winners)
    finally:
        ops.set_auto_cuda_ops("all")


def test_pick_decode_backends_per_batch_bucket(monkeypatch):
    """Each decode batch keeps its own winner (they differ across batches at OPT-1.3B shapes on an
    H200), and the dispatch at a batch runs the backend picked for its bucket."""
    if not ops.cuda_ext_available():
        pytest.skip("CUDA extension not built")
    from hybrid.ops.autoselect import pick_decode_backends_per_batch

    try:
        ops.set_backend("auto")
        per = pick_decode_backends_per_batch(32, 32, 64, 16, [16, 24, 32, 64], 416, torch.bfloat16)
        print("\nper-batch picks:", per)
        for op, picks in per.items():
            for b, backend in picks.items():
                assert ops.auto_cuda_for(op, b) == (backend == "cuda"), (op, b, per)
        real = torch.ops.hybrid.paged_decode_attention
        calls = []
        monkeypatch.setattr(torch.ops.hybrid, "paged_decode_attention", lambda *a: calls.append(1) or real(*a))
        for b, backend in per["paged_decode_attention"].items():
            q = torch.randn(b, 32, 64, device=DEV, dtype=torch.bfloat16)
            kc = torch.randn(b * 2 + 1, 16, 32, 64, device=DEV, dtype=torch.bfloat16)
            bt = torch.arange(b * 2, device=DEV, dtype=torch.int32).view(b, 2)
            sl = torch.full((b,), 20, device=DEV, dtype=torch.int32)
            ops._impls.clear()  # re-resolved with the patched op, as at a graph capture
            calls.clear()
            out = ops.paged_decode_attention(q, kc, kc, bt, sl, 0.125)
            assert bool(calls) == (backend == "cuda"), (b, backend)
            ref = ops.get_impl("paged_decode_attention", "torch")(q, kc, kc, bt, sl, 0.125)
            torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    finally:
        ops.set_auto_cuda_ops("all")


@pytest.mark.parametrize("head_size,dtype", [(16, torch.float32), (48, torch.bfloat16), (64, torch.bfloat16)])
def test_auto_routes_unsupported_shapes_to_triton(head_size, dtype):
    """"auto" with the CUDA op enabled: shapes csrc/ has no kernel for run on Triton (no crash, no
    error), supported ones on the extension; both match the reference."""
    from hybrid.ops import cuda_backend as cb

    if not cb.available():
        pytest.skip(f"CUDA extension unavailable: {cb.load_error()}")
    before = ops.get_backend()
    ops.set_backend("auto")
    ops.set_auto_cuda_ops("all")
    try:
        g = torch.Generator().manual_seed(head_size)
        lens = [5, 40, 17]
        bt = random_block_tables(lens, 16, 16, 4, g, DEV)
        kc = torch.randn(16, 16, 2, head_size, device=DEV, dtype=dtype)
        vc = torch.randn_like(kc)
        q = torch.randn(3, 4, head_size, device=DEV, dtype=dtype)
        sl = torch.tensor(lens, device=DEV, dtype=torch.int32)
        supported = cb.decode_unsupported(q, kc, vc, bt, sl) is None
        assert supported == (head_size == 64)
        out = ops.paged_decode_attention(q, kc, vc, bt, sl, head_size ** -0.5)
        ref = reference.paged_decode_attention(q.float(), kc.float(), vc.float(), bt, sl, head_size ** -0.5)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
        if not supported:
            with pytest.raises(RuntimeError, match="head_size"):
                cb.paged_decode_attention(q, kc, vc, bt, sl, 0.125)
    finally:
        ops.set_auto_cuda_ops("all")
        ops.set_backend(before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("rows,vocab", [(1, 50272), (16, 50272), (64, 50272), (256, 32000), (7, 1000)])
def test_greedy_partials_gpu_is_torch_argmax(rows, vocab, dtype):
    g = torch.Generator(device=DEV).manual_seed(rows)
    x = torch.randn(rows, vocab, device=DEV, generator=g).to(dtype)
    x[0, 3] = x[0, vocab - 5] = x[0].max() + 2  # tie: the first index wins
    keys = ops.greedy_partials(x)
    assert keys.shape[0] == rows and keys.dtype == torch.int64
    assert torch.equal(reference.greedy_tokens(keys), torch.argmax(x, -1))
    assert torch.equal(keys, reference.greedy_partials(x, keys.shape[1]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens", [1, 64, 16384])
def test_embed_norms_gpu_equal_reference(num_tokens, dtype):
    g = torch.Generator(device=DEV).manual_seed(num_tokens)
    table = torch.randn(50272, 2048, device=DEV, generator=g).to(dtype)
    pos_table = torch.randn(2050, 2048, device=DEV, generator=g).to(dtype)
    ids = torch.randint(0, 50272, (num_tokens,), device=DEV, generator=g)
    pos = torch.randint(0, 2048, (num_tokens,), device=DEV, generator=g)
    w, b = torch.randn(2048, device=DEV, generator=g).to(dtype), torch.randn(2048, device=DEV, generator=g).to(dtype)
    n, r = ops.embed_layernorm(ids, table, pos, pos_table, 2, w, b, 1e-5)
    rn, rr = ops.add_layernorm(table[ids], pos_table[pos + 2], w, b, 1e-5)  # the model's old path
    assert torch.equal(r, rr) and torch.equal(n, rn)
    n, r = ops.embed_rmsnorm(ids, table, w, 1e-6)
    rn, rr = ops.add_rmsnorm(table[ids], None, w, 1e-6)
    assert torch.equal(r, rr) and torch.equal(n, rn)
