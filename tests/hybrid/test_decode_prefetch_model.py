"""The CUDA decode attention's pre-wait prefetch (csrc/paged_attention.cuh, EngineConfig.attn_prefetch)
as a model, on the CPU: each warp's first tile is loaded before griddepcontrol.wait from whatever the
seq_lens buffer holds at that moment (the old length, the new one, or a previous row's in a reused
graph slot) and the block table; after the wait the tile is used only if all its tokens are cached
positions under the final length. The model mirrors the kernel's index math and checks, over random
tables and every mix of stale and final lengths, that (1) every early load is in bounds, and (2) a
used tile holds exactly the (block, offset) pairs the normal loop would load. Negative controls drop
the final check or the clamps and must fail."""
import random

import pytest

TPI, U = 4, 8  # D64 bf16: 4 tokens per warp step, 8 steps per tile
TILE = TPI * U
NW = 4


def early_loads(warp, len_pre, table, bs, num_blocks, clamp=True):
    """(ok, [(block, offset) per token of the tile]) as the kernel computes them before the wait."""
    max_tokens = len(table) * bs
    if warp * TILE + TILE > max_tokens:
        return False, None
    ok = warp * TILE + TILE <= len_pre - 1
    loads = []
    for u in range(U):
        for g in range(TPI):
            t = warp * TILE + u * TPI + g
            blk0 = table[t // bs]
            blk = (min(max(blk0, 0), num_blocks - 1) if clamp else blk0) if ok else 0
            loads.append((blk, (t % bs) if ok else 0))
    return ok, loads


def final_loads(warp, seq_len, table, bs):
    """What the loop after the wait loads for the warp's first tile (tokens clamped to end - 1)."""
    end = seq_len
    out = []
    for u in range(U):
        for g in range(TPI):
            t = min(warp * TILE + u * TPI + g, end - 1)
            out.append((table[t // bs], t % bs))
    return out


def used(prefetched, warp, seq_len, drop_final_check=False):
    return prefetched and (drop_final_check or warp * TILE + TILE <= seq_len - 1)


def _cases(rng, n=400):
    for _ in range(n):
        bs = rng.choice([8, 16, 32])
        width = rng.randint(1, 12)
        num_blocks = rng.randint(width, 4 * width + 4)
        final = rng.randint(0, width * bs)
        live = -(-final // bs)
        # the row's real blocks, then stale ids (or garbage) past its length
        table = rng.sample(range(num_blocks), live) + [rng.choice([0, -1, num_blocks + 3, rng.randrange(num_blocks)])
                                                       for _ in range(width - live)]
        stale = rng.choice([final, max(final - 1, 0), rng.randint(0, width * bs + 50), -7])
        yield bs, num_blocks, table, stale, final


def _check(drop_final_check=False, clamp=True):
    rng = random.Random(7)
    for bs, num_blocks, table, stale, final in _cases(rng):
        for warp in range(NW):
            ok, loads = early_loads(warp, stale, table, bs, num_blocks, clamp)
            if loads is not None:
                assert all(0 <= b < num_blocks and 0 <= o < bs for b, o in loads), (table, stale, warp)
            if used(ok, warp, final, drop_final_check):
                assert loads == final_loads(warp, final, table, bs), (table, stale, final, warp)


def test_early_loads_are_in_bounds_and_used_tiles_equal_the_loop():
    _check()


def test_without_the_final_check_a_stale_length_would_feed_wrong_tokens():
    with pytest.raises(AssertionError):
        _check(drop_final_check=True)


def test_without_the_clamp_garbage_table_entries_would_load_out_of_bounds():
    with pytest.raises(AssertionError):
        _check(clamp=False)


def test_runner_switch_follows_config_env_and_device(monkeypatch):
    """ModelRunner._attn_prefetch: EngineConfig.attn_prefetch, HYBRID_ATTN_PREFETCH=0/1 over it, and
    never on the CPU or before the CUDA extension is loaded (it must not build it)."""
    from types import SimpleNamespace

    import torch

    from hybrid.config import EngineConfig
    from hybrid.ops import cuda_backend
    from hybrid.runner import ModelRunner

    monkeypatch.delenv("HYBRID_ATTN_PREFETCH", raising=False)
    cpu = SimpleNamespace(cfg=EngineConfig(), device=torch.device("cpu"))
    assert EngineConfig().attn_prefetch and not ModelRunner._attn_prefetch(cpu)
    gpu = SimpleNamespace(cfg=EngineConfig(), device=torch.device("cuda", 0))
    monkeypatch.setattr(cuda_backend, "loaded", lambda: True)
    assert ModelRunner._attn_prefetch(gpu)
    monkeypatch.setenv("HYBRID_ATTN_PREFETCH", "0")
    assert not ModelRunner._attn_prefetch(gpu)
    monkeypatch.setenv("HYBRID_ATTN_PREFETCH", "1")
    assert ModelRunner._attn_prefetch(SimpleNamespace(cfg=EngineConfig(attn_prefetch=False), device=gpu.device))
    monkeypatch.setattr(cuda_backend, "loaded", lambda: False)
    assert not ModelRunner._attn_prefetch(gpu)


def successor_lines(cta, per_row, batch, stride, warp, lane, seq_lens, tables, bs, num_blocks, num_kv_heads,
                    group, head_size, elt, clamp=True):
    """Byte offsets into the key cache (the value cache's are the same) that lane `lane` of warp
    `warp` of CTA `cta` (linear index head + per_row * row, one split, one head per CTA) prefetches
    for its successor, as the kernel's prefetch_successor computes them; [] where it skips."""
    succ = cta + stride
    if succ >= per_row * batch:
        return []
    b2 = succ // per_row
    kv_head2 = (succ - b2 * per_row) // group
    tok = warp * TILE + lane % TILE
    len2 = seq_lens[b2]
    blk2 = tables[b2][min(tok // bs, len(tables[b2]) - 1)]
    if tok >= len2 - 1:
        return []
    blk = min(max(blk2, 0), num_blocks - 1) if clamp else blk2
    row = ((blk * bs) + tok % bs) * num_kv_heads * head_size + kv_head2 * head_size
    return [row * elt + i for i in range(0, head_size * elt, 128)]


@pytest.mark.parametrize("seed", range(4))
def test_successor_prefetch_stays_in_the_pool_and_names_the_successor(seed):
    """prefetch_successor (csrc/paged_attention.cuh): every line a lane asks the L2 for lies inside
    the cache, whatever the block table holds past a row's blocks and in padding rows (stale ids, -1,
    ids past the pool, with any length), and for a real row it is the successor CTA's own first-tile
    row (the one its loop loads first). Negative control: without the clamp a garbage id leaves the
    pool."""
    rng = random.Random(seed)
    bs, head_size, elt = 16, 64, 2
    num_heads = num_kv_heads = rng.choice([8, 32])
    batch = rng.randint(20, 80)
    width = rng.randint(2, 40)
    num_blocks = batch * width + 3
    pool_bytes = num_blocks * bs * num_kv_heads * head_size * elt
    seq_lens = [rng.choice([0, 1, 2, rng.randint(0, width * bs)]) for _ in range(batch)]
    perm = list(range(num_blocks))
    rng.shuffle(perm)
    tables = []
    padding = set(rng.sample(range(batch), 5))  # a graph bucket's padding rows: stale lengths and tables
    for b in range(batch):
        used = 0 if b in padding else -(-seq_lens[b] // bs)
        garbage = [rng.choice([-1, num_blocks + 7, 2**31 - 1, rng.randrange(num_blocks)]) for _ in range(width - used)]
        tables.append(perm[b * width:b * width + used] + garbage)
    seq_lens[min(padding)] = width * bs  # at least one padding row claims every position
    stride = rng.choice([1, 7, 528])
    escaped = False
    for cta in range(num_heads * batch):
        for warp in range(NW):
            for lane in range(32):
                lines = successor_lines(cta, num_heads, batch, stride, warp, lane, seq_lens, tables, bs,
                                        num_blocks, num_kv_heads, 1, head_size, elt)
                assert all(0 <= x < pool_bytes for x in lines)
                raw = successor_lines(cta, num_heads, batch, stride, warp, lane, seq_lens, tables, bs,
                                      num_blocks, num_kv_heads, 1, head_size, elt, clamp=False)
                escaped |= any(not 0 <= x < pool_bytes for x in raw)
                succ = cta + stride
                b2, h2 = divmod(succ, num_heads)
                if lines and b2 not in padding:  # a cached token of the successor's row: its own row
                    tok = warp * TILE + lane % TILE
                    assert tok < seq_lens[b2] - 1
                    want = ((tables[b2][tok // bs] * bs + tok % bs) * num_kv_heads + h2) * head_size * elt
                    assert lines[0] == want
    assert escaped, "negative control: a padding row's garbage ids must leave the pool unclamped"


def test_engine_successor_switch_follows_config_and_env(monkeypatch):
    """hybrid.engine.set_attn_successor_prefetch: EngineConfig.attn_successor_prefetch (off by
    default), HYBRID_ATTN_SUCCESSOR=0/1 over it; on the CPU it never touches the CUDA extension."""
    import torch

    from hybrid import engine as E
    from hybrid.config import EngineConfig
    from hybrid.ops import cuda_backend

    calls = []
    monkeypatch.setattr(cuda_backend, "set_decode_successor_prefetch", lambda on: calls.append(on) or True)
    monkeypatch.setattr(E.ops, "cuda_ext_available", lambda: True)
    monkeypatch.setattr(E, "_cuda_successor_on", False)
    monkeypatch.delenv("HYBRID_ATTN_SUCCESSOR", raising=False)
    assert not EngineConfig().attn_successor_prefetch
    E.set_attn_successor_prefetch(True, torch.device("cpu"))
    E.set_attn_successor_prefetch(False, torch.device("cuda", 0))  # off and never on: no call
    assert calls == []
    E.set_attn_successor_prefetch(True, torch.device("cuda", 0))
    monkeypatch.setenv("HYBRID_ATTN_SUCCESSOR", "0")
    E.set_attn_successor_prefetch(True, torch.device("cuda", 0))
    monkeypatch.setenv("HYBRID_ATTN_SUCCESSOR", "1")
    E.set_attn_successor_prefetch(False, torch.device("cuda", 0))
    assert calls == [True, False, True]
