"""Fused decode attention with KV append (Triton, through the interpreter on CPU) against its torch
reference (= write_kv_cache, then paged_decode_attention).

fp32, odd shapes: MHA and GQA 4 / 8, head_size 80 (masked to 128 lanes), random disjoint
non-contiguous block tables, rows with seq_len 0 and slot -1 (inactive), seq_len 1 (the current token
only), block and split boundaries, split-K partitions, key/value as strided views of a fused qkv
row. The target slots are poisoned with NaN before the call, so a kernel that reads the current
token back from the cache instead of from key/value fails; the whole cache must equal the
reference's afterwards (written slots, and nothing else touched).
"""
import numpy as np
import pytest
import torch

from hybrid import ops
from hybrid.ops import reference
from hybrid.ops.paged_attention import paged_decode_attention_append
from hybrid.ops.testing import assert_matches, poisoned_allocations, random_block_tables, random_kv_cache


def _slots_for(block_tables, seq_lens, block_size, active):
    """decode_prepare's slots: position seq_len - 1 of each active row's table, -1 otherwise."""
    slots = []
    for row, (n, on) in enumerate(zip(seq_lens, active)):
        if not on or n == 0:
            slots.append(-1)
            continue
        pos = n - 1
        slots.append(int(block_tables[row, pos // block_size]) * block_size + pos % block_size)
    return torch.tensor(slots, dtype=torch.int64)


def _case(num_heads, num_kv_heads, head_size, block_size, seq_lens, seed, num_blocks=512, max_blocks=12,
          active=None):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    batch = len(seq_lens)
    kc, vc = random_kv_cache(num_blocks, block_size, num_kv_heads, head_size, torch.float32)
    bt = random_block_tables(seq_lens, block_size, num_blocks, max_blocks, g)
    # q, k, v as views of one fused projection row, as the models produce them (strided batch dim)
    qkv = torch.randn(batch, (num_heads + 2 * num_kv_heads) * head_size)
    q = qkv[:, :num_heads * head_size].view(batch, num_heads, head_size)
    k = qkv[:, num_heads * head_size:(num_heads + num_kv_heads) * head_size].view(batch, num_kv_heads, head_size)
    v = qkv[:, (num_heads + num_kv_heads) * head_size:].view(batch, num_kv_heads, head_size)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    slots = _slots_for(bt, seq_lens, block_size, active or [True] * batch)
    return q, k, v, kc, vc, slots, bt, sl


def _poison_slots(kc, vc, slots):
    flat_k = kc.view(-1, *kc.shape[2:])
    flat_v = vc.view(-1, *vc.shape[2:])
    live = slots[slots >= 0]
    flat_k[live] = float("nan")
    flat_v[live] = float("nan")


def _check(q, k, v, kc, vc, slots, bt, sl, scale, **kw):
    _poison_slots(kc, vc, slots)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref = reference.paged_decode_attention_append(q, k, v, kc_ref, vc_ref, slots, bt, sl, scale)
    with poisoned_allocations():
        out = paged_decode_attention_append(q, k, v, kc, vc, slots, bt, sl, scale, **kw)
    assert_matches(out, ref, what="paged_decode_attention_append")
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref), "cache after != write_kv_cache's"
    for row in (sl == 0).nonzero().flatten().tolist():
        assert torch.equal(out[row], torch.zeros_like(out[row])), "seq_len 0 must give zeros"
    return out


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_size,block_size,partition",
    [
        (4, 4, 64, 16, 0),  # MHA, one pass
        (4, 4, 64, 16, 32),  # MHA, split-K: the split owning position seq_len - 1 writes
        (8, 2, 64, 16, 64),  # GQA 4, split-K
        (8, 1, 64, 8, 0),  # GQA 8 (MQA), block_size 8
        (16, 2, 32, 8, 32),  # GQA 8, split-K, small head
        (3, 3, 80, 16, 32),  # odd head count, non-power-of-two head_size, split-K
        (2, 2, 64, 16, -1),  # MHA through the broadcast-and-sum variant (use_dot=False)
    ],
)
def test_append_matches_write_then_attend(num_heads, num_kv_heads, head_size, block_size, partition):
    # 0: inactive; 1: current token only; block_size + 1: the token opens a new block;
    # 2 * block_size: it closes one; 33 / 65: the last token is the first of a 32 / 64 split
    seq_lens = [37, 0, 1, block_size + 1, 2 * block_size, 33, 65, 91]
    case = _case(num_heads, num_kv_heads, head_size, block_size, seq_lens, seed=num_heads * 7 + partition + 3)
    _check(*case, head_size ** -0.5, partition_size=max(partition, 0), block_n=32, use_dot=partition >= 0)


def test_append_inactive_rows_write_nothing_and_skip_slot_minus_one():
    """A row with slot -1 writes nothing even while it attends (seq_len > 0, e.g. a graph bucket's
    padding that still carries a length), and rows with seq_len 0 give zeros."""
    seq_lens = [5, 0, 9, 1]
    q, k, v, kc, vc, slots, bt, sl = _case(4, 2, 32, 4, seq_lens, seed=11, active=[True, False, False, True])
    assert slots.tolist()[1:3] == [-1, -1]
    # row 2 attends over 9 tokens but does not write: the reference reads its position 8 from the
    # cache, which then must hold k itself for the two to agree; make it so, and check untouched
    pos = 8
    s2 = int(bt[2, pos // 4]) * 4 + pos % 4
    kc.view(-1, 2, 32)[s2] = k[2]
    vc.view(-1, 2, 32)[s2] = v[2]
    before_k = kc.clone()
    out = _check(q, k, v, kc, vc, slots, bt, sl, 0.2, partition_size=0, block_n=32)
    written = torch.zeros(kc.numel() // (2 * 32), dtype=torch.bool)
    written[slots[slots >= 0]] = True
    flat_before, flat_after = before_k.view(-1, 2, 32), kc.view(-1, 2, 32)
    assert torch.equal(flat_before[~written], flat_after[~written]), "a slot other than the rows' was written"
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("partition", [0, 32])
def test_append_every_row_in_first_token(partition):
    """All rows at seq_len 1: attention is the current token's value alone (softmax of one)."""
    seq_lens = [1, 1, 1]
    q, k, v, kc, vc, slots, bt, sl = _case(8, 2, 64, 16, seq_lens, seed=5)
    out = _check(q, k, v, kc, vc, slots, bt, sl, 0.125, partition_size=partition, block_n=32)
    torch.testing.assert_close(out, v.repeat_interleave(4, dim=1), rtol=1e-6, atol=1e-6)


def test_append_dispatch_backends_agree():
    """hybrid.ops' dispatch entry: the torch and triton backends give the same output and cache."""
    if not ops.triton_usable(torch.device("cpu")):
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")
    case = _case(4, 2, 64, 8, [13, 0, 1, 40], seed=9)
    outs, caches = [], []
    before = ops.get_backend()
    try:
        for backend in ("torch", "triton"):
            ops.set_backend(backend)
            q, k, v, kc, vc, slots, bt, sl = (t.clone() for t in case)
            outs.append(ops.paged_decode_attention_append(q, k, v, kc, vc, slots, bt, sl, 0.125))
            caches.append((kc, vc))
    finally:
        ops.set_backend(before)
    assert_matches(outs[1], outs[0], what="dispatch")
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])


# ---- csrc/paged_attention.cuh APPEND path, transliterated lane by lane ---------------------------
# No GPU here: a numpy model of paged_decode_split_kernel<T, D, GQ, 4, true> + the merge kernel with
# the kernel's own index math (lanes per token, pieces per lane, unrolled tiles, tail clamping,
# xor-shuffle sums and maxes, the per-split token ranges, owner split, writer CTA, the fold of the
# step's token at the warp merge). Reads go to the pre-launch cache and writes to a copy, and every
# (slot, kv head) row a CTA reads or writes is recorded, so the model also checks that no CTA reads
# a row any CTA writes (no read-after-write hazard in one launch, whatever the CTA order) and that
# each (row, kv head) is written exactly once.

def _tpt(chunks):
    return 16 if chunks > 8 else 8 if chunks > 4 else 4 if chunks > 2 else 2 if chunks > 1 else 1


def _fits(vec, d, gq):
    chunks = d // vec
    return gq * -(-chunks // _tpt(chunks)) * vec <= 64


def _cuda_append_model(q, k_new, v_new, kc, vc, slots, bt, sl, scale, vec, gq, num_splits, mutate=None):
    f32 = np.float32
    batch, num_heads, d = q.shape
    _, block_size, num_kv_heads, _ = kc.shape
    group = num_heads // num_kv_heads
    nw, lanes = 4, np.arange(32)
    chunks = d // vec
    tpt = _tpt(chunks)
    cpl = -(-chunks // tpt)
    tpi = 32 // tpt
    qregs = gq * cpl * vec
    unroll = min(8 if qregs <= 16 else 4 if qregs <= 32 else 2, 1 if cpl >= 8 else 8 // cpl)
    tile = tpi * unroll
    g, r = lanes // tpt, lanes % tpt
    chunk = np.array([[c * tpt + rr for c in range(cpl)] for rr in r])  # [32, CPL]
    chunk_ok = chunk < chunks
    jj = np.arange(vec)
    log2_bs = block_size.bit_length() - 1
    scale_log2 = f32(scale * 1.4426950408889634)
    kc_out, vc_out = kc.copy(), vc.copy()
    reads, writes = set(), []
    out = np.zeros((batch, num_heads, d), f32)
    part_acc = np.zeros((batch, num_heads, num_splits, d), f32)
    part_ml = np.zeros((batch, num_heads, num_splits, 2), f32)

    def pieces(row):  # row [D] -> this lane's pieces [32, CPL, VEC], 0 where the chunk is idle
        idx = np.where(chunk_ok, chunk, 0)[:, :, None] * vec + jj
        return np.where(chunk_ok[:, :, None], row[idx], f32(0))

    def shfl_xor(x, off):
        return x[lanes ^ off]

    for x in range(num_heads // gq):
        head0 = x * gq
        kv_head = head0 // group
        for b in range(batch):
            for split in range(num_splits):
                seq_len = int(sl[b])
                per_split = -(-seq_len // num_splits)
                per_split = -(-per_split // 16) * 16
                start = split * per_split
                kv_len = seq_len if mutate == "read_current" else seq_len - 1
                end = min(kv_len, start + per_split)
                owner = (max(seq_len - 1, 0) // per_split == split) if per_split > 0 else split == 0
                has_cur = owner and seq_len > 0 and mutate != "no_fold"
                writer = owner and (head0 % group == 0 or mutate == "every_chunk_writes")
                if writer and 0 <= int(slots[b]) < kc.shape[0] * block_size:
                    s_ = int(slots[b])
                    kc_out[s_ // block_size, s_ % block_size, kv_head] = k_new[b, kv_head]
                    vc_out[s_ // block_size, s_ % block_size, kv_head] = v_new[b, kv_head]
                    writes.append((s_, kv_head))
                qp = np.stack([pieces(q[b, head0 + h]) * scale_log2 for h in range(gq)], 1)  # [32,GQ,CPL,VEC]
                sm_acc = np.zeros((nw, gq, d), f32)
                sm_m = np.full((nw, gq), -np.inf, f32)
                sm_l = np.zeros((nw, gq), f32)
                for w in range(nw):
                    m = np.full((32, gq), -np.inf, f32)
                    l = np.zeros((32, gq), f32)
                    acc = np.zeros((32, gq, cpl, vec), f32)
                    t0 = start + w * tile
                    while t0 < end:
                        s = np.zeros((unroll, 32, gq), f32)
                        vf = np.zeros((unroll, 32, cpl, vec), f32)
                        valid = np.zeros((unroll, 32), bool)
                        for u in range(unroll):
                            t = t0 + u * tpi + g  # [32]
                            valid[u] = t < end
                            tc = np.minimum(t, end - 1)
                            blk = bt[b, tc >> log2_bs].astype(np.int64)
                            slot = (blk << log2_bs) + (tc & (block_size - 1))
                            for ln in range(32):
                                reads.add((int(slot[ln]), kv_head))
                            krow = kc[slot // block_size, slot % block_size, kv_head]  # [32, D]
                            vrow = vc[slot // block_size, slot % block_size, kv_head]
                            idx = np.where(chunk_ok, chunk, 0)[:, :, None] * vec + jj  # [32, CPL, VEC]
                            kf = np.where(chunk_ok[:, :, None], np.take_along_axis(krow, idx.reshape(32, -1), 1)
                                          .reshape(32, cpl, vec), f32(0))
                            vf[u] = np.where(chunk_ok[:, :, None], np.take_along_axis(vrow, idx.reshape(32, -1), 1)
                                             .reshape(32, cpl, vec), f32(0))
                            s[u] = np.einsum("lhcj,lcj->lh", qp, kf).astype(f32)
                        off = tpt // 2
                        while off > 0:
                            s = s + s[:, lanes ^ off]
                            off //= 2
                        s = np.where(valid[:, :, None], s, f32(-np.inf))
                        mt = s.max(0)  # [32, GQ]
                        off = tpt
                        while off < 32:
                            mt = np.maximum(mt, shfl_xor(mt, off))
                            off *= 2
                        m_new = np.maximum(m, mt)
                        moved = m_new > m
                        alpha = np.exp2(np.where(moved, m - m_new, f32(0))).astype(f32)
                        l = np.where(moved, l * alpha, l)
                        acc = np.where(moved[:, :, None, None], acc * alpha[:, :, None, None], acc)
                        m = m_new
                        p = np.exp2(s - m[None]).astype(f32)  # [U, 32, GQ]
                        l = l + p.sum(0)
                        acc = acc + np.einsum("ulh,ulcj->lhcj", p, vf).astype(f32)
                        t0 += nw * tile
                    off = tpt
                    while off < 32:
                        l = l + shfl_xor(l, off)
                        acc = acc + shfl_xor(acc, off)
                        off *= 2
                    for ln in range(tpt):  # g == 0 lanes hold the warp's sums of their pieces
                        for c in range(cpl):
                            if chunk_ok[ln, c]:
                                sm_acc[w, :, chunk[ln, c] * vec:(chunk[ln, c] + 1) * vec] = acc[ln, :, c]
                    sm_m[w], sm_l[w] = m[0], l[0]
                sm_cur = np.zeros(gq, f32)
                if has_cur:  # warp 0: q . key_new over the lanes of a token slot
                    sc = np.einsum("lhcj,lcj->lh", qp, pieces(k_new[b, kv_head])).astype(f32)
                    off = tpt // 2
                    while off > 0:
                        sc = sc + shfl_xor(sc, off)
                        off //= 2
                    sm_cur = sc[0]
                for h in range(gq):
                    mx = sm_m[:, h].max()
                    if has_cur:
                        mx = max(mx, sm_cur[h])
                    a = np.zeros(d, f32)
                    lsum = f32(0)
                    if mx > -np.inf:
                        for w in range(nw):
                            if sm_m[w, h] > -np.inf:
                                e = f32(np.exp2(sm_m[w, h] - mx))
                                a = a + e * sm_acc[w, h]
                                lsum = lsum + e * sm_l[w, h]
                    if has_cur:
                        e = f32(np.exp2(sm_cur[h] - mx))
                        a = a + e * v_new[b, kv_head]
                        lsum = lsum + e
                    if num_splits == 1:
                        out[b, head0 + h] = a / lsum if lsum > 0 else 0
                    else:
                        part_acc[b, head0 + h, split] = a
                        part_ml[b, head0 + h, split] = (mx, lsum)
    if num_splits > 1:  # paged_decode_merge_kernel
        for b in range(batch):
            for h in range(num_heads):
                ms, ls = part_ml[b, h, :, 0], part_ml[b, h, :, 1]
                mx = ms.max()
                a, lsum = np.zeros(d, f32), f32(0)
                if mx > -np.inf:
                    for s_ in range(num_splits):
                        if ms[s_] > -np.inf:
                            e = f32(np.exp2(ms[s_] - mx))
                            a = a + e * part_acc[b, h, s_]
                            lsum = lsum + e * ls[s_]
                out[b, h] = a / lsum if lsum > 0 else 0
    return out, kc_out, vc_out, reads, writes


def _model_case(num_heads, num_kv_heads, d, block_size, seq_lens, seed):
    q, k, v, kc, vc, slots, bt, sl = _case(num_heads, num_kv_heads, d, block_size, seq_lens, seed,
                                           num_blocks=160, max_blocks=320 // block_size + 1)
    # values on the bf16 grid, as the kernel would see them (the model computes in fp32)
    return [t.to(torch.bfloat16).float() if t.is_floating_point() else t for t in (q, k, v, kc, vc, slots, bt, sl)]


def _run_model(case, scale, vec, gq, splits, mutate=None):
    q, k, v, kc, vc, slots, bt, sl = case
    out, kc2, vc2, reads, writes = _cuda_append_model(
        q.contiguous().numpy(), k.contiguous().numpy(), v.contiguous().numpy(), kc.numpy(), vc.numpy(),
        slots.numpy(), bt.numpy(), sl.numpy(), scale, vec, gq, splits, mutate)
    kr, vr = kc.clone(), vc.clone()
    ref = reference.paged_decode_attention_append(q, k, v, kr, vr, slots, bt, sl, scale)
    return torch.from_numpy(out), ref, (torch.from_numpy(kc2), kr, torch.from_numpy(vc2), vr), reads, writes


MODEL_SEQ_LENS = [0, 1, 2, 15, 16, 17, 150, 300]


@pytest.mark.parametrize("d,vec,group,gq,block_size,splits", [
    (64, 8, 1, 1, 16, 1),  # OPT-1.3B shape class, 16-bit chunking
    (64, 8, 1, 1, 16, 3),
    (128, 8, 1, 1, 32, 2),  # LLaMA-7B class
    (128, 8, 4, 4, 16, 1),  # GQA 4, one CTA per kv head
    (128, 8, 4, 2, 16, 4),  # GQA 4 served by 2 CTAs per kv head: only the first writes
    (128, 8, 8, 8, 8, 5),  # GQA 8
    (80, 8, 2, 2, 16, 2),  # idle lanes (kFull false)
    (96, 4, 1, 1, 16, 1),  # fp32-like chunking, 24 chunks
    (256, 8, 4, 4, 16, 3),
    (32, 4, 8, 1, 16, 2),  # GQA 8, one head per CTA: 8 CTAs per kv head
])
def test_cuda_append_kernel_model(d, vec, group, gq, block_size, splits):
    assert _fits(vec, d, gq)
    num_kv_heads = 2
    case = _model_case(num_kv_heads * group, num_kv_heads, d, block_size, MODEL_SEQ_LENS, seed=d + gq + splits)
    out, ref, (kc2, kr, vc2, vr), reads, writes = _run_model(case, d ** -0.5, vec, gq, splits)
    assert (out - ref).abs().max().item() < 2e-6, (out - ref).abs().max().item()
    assert torch.equal(kc2, kr) and torch.equal(vc2, vr)
    live = [(int(s), hkv) for s in case[5].tolist() if s >= 0 for hkv in range(num_kv_heads)]
    assert sorted(writes) == sorted(live), "each live (row, kv head) written exactly once"
    assert not reads & set(writes), "a CTA reads a cache row the launch writes"


@pytest.mark.parametrize("mutate", ["read_current", "every_chunk_writes", "no_fold"])
def test_cuda_append_kernel_model_negative_controls(mutate):
    """The model's checks catch the three ways the append path can go wrong."""
    case = _model_case(8, 2, 64, 16, MODEL_SEQ_LENS, seed=1)
    out, ref, (kc2, kr, vc2, vr), reads, writes = _run_model(case, 0.125, 8, 2, 2, mutate)
    live = [(int(s), hkv) for s in case[5].tolist() if s >= 0 for hkv in range(2)]
    if mutate == "read_current":
        assert reads & set(writes)
    elif mutate == "every_chunk_writes":
        assert sorted(writes) != sorted(live)
    else:
        assert (out - ref).abs().max().item() > 1e-3
