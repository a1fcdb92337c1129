"""bench.report rebuilds tables and plots from rows alone (synthetic fixture rows written here, in a
temp dir; never committed as results), and writes an honest index when there are none."""
from __future__ import annotations

import csv
import dataclasses
import random

import pytest

from bench import flops
from bench.e2e import fill_row
from bench.measure import Measurement
from bench.report import build
from bench.rows import E2ERow, append_row

SHAPES = {  # synthetic shapes, not the real models
    "model-a": flops.ModelShape(24, 2048, 50272, 1_300_000_000, 32, 64),
    "model-b": flops.ModelShape(32, 4096, 50272, 6_700_000_000, 32, 128),
}
CRITIC = flops.ModelShape(24, 1024, 50272, 330_000_000, 16, 64)


def _row(rng, system, model, gpus, batch, card="H100-SXM", status="ok"):
    row = E2ERow(system=system, model=model, critic="critic-x", gpus=gpus, batch=batch, prompt_len=256,
                 gen_len=256, status=status, warmup=1, iters=2, actor_params=SHAPES[model].num_params,
                 critic_params=CRITIC.num_params, usd_per_gpu_hour=3.0, price_source="test fixture",
                 generation_path={"ours": "hybrid-engine", "hf-ddp": "hf-generate"}.get(system, "hf-generate-static"))
    d = dataclasses.asdict(row)
    d.update(gpu_name=f"FIXTURE {card}", card=card, command=f"synthetic fixture {system} {model} {gpus}")
    if status != "ok":
        d["error"] = f"{system}: batch {batch} per GPU does not fit"
        return d
    its = []
    for _ in range(3):
        g, x, t = rng.uniform(1, 20), rng.uniform(0.5, 3), rng.uniform(1, 10)
        its.append(dict(time_generation_s=g, time_experience_s=x, time_training_s=t, e2e_s=g + x + t))
    m = Measurement(warmup=its[:1], measured=its[1:], peak_memory_gib=rng.uniform(10, 70))
    fill_row(row, m, SHAPES[model], CRITIC, copy_bw=3e12, bytes_per_param=2)
    d.update({k: v for k, v in dataclasses.asdict(row).items()})
    return d


@pytest.fixture()
def fixture_rows(tmp_path):
    rng = random.Random(7)
    results = tmp_path / "results"
    rows = []
    for model in SHAPES:
        for gpus in (1, 2):
            for system in ("ours", "hf-ddp", "hf-static"):
                rows.append(_row(rng, system, model, gpus, 32))
    rows.append(_row(rng, "ours", "model-b", 1, 64))
    rows.append(_row(rng, "hf-ddp", "model-b", 1, 64, status="oom"))
    for r in rows:
        append_row(r, "e2e", results)
    for actor, params, status in (("model-a", 1.3e9, "ok"), ("model-b", 6.7e9, "ok"), ("model-c", 13e9, "oom")):
        append_row({"kind": "max_model", "actor": actor, "actor_params": params, "critic": "critic-x", "gpus": 1,
                    "option": "zero3", "status": status, "step_time_s": 5.0 if status == "ok" else None,
                    "peak_memory_gib": 40.0, "gpu_name": "FIXTURE H100-SXM", "card": "H100-SXM",
                    "command": "synthetic fixture max_model"}, "max_model", results)
    return results, rows


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_rebuilds_tables_and_plots(tmp_path, fixture_rows):
    results, rows = fixture_rows
    out = tmp_path / "reports"
    readme = build(results, out)
    for name in ("throughput", "speedup", "epoch_cost", "phase_breakdown", "max_model"):
        assert (out / f"{name}.md").is_file() and (out / f"{name}.csv").is_file(), name
    for png in ("throughput_vs_model_size", "scaling_vs_gpus", "time_breakdown"):
        data = (out / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png

    assert len(_csv(out / "throughput.csv")) == len(rows)
    by = {(r["system"], r["model"], r["gpus"], r["batch"]): r for r in rows}
    speed = _csv(out / "speedup.csv")
    equal = [s for s in speed if s["comparison"] == "equal batch"]
    assert len(equal) == 5  # 2 models x 2 GPU counts at batch 32, + model-b at 64 (hf-ddp OOM)
    for s in equal:
        ours = by[("ours", s["model"], int(s["gpus"]), int(s["batch ours"]))]
        base = by[("hf-ddp", s["model"], int(s["gpus"]), int(s["batch ours"]))]
        if base["status"] == "oom":
            assert s["x hf-ddp"].startswith("∞") and s["hf-ddp samples/s"] == "OOM"
        else:
            assert float(s["x hf-ddp"]) == pytest.approx(ours["samples_per_s"] / base["samples_per_s"], rel=1e-9)
    best = [s for s in speed if s["comparison"] == "each at its best"]
    b1 = next(s for s in best if s["model"] == "model-b" and s["gpus"] == "1")
    ours_best = max((r for r in rows if r["system"] == "ours" and r["model"] == "model-b" and r["gpus"] == 1),
                    key=lambda r: r["samples_per_s"])
    assert float(b1["ours samples/s"]) == pytest.approx(ours_best["samples_per_s"])

    epoch = _csv(out / "epoch_cost.csv")
    for e in epoch:
        hours = 135.3e6 / (float(e["tokens/s/GPU"]) * int(e["gpus"])) / 3600
        assert float(e["hours"]) == pytest.approx(hours, rel=1e-9)
        assert float(e["cost $"]) == pytest.approx(hours * int(e["gpus"]) * 3.0, rel=1e-9)

    mm = _csv(out / "max_model.csv")
    assert len(mm) == 1 and mm[0]["largest actor that fits"] == "model-b"
    assert mm[0]["first that did not fit"] == "model-c (oom)"

    index = readme.read_text()
    assert "synthetic fixture max_model" in index and "FIXTURE H100-SXM x1" in index
    for name in ("throughput.md", "speedup.md", "epoch_cost.md", "phase_breakdown.md", "max_model.md",
                 "time_breakdown.png"):
        assert name in index


def test_report_without_rows_says_so(tmp_path, fixture_rows):
    results, _ = fixture_rows
    out = tmp_path / "reports"
    build(results, out)
    (out / "notes.txt").write_text("not ours")
    for f in results.iterdir():  # the rows are gone: nothing measured may survive in reports/
        f.unlink()
    readme = build(results, out)
    text = readme.read_text()
    assert "No result rows yet" in text
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "notes.txt"]
