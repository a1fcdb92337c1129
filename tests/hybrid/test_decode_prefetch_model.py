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
