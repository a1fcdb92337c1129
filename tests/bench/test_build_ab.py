"""bench.kernels.build_ab: builds alternate round by round, each in its own process with its own
HYBRID_NVCC_EXTRA, and the summary is the per-build median over the rounds."""
import json
from pathlib import Path

import pytest

from bench.kernels import build_ab


def fake_run(step_of):
    calls = []

    def run(cmd, env, check):
        assert check and cmd[1:3] == ["-m", "bench.kernels.decode_knockout"]
        flags = env["HYBRID_NVCC_EXTRA"]
        calls.append(flags)
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True)
        rnd = sum(1 for c in calls if c == flags) - 1
        rows = [dict(bench="decode_knockout", batch=16, knockout=k, step_ms=step_of(flags, rnd, k))
                for k in ("none", "mlp=flow_pdl")]
        (out / "decode_knockout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run, calls


def test_rounds_alternate_and_rows_carry_their_build():
    run, calls = fake_run(lambda f, r, k: 1.4 + 0.01 * r + (0.05 if f else 0.0))
    rows = build_ab.run_rounds(["", "-DX=4"], 3, [16], mlp_variants=["flow_pdl"], run=run)
    assert calls == ["", "-DX=4"] * 3  # A B A B A B: neither build gets all the early (or late) slots
    assert len(rows) == 12 and {r["nvcc_extra"] for r in rows} == {"", "-DX=4"}
    assert sorted({r["ab_round"] for r in rows}) == [0, 1, 2]
    summary = {(s["case"], s["nvcc_extra"]): s for s in build_ab.summarize(rows)}
    assert summary[("none", "")]["median_ms"] == pytest.approx(1.41)
    assert summary[("none", "-DX=4")]["median_ms"] == pytest.approx(1.46)
    assert summary[("none", "")]["min_ms"] == pytest.approx(1.40) and summary[("none", "")]["rounds"] == 3


def test_command_is_the_knockout_baseline_with_no_knockout_cases(tmp_path):
    cmd = build_ab.knockout_cmd([16, 64], 5, 64, ["flow_pdl"], tmp_path)
    i = cmd.index("--cases")
    assert cmd[i + 1] == "--mlp-variant" and cmd[i + 2] == "flow_pdl"  # --cases given no values: baseline only
    assert cmd[cmd.index("--batch") + 1:cmd.index("--repeats")] == ["16", "64"]


def test_bad_arguments_and_a_run_without_rows():
    with pytest.raises(ValueError, match="differ"):
        build_ab.run_rounds(["-DX", "-DX"], 1, [16], run=lambda *a, **k: None)
    with pytest.raises(ValueError, match="one round"):
        build_ab.run_rounds([""], 0, [16], run=lambda *a, **k: None)
    with pytest.raises(RuntimeError, match="no rows"):
        build_ab.run_rounds([""], 1, [16], run=lambda *a, **k: None)
