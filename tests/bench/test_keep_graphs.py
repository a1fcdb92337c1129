"""bench.keep_graphs on the CPU (tiny OPT, Triton interpreter): one row per (batch, churn, keep),
the after-release rollout timed and its fields filled. On the CPU there are no graphs to keep."""
import json

import pytest


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_rows_per_case(tmp_path):
    from bench.keep_graphs import run

    rows = run("tiny-opt", [2], [0, 1], 6, 3, "cpu", str(tmp_path))
    assert [(r["churn_mb"], r["keep_graphs"]) for r in rows] == [(0, False), (0, True), (1, False), (1, True)]
    for r in rows:
        assert r["generate_s"] > 0 and r["per_step_ms"] > 0 and r["graphs_reused"] is False
        assert r["after_release_allocated_mb"] is None  # no CUDA memory to count on the CPU
    written = [json.loads(line) for line in (tmp_path / "keep_graphs.jsonl").read_text().splitlines()]
    assert len(written) == 4 and all("git_commit" in w for w in written)
