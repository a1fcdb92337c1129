"""Scheduler: continuous batching with a fake deterministic model. Whatever the pool size, the
preemptions and the admission order, every request ends with exactly the answer the fake model
generates alone, all blocks come back, and each decode batch has its slots reserved."""
import random
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid.kv_cache.manager import KVCacheManager
from hybrid.scheduler import DecodeBatch, PrefillBatch, Scheduler

VOCAB, EOS = 11, 0


def next_token(tokens: list[int], sample_index: int) -> int:
    """Deterministic 'model': depends on the whole history, so recompute gives the same answer."""
    return zlib.crc32(bytes(str((tokens, sample_index)), "utf8")) % VOCAB


def reference_answer(prompt, sample_index, max_new, max_model_len, eos):
    out: list[int] = []
    while len(out) < max_new and len(prompt) + len(out) < max_model_len:
        tok = next_token(prompt + out, sample_index)
        out.append(tok)
        if eos is not None and tok == eos:
            break
    return out


def run(sched: Scheduler, check=True):
    mgr = sched.manager
    steps = []
    while sched.has_unfinished():
        batch = sched.schedule()
        if isinstance(batch, PrefillBatch):
            assert sum(s.num_tokens for s in batch.seqs) <= sched.max_num_batched_tokens or len(batch.seqs) == 1
            for s in batch.seqs:
                assert mgr.num_slots[s.seq_id] == s.num_tokens
            sampled = [[next_token(s.token_ids, s.sample_index + i) for i in range(s.n)] for s in batch.seqs]
            steps.append(("prefill", len(batch.seqs)))
            sched.process_prefill(batch, sampled)
        else:
            assert isinstance(batch, DecodeBatch) and batch.num_steps >= 1
            assert len(batch.seqs) <= sched.max_num_seqs
            tokens = []
            for s in batch.seqs:
                # the device writes positions num_tokens-1 .. num_tokens+steps-2
                active_steps = min(batch.num_steps, sched.remaining_steps(s))
                assert mgr.num_slots[s.seq_id] == s.num_tokens + active_steps - 1
                assert mgr.num_slots[s.seq_id] <= sched.max_model_len
                hist, row, done = list(s.token_ids), [], False
                for _ in range(batch.num_steps):
                    if done:
                        row.append(-1)  # what the device emits after a row's end: ignored
                        continue
                    tok = next_token(hist, s.sample_index)
                    hist.append(tok)
                    row.append(tok)
                    done = tok in s.eos_token_ids or \
                        len(hist) - len(s.prompt_token_ids) >= s.max_new_tokens or \
                        len(hist) >= sched.max_model_len
                tokens.append(row)
            steps.append(("decode", batch.num_steps))
            sched.process_decode(batch, tokens)
        if check:
            mgr.check_invariants()
    return steps


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), num_blocks=st.integers(8, 60), block_size=st.sampled_from([1, 4, 16]),
       n=st.sampled_from([1, 1, 3]), use_eos=st.booleans(), max_num_seqs=st.integers(1, 12))
def test_outputs_match_reference_under_any_pool_pressure(seed, num_blocks, block_size, n, use_eos,
                                                         max_num_seqs):
    rng = random.Random(seed)
    max_model_len = 40
    mgr = KVCacheManager(num_blocks, block_size, watermark=0.05)
    sched = Scheduler(mgr, max_num_seqs=max(max_num_seqs, n), max_num_batched_tokens=64,
                      max_model_len=max_model_len, decode_steps_per_sync=rng.choice([1, 4, 16]))
    requests = []
    for rid in range(rng.randint(1, 10)):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 20))]
        max_new = rng.randint(1, 25)
        eos = EOS if use_eos else None
        requests.append((prompt, max_new, eos))
    if max(mgr.blocks_for(min(len(p) + m, max_model_len)) for p, m, _ in requests) > num_blocks:
        return  # a single row could never fit; covered by the error test below
    for rid, (prompt, max_new, eos) in enumerate(requests):
        sched.add_request(prompt, max_new, request_id=rid, n=n, eos_token_ids=() if eos is None else (eos,))
    run(sched)
    assert mgr.num_free_blocks == num_blocks and not mgr.block_tables
    assert len(sched.finished) == len(requests) * n
    for seq in sched.finished:
        prompt, max_new, eos = requests[seq.request_id]
        assert seq.output_token_ids == reference_answer(prompt, seq.sample_index, max_new, max_model_len, eos)
        stopped = eos is not None and seq.output_token_ids[-1] == eos
        assert seq.finish_reason == ("stop" if stopped else "length")
    assert sorted((s.request_id, s.sample_index) for s in sched.finished) == \
        [(r, i) for r in range(len(requests)) for i in range(n)]


def test_small_pool_preempts_and_still_matches():
    mgr = KVCacheManager(num_blocks=12, block_size=2, watermark=0.0)
    sched = Scheduler(mgr, max_num_seqs=8, max_num_batched_tokens=1000, max_model_len=64)
    prompts = [[1 + (i * 7 + j) % 10 for j in range(5)] for i in range(6)]
    for rid, p in enumerate(prompts):
        sched.add_request(p, 12, request_id=rid)
    run(sched)
    assert sched.num_preemptions > 0
    for seq in sched.finished:
        assert seq.output_token_ids == reference_answer(prompts[seq.request_id], 0, 12, 64, None)


def test_without_eos_the_host_syncs_once_per_wave():
    mgr = KVCacheManager(num_blocks=200, block_size=16)
    sched = Scheduler(mgr, max_num_seqs=64, max_num_batched_tokens=4096, max_model_len=512,
                      decode_steps_per_sync=8)
    for rid in range(20):
        sched.add_request([3] * (5 + rid), 100, request_id=rid)
    steps = run(sched)
    assert steps == [("prefill", 20), ("decode", 99)]


def test_prefill_respects_token_and_row_budgets_and_eos_bounds_decode_steps():
    mgr = KVCacheManager(num_blocks=400, block_size=16)
    sched = Scheduler(mgr, max_num_seqs=6, max_num_batched_tokens=50, max_model_len=256,
                      decode_steps_per_sync=8)
    for rid in range(10):
        sched.add_request([2 + rid % 5] * 20, 30, request_id=rid, n=1, eos_token_ids=(EOS,))
    first = sched.schedule()
    assert isinstance(first, PrefillBatch) and len(first.seqs) == 2  # 3 * 20 > 50 tokens
    sched.process_prefill(first, [[next_token(s.token_ids, 0)] for s in first.seqs])
    steps = run(sched)
    assert all(k <= 8 for kind, k in steps if kind == "decode")
    assert max(n for kind, n in steps if kind == "prefill") <= 2
    assert len(sched.finished) == 10 and mgr.num_free_blocks == 400


def test_row_that_cannot_fit_raises():
    mgr = KVCacheManager(num_blocks=2, block_size=4)
    sched = Scheduler(mgr, max_num_seqs=4, max_num_batched_tokens=100, max_model_len=64)
    sched.add_request([1] * 20, 4, request_id=0)
    with pytest.raises(RuntimeError, match="blocks"):
        sched.schedule()
