"""Build reports/ from result rows alone: `python -m bench.report`.

Reads every reports/results/*.jsonl row (bench.e2e, bench.max_model, bench.engine_decode and the
bench/kernels microbenchmarks append them), writes
markdown + CSV tables and PNG plots to reports/, and reports/README.md as the index naming the
exact command behind every table and the card of every row. No rows, no numbers: the index then
says so. Nothing here measures or invents anything.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from bench.rows import read_rows

BASELINES = ("hf-ddp", "hf-static")
TABLES = ("throughput", "speedup", "epoch_cost", "phase_breakdown", "max_model", "engine_decode", "kernels")
PLOTS = ("throughput_vs_model_size", "scaling_vs_gpus", "time_breakdown")
GENERATED = tuple(f"{t}.{ext}" for t in TABLES for ext in ("md", "csv")) + tuple(f"{p}.png" for p in PLOTS)


@dataclass
class Table:
    name: str
    title: str
    columns: list
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    sources: list = field(default_factory=list)
    """Rows the table was built from (their commands and cards go into the index)."""


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        a = abs(v)
        return f"{v:.3g}" if a < 10 else f"{v:,.1f}" if a < 1000 else f"{v:,.0f}"
    return str(v)


def to_markdown(t: Table) -> str:
    lines = [f"# {t.title}", "", "| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in t.rows]
    if t.notes:
        lines += [""] + [f"- {n}" for n in t.notes]
    return "\n".join(lines) + "\n"


def write_table(t: Table, out_dir: Path) -> tuple[Path, Path]:
    md, csv_path = out_dir / f"{t.name}.md", out_dir / f"{t.name}.csv"
    md.write_text(to_markdown(t), encoding="utf-8")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(t.columns)
        w.writerows([["" if v is None else v for v in r] for r in t.rows])
    return md, csv_path


# ------------------------------------------------------------------------------ row selection
def setup_label(r: dict) -> str:
    """The memory options a row ran with, as the tables show them (rows with different options are
    different configurations: never compared or merged)."""
    x = r.get("extra") or {}
    parts = [f"ZeRO-{x.get('actor_zero_stage', 2)}" + ("+offload" if x.get("offload") else "")]
    if x.get("actor_lora_dim"):
        parts.append(f"LoRA {x['actor_lora_dim']}")
    if x.get("gradient_checkpointing"):
        parts.append("grad-ckpt")
    if x.get("hf_precision", "amp") != "amp":
        parts.append(f"hf {x['hf_precision']}")
    return ", ".join(parts)


def _config_key(r: dict) -> tuple:
    return (r["model"], r["critic"], r["gpus"], r.get("card"), r["prompt_len"], r["gen_len"], setup_label(r))


def latest_e2e(rows: list[dict]) -> list[dict]:
    """e2e rows, the latest per (system, config, batch) when a configuration was measured twice."""
    keep: "OrderedDict[tuple, dict]" = OrderedDict()
    for r in sorted((r for r in rows if r.get("kind") == "e2e"), key=lambda r: r.get("timestamp") or ""):
        keep[(r["system"], *_config_key(r), r["batch"])] = r
    return sorted(keep.values(), key=lambda r: (r.get("actor_params") or 0, r["model"], r["gpus"], r["system"], r["batch"]))


def best_per_system(e2e: list[dict]) -> dict:
    """(config key) -> {system: the ok row with the most samples/s}."""
    out: dict = {}
    for r in e2e:
        if r["status"] != "ok":
            continue
        cur = out.setdefault(_config_key(r), {}).get(r["system"])
        if cur is None or r["samples_per_s"] > cur["samples_per_s"]:
            out[_config_key(r)][r["system"]] = r
    return out


def _speedup(ours: dict | None, base: dict | None):
    if ours is None or ours["status"] != "ok":
        return None
    if base is None:
        return None
    if base["status"] == "oom":
        return "∞ (baseline OOM)"
    return ours["samples_per_s"] / base["samples_per_s"]


# ------------------------------------------------------------------------------ tables
def throughput_table(e2e: list[dict]) -> Table:
    t = Table("throughput", "Stage-3 throughput per model x GPU count (DeepSpeed-Chat accounting)",
              ["model", "critic", "card", "gpus", "setup", "system", "batch", "mode", "generation", "e2e s", "samples/s",
               "tokens/s/GPU", "gen TFLOPs/GPU", "train TFLOPs/GPU", "eff. TFLOPs/GPU", "decode ms/tok", "MBU",
               "peak GiB"])
    for r in e2e:
        ok = r["status"] == "ok"
        t.rows.append([r["model"], r["critic"], r.get("card"), r["gpus"], setup_label(r), r["system"], r["batch"],
                       r.get("batch_mode"),
                       r.get("generation_path"), r.get("time_e2e_s") if ok else r["status"].upper(),
                       r.get("samples_per_s"), r.get("tokens_per_s_per_gpu"), r.get("tflops_generation"),
                       r.get("tflops_training"), r.get("tflops_effective"), r.get("decode_ms_per_token"),
                       f"{r['decode_mbu']:.1%}" if ok and r.get("decode_mbu") is not None else None,
                       r.get("peak_memory_gib")])
        t.sources.append(r)
    t.notes = ["Means over the measured iterations; warm-up iterations excluded (see phase_breakdown for cold).",
               "setup: ours' actor ZeRO stage (+offload), LoRA rank (ours: own LoRA; baselines: PEFT), gradient "
               "checkpointing (all systems), baselines' precision when not amp.",
               "TFLOPs: DeepSpeed-Chat's print_throughput_step3 formulas (bench/flops.py); MBU = weights + live KV "
               "bytes per decode step / time / measured copy bandwidth (bench/hardware.py).",
               "tokens = prompt + answer tokens; batch is per GPU (generation batch = training batch)."]
    return t


def speedup_table(e2e: list[dict]) -> Table:
    t = Table("speedup", "Speedup of ours over the HF baselines (samples/s ratio on the same card)",
              ["model", "critic", "card", "gpus", "setup", "comparison", "batch ours", "ours samples/s", "batch hf-ddp",
               "hf-ddp samples/s", "x hf-ddp", "batch hf-static", "hf-static samples/s", "x hf-static"])
    by_batch: dict = {}
    for r in e2e:
        by_batch.setdefault((_config_key(r), r["batch"]), {})[r["system"]] = r
    for (key, batch), systems in by_batch.items():
        ours = systems.get("ours")
        if ours is None or not any(b in systems for b in BASELINES):
            continue
        row = [key[0], key[1], key[3], key[2], key[6], "equal batch", batch, ours.get("samples_per_s")]
        for b in BASELINES:
            base = systems.get(b)
            row += [batch if base else None,
                    (base.get("samples_per_s") if base["status"] == "ok" else "OOM") if base else None,
                    _speedup(ours, base)]
        t.rows.append(row)
        t.sources += [ours] + [systems[b] for b in BASELINES if b in systems]
    oom_only = {(_config_key(r), r["system"]): r for r in e2e if r["status"] == "oom"}
    for key, systems in best_per_system(e2e).items():
        ours = systems.get("ours")
        if ours is None or not any(b in systems or (key, b) in oom_only for b in BASELINES):
            continue
        row = [key[0], key[1], key[3], key[2], key[6], "each at its best", ours["batch"], ours["samples_per_s"]]
        for b in BASELINES:
            base = systems.get(b)
            if base is None and (key, b) in oom_only:  # never fitted, not even at its smallest batch tried
                base = oom_only[(key, b)]
                row += [base["batch"], "OOM", _speedup(ours, base)]
                t.sources.append(base)
                continue
            row += [base["batch"] if base else None, base["samples_per_s"] if base else None, _speedup(ours, base)]
        t.rows.append(row)
        t.sources += list(systems.values())
    t.notes = ["Ratios of samples/s measured on the same card; 'each at its best' takes every system's fastest "
               "ok row (bench.e2e --batch auto measures each at its largest fitting batch).",
               "'∞ (baseline OOM)': the baseline did not fit at that batch; the row records the OOM."]
    return t


def epoch_table(e2e: list[dict]) -> Table:
    t = Table("epoch_cost", "Projected time and cost of DeepSpeed-Chat's stage-3 epoch (135.3M tokens)",
              ["model", "critic", "card", "gpus", "setup", "system", "batch", "tokens/s/GPU", "hours", "GPU-hours",
               "$/GPU-hour", "cost $", "price source"])
    for key, systems in best_per_system(e2e).items():
        for sys_name in sorted(systems):
            r = systems[sys_name]
            t.rows.append([key[0], key[1], key[3], key[2], key[6], sys_name, r["batch"], r["tokens_per_s_per_gpu"],
                           r["epoch_hours"], r["epoch_gpu_hours"], r.get("usd_per_gpu_hour"), r.get("epoch_usd"),
                           r.get("price_source")])
            t.sources.append(r)
    t.notes = ["Each system at its fastest measured batch. Epoch = 135.3M prompt + answer tokens "
               "(bench/cost.py explains the definition); hours = tokens / (tokens/s/GPU x GPUs).",
               "Prices are assumptions (bench/hardware.py) unless the row was run with --gpu-hour-price."]
    return t


def phase_table(e2e: list[dict]) -> Table:
    t = Table("phase_breakdown", "Where a PPO iteration's time goes (seconds; cold = first warm-up iteration)",
              ["model", "card", "gpus", "setup", "system", "batch", "generation", "experience", "training", "e2e",
               "gen %", "cold generation", "cold experience", "cold training", "cold e2e"])
    for r in e2e:
        if r["status"] != "ok":
            continue
        g, x, tr, e = (r.get(k) for k in ("time_generation_s", "time_experience_s", "time_training_s", "time_e2e_s"))
        t.rows.append([r["model"], r.get("card"), r["gpus"], setup_label(r), r["system"], r["batch"], g, x, tr, e,
                       f"{g / (g + x + tr):.0%}" if None not in (g, x, tr) else None,
                       r.get("cold_generation_s"), r.get("cold_experience_s"), r.get("cold_training_s"),
                       r.get("cold_e2e_s")])
        t.sources.append(r)
    return t


def max_model_table(rows: list[dict]) -> Table:
    t = Table("max_model", "Largest actor that runs one stage-3 step per card and memory option (DS-Chat Table 3)",
              ["card", "gpus", "critic", "option", "largest actor that fits", "params (B)", "first that did not fit",
               "step s", "peak GiB"])
    attempts = [r for r in rows if r.get("kind") == "max_model"]
    groups: dict = {}
    for r in sorted(attempts, key=lambda r: r.get("timestamp") or ""):
        groups.setdefault((r.get("card"), r.get("gpus", 1), r["critic"], r["option"]), {})[r["actor"]] = r
    for (card, gpus, critic, option), by_actor in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        fit = [r for r in by_actor.values() if r["status"] == "ok"]
        nofit = [r for r in by_actor.values() if r["status"] != "ok"]
        best = max(fit, key=lambda r: r["actor_params"]) if fit else None
        first_fail = min(nofit, key=lambda r: r["actor_params"]) if nofit else None
        t.rows.append([card, gpus, critic, option, best["actor"] if best else "none",
                       best["actor_params"] / 1e9 if best else None,
                       f"{first_fail['actor']} ({first_fail['status']})" if first_fail else None,
                       best.get("step_time_s") if best else None, best.get("peak_memory_gib") if best else None])
        t.sources += list(by_actor.values())
    t.notes = ["Each attempt ran in its own subprocess (python -m bench.max_model), so an OOM cannot poison the next."]
    return t


# ------------------------------------------------------------------------------ plots
def make_plots(e2e: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in e2e if r["status"] == "ok"]
    paths: list[Path] = []
    if not ok:
        return paths
    best = best_per_system(ok)

    # throughput vs model size (1 GPU), one line per system and card
    fig, ax = plt.subplots(figsize=(6, 4))
    lines: dict = {}
    for key, systems in best.items():
        if key[2] != 1:
            continue
        for s, r in systems.items():
            lines.setdefault((s, key[3], key[6]), []).append((r["actor_params"] / 1e9, r["tokens_per_s_per_gpu"]))
    for (s, card, setup), pts in sorted(lines.items()):
        pts.sort()
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{s} ({card}; {setup})")
    if lines:
        ax.set_xscale("log")
        ax.set_xlabel("actor parameters (B)")
        ax.set_ylabel("tokens/s per GPU (prompt + answer)")
        ax.set_title("Stage-3 throughput vs model size, 1 GPU, best batch")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out_dir / "throughput_vs_model_size.png")
        fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # scaling vs GPU count
    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict = {}
    for key, systems in best.items():
        for s, r in systems.items():
            series.setdefault((key[0], s, key[3], key[6]), []).append((key[2], r["samples_per_s"]))
    for (model, s, card, setup), pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{model} {s} ({card}; {setup})")
    ax.set_xlabel("GPUs")
    ax.set_ylabel("samples/s (all GPUs)")
    ax.set_title("Scaling with GPU count, best batch")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "scaling_vs_gpus.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # time breakdown: stacked bars per (model, gpus, system, batch)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(ok) + 2), 4))
    labels = [f"{r['model']}\n{r['gpus']}x{r.get('card')}\n{r['system']} b{r['batch']}" for r in ok]
    bottom = [0.0] * len(ok)
    for phase, color in (("generation", "#4c72b0"), ("experience", "#dd8452"), ("training", "#55a868")):
        vals = [r.get(f"time_{phase}_s") or 0.0 for r in ok]
        ax.bar(range(len(ok)), vals, bottom=bottom, label=phase, color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(ok)))
    ax.set_xticklabels(labels, fontsize=6)
    ax.set_ylabel("seconds per PPO iteration")
    ax.set_title("Time breakdown of one PPO iteration")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "time_breakdown.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def _latest(rows: list[dict], key) -> list[dict]:
    keep: "OrderedDict[tuple, dict]" = OrderedDict()
    for r in sorted(rows, key=lambda r: r.get("timestamp") or ""):
        keep[key(r)] = r
    return list(keep.values())


def engine_decode_table(rows: list[dict]) -> Table:
    t = Table("engine_decode", "Hybrid-engine decode step vs HF static-cache generate (bf16, steady state)",
              ["card", "model", "prompt+gen", "batch", "system", "GEMM autotune", "ms/step", "floor ms", "MBU",
               "generate s", "x hf-static (step)", "x hf-static (generate)", "commit"])
    steady = [r for r in rows if r.get("bench") == "engine_decode" and r.get("phase") == "steady"
              and r.get("decode_step_ms")]
    latest = _latest(steady, lambda r: (r.get("card"), r["model"], r["batch"], r["system"],
                                        r["system"] == "hybrid" and bool(r.get("autotune_linear")),
                                        r.get("prompt_len"), r.get("gen_len")))
    # an engine row's baseline is the hf-static row of the same command run (same commit and command)
    hf = {(r.get("card"), r["model"], r["batch"], r.get("git_commit"), r.get("command")): r
          for r in latest if r["system"] == "hf-static"}
    for r in sorted(latest, key=lambda r: (str(r.get("card")), r["model"], r["batch"], r["system"],
                                           not r.get("autotune_linear", False))):
        base = hf.get((r.get("card"), r["model"], r["batch"], r.get("git_commit"), r.get("command")))
        mine = r["system"] == "hybrid" and base is not None
        t.rows.append([r.get("card"), r["model"], f"{r.get('prompt_len')}+{r.get('gen_len')}", r["batch"], r["system"],
                       ("on" if r.get("autotune_linear") else "off") if r["system"] == "hybrid" else None,
                       r["decode_step_ms"], r.get("floor_ms"), f"{r['mbu']:.1%}" if r.get("mbu") else None,
                       r.get("generate_s"),
                       base["decode_step_ms"] / r["decode_step_ms"] if mine else None,
                       base["generate_s"] / r["generate_s"] if mine and r.get("generate_s") else None,
                       str(r.get("git_commit") or "")[:7] or None])
        t.sources.append(r)
    t.notes = ["Steady state = the pass after the cold one. floor = (weights + live KV bytes per step) / measured "
               "copy bandwidth; MBU = floor / step time. Ratios only against the hf-static row of the same "
               "command run (same commit, same card).",
               "GEMM autotune: hybrid/ops/linear.py (off = every projection through F.linear)."]
    return t


def kernels_table(rows: list[dict]) -> Table:
    t = Table("kernels", "Kernel microbenchmarks (pytest bench/kernels --benchmark-only), torch reference beside each",
              ["card", "kernel", "model", "shape", "backend", "us", "GB/s", "% copy bw", "TFLOP/s"])
    shape_keys = ("batch", "ctx", "tokens", "seq", "hidden", "ffn", "inter", "vocab", "mode", "splits")

    def shape(r: dict) -> str:
        return " ".join(f"{k}={r[k]}" for k in shape_keys if r.get(k) is not None)

    kern = [r for r in rows if r.get("kind") == "kernel"]
    for r in sorted(_latest(kern, lambda r: (r.get("card"), r["kernel"], r.get("model"), shape(r), r["backend"])),
                    key=lambda r: (str(r.get("card")), r["kernel"], str(r.get("model")), shape(r), r["backend"])):
        t.rows.append([r.get("card"), r["kernel"], r.get("model"), shape(r), r["backend"], r.get("time_us"),
                       r.get("gb_s"), r.get("pct_of_copy_bw"), r.get("tflops")])
        t.sources.append(r)
    t.notes = ["Timings as bench/kernels/conftest.py takes them; % of the card's measured copy bandwidth."]
    return t


# ------------------------------------------------------------------------------ index
def _provenance(sources: list[dict]) -> list[str]:
    seen: "OrderedDict[str, set]" = OrderedDict()
    for r in sources:
        card = f"{r.get('gpu_name')} x{r.get('gpus', 1)}"
        seen.setdefault(r.get("command") or "(no command recorded)", set()).add(
            f"{card}, commit {str(r.get('git_commit'))[:10]}{'+dirty' if r.get('git_dirty') else ''}, {r.get('_file')}")
    out = []
    for cmd, where in seen.items():
        out.append(f"  - `{cmd}` — on {'; '.join(sorted(where))}")
    return out


def build(results: Path, out_dir: Path) -> Path:
    """Write every table and plot for the rows under `results` into `out_dir`; returns README.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in GENERATED:  # what an earlier build wrote; only this module's own file names
        (out_dir / stale).unlink(missing_ok=True)
    rows = read_rows(results) if results.is_dir() else []
    e2e = latest_e2e(rows)
    index = ["# Benchmark reports", "",
             f"Generated by `python -m bench.report` from the rows in `{_rel(results, out_dir)}` only "
             "(a number without a row is not reported). Rows are appended by `python -m bench.e2e` and "
             "`python -m bench.max_model`; each row records its card, software versions, git commit and command.",
             ""]
    if not rows:
        index += ["**No result rows yet.** Nothing has been measured, so there are no tables or plots. "
                  "Run on a GPU machine, for example:", "",
                  "    python -m bench.e2e --model opt-1.3b --critic opt-350m --gpus 1 --system all --batch auto",
                  "    python -m bench.max_model --critic opt-350m",
                  "    python -m bench.report", ""]
    else:
        tables = [throughput_table(e2e), speedup_table(e2e), epoch_table(e2e), phase_table(e2e), max_model_table(rows),
                  engine_decode_table(rows), kernels_table(rows)]
        cards = sorted({f"{r.get('gpu_name')} ({r.get('card')})" for r in rows})
        index += [f"{len(rows)} rows ({len(e2e)} distinct e2e configurations) from "
                  f"{', '.join(sorted({r['_file'] for r in rows}))}; cards: {', '.join(cards)}.", "", "## Tables", ""]
        for t in tables:
            if not t.rows:
                index.append(f"- {t.title}: no rows of this kind yet.")
                continue
            md, csv_path = write_table(t, out_dir)
            index.append(f"- [{t.title}]({md.name}) ([CSV]({csv_path.name})), {len(t.rows)} lines, from:")
            index += _provenance(t.sources)
        plots = make_plots(e2e, out_dir)
        index += ["", "## Plots", ""] + [f"- ![{p.stem}]({p.name}) `{p.name}`" for p in plots]
        if not plots:
            index.append("- none (no ok e2e rows)")
    index += ["", "Regenerate: `python -m bench.report` (reads reports/results/*.jsonl, rewrites this folder's "
              "tables and plots)."]
    readme = out_dir / "README.md"
    readme.write_text("\n".join(index) + "\n", encoding="utf-8")
    return readme


def _rel(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(path, start)
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results-dir", default="reports/results", help="where the *.jsonl rows are")
    p.add_argument("--out-dir", default="reports", help="where tables, plots and README.md go")
    args = p.parse_args(argv)
    readme = build(Path(args.results_dir), Path(args.out_dir))
    print(f"[bench.report] wrote {readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
