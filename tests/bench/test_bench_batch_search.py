"""`--batch auto`: the search, OOM handling with rebuilds, and OOM rows (fake OOM-raising runners)."""
from __future__ import annotations

import random

import pytest
import torch

from bench import measure
from bench.measure import find_max_batch, fits_with_rebuild


@pytest.mark.parametrize("seed", range(12))
def test_find_max_batch_finds_threshold(seed):
    rng = random.Random(seed)
    limit = rng.randint(1, 700)
    gran = rng.choice([1, 4, 8])
    calls = []

    def fits(b):
        calls.append(b)
        return b <= limit

    res = find_max_batch(fits, start=rng.choice([1, 16, 64]), max_batch=512, granularity=gran)
    assert len(calls) == len(set(calls)), "a batch was tried twice"
    assert res.best is not None and res.best <= min(limit, 512)
    assert all(ok == (b <= limit) for b, ok in res.tried.items())
    if limit >= 512:
        assert res.best == 512
    else:  # within one granularity step of the true limit, and never a batch that failed
        assert limit - res.best < gran
        assert len(calls) <= 20


def test_find_max_batch_nothing_fits():
    res = find_max_batch(lambda b: False, start=16)
    assert res.best is None and set(res.tried) == {16, 8, 4, 2, 1}


class FakeRunner:
    """Raises torch's CUDA OOM above `limit` rows, like a real step would."""

    built = 0
    closed = 0

    def __init__(self, limit):
        FakeRunner.built += 1
        self.limit = limit
        self.generation_path = "fake"

    def step(self, prompts):
        b = prompts["input_ids"].shape[0]
        if b > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {b} GiB")
        return dict(time_generation_s=0.02 * b, time_experience_s=0.01 * b, time_training_s=0.03 * b,
                    num_samples=b, gen_tokens=b * 8)

    def close(self):
        FakeRunner.closed += 1


def _prompts(batch, i):
    return {"input_ids": torch.randint(0, 100, (batch, 4)), "attention_mask": torch.ones(batch, 4, dtype=torch.long)}


def test_fits_with_rebuild_rebuilds_after_oom():
    FakeRunner.built = FakeRunner.closed = 0
    fits, close = fits_with_rebuild(lambda: FakeRunner(40), _prompts, "fake")
    res = find_max_batch(fits, start=16, max_batch=512, granularity=8)
    close()
    assert res.best == 40
    ooms = sum(not ok for ok in res.tried.values())
    assert ooms >= 1
    assert FakeRunner.built == ooms + 1  # a fresh runner after every OOM
    assert FakeRunner.closed == FakeRunner.built


def test_non_oom_errors_propagate():
    class Broken(FakeRunner):
        def step(self, prompts):
            raise ValueError("shape bug")

    fits, close = fits_with_rebuild(lambda: Broken(10), _prompts)
    with pytest.raises(ValueError, match="shape bug"):
        fits(4)
    close()


def test_is_oom():
    assert measure.is_oom(torch.OutOfMemoryError("x"))
    assert measure.is_oom(RuntimeError("CUDA error: out of memory"))
    assert not measure.is_oom(RuntimeError("size mismatch"))


def _bench(monkeypatch, tmp_path, limit, extra=()):
    import bench.e2e as e2e

    monkeypatch.setattr(e2e, "build_system", lambda system, spec: FakeRunner(limit))
    args = e2e.parse_args(["--model", "tiny-opt", "--critic", "tiny-opt", "--prompt-len", "4", "--gen-len", "8",
                           "--warmup", "1", "--iters", "2", "--results-dir", str(tmp_path), "--no-progress",
                           "--gpu-hour-price", "2.5", *extra])
    return e2e.Bench(args)


def test_bench_search_and_oom_row(monkeypatch, tmp_path):
    from bench.rows import read_rows

    b = _bench(monkeypatch, tmp_path, limit=24, extra=["--batch", "auto", "--max-batch", "128"])
    assert b.search("hf-ddp") == 24
    ok = b.run("hf-ddp", 24, "auto-best")
    oom = b.run("hf-ddp", 32, "fixed")
    assert ok["status"] == "ok" and oom["status"] == "oom"
    assert "batch 32" in oom["error"] and "does not fit" in oom["error"]
    rows = read_rows(tmp_path)
    assert [r["status"] for r in rows] == ["ok", "oom"]
    r = rows[0]
    # the fake's phase times are linear in the batch: 0.02/0.01/0.03 s per row
    assert r["time_generation_s"] == pytest.approx(0.48) and r["time_training_s"] == pytest.approx(0.72)
    assert r["samples_per_s"] == pytest.approx(24 / r["time_e2e_s"])
    assert r["tokens_per_s_per_gpu"] == pytest.approx(24 * 12 / r["time_e2e_s"])
    assert r["usd_per_gpu_hour"] == 2.5 and r["price_source"] == "--gpu-hour-price"
    assert r["epoch_usd"] == pytest.approx(135.3e6 / r["tokens_per_s_per_gpu"] / 3600 * 2.5)
    assert len(r["iter_e2e_s"]) == 2 and len(r["warmup_e2e_s"]) == 1
