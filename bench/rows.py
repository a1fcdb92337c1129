"""Result rows: one JSON object per run, appended to reports/results/<name>.jsonl.

Reports are built from these rows only (bench/report.py). Every row carries where it was measured
(card, versions, git commit, time, the command line) so a number can always be traced back.

Where rows go: an explicit directory, else $BENCH_RESULTS_DIR, else $OUT/reports/results when OUT
is set (the lent GPU machine returns what is written under $OUT), else reports/results of the
checkout the command runs in.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROW_SCHEMA_VERSION = 1


def results_dir(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit)
    if os.environ.get("BENCH_RESULTS_DIR"):
        return Path(os.environ["BENCH_RESULTS_DIR"])
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "reports" / "results"
    return _repo_root() / "reports" / "results"


def _repo_root() -> Path:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=10, check=True
        )
        return Path(out.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return Path.cwd()


def git_commit() -> tuple[str | None, bool | None]:
    """(HEAD commit, whether tracked files differ from it). Outside a git checkout (the device
    machine gets a copy of the tree without .git) the launcher names the commit in
    HYBRID_RLHF_GIT_COMMIT (and HYBRID_RLHF_GIT_DIRTY=0/1); else (None, None)."""
    env = os.environ.get("HYBRID_RLHF_GIT_COMMIT")
    if env:
        dirty = os.environ.get("HYBRID_RLHF_GIT_DIRTY")
        return env, None if dirty is None else dirty.strip() not in ("", "0", "false")
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        )
        return head.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", None))
    except Exception:  # noqa: BLE001 - a missing or broken package is recorded as None
        return None


def environment() -> dict:
    """Card, software versions, commit, time and command line of this process."""
    import torch

    from bench.hardware import card_spec, device_info

    name, mem = device_info()
    spec = card_spec(name)
    commit, dirty = git_commit()
    return {
        "gpu_name": name,
        "card": spec.name if spec else name,
        "device_memory_gib": mem,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "deepspeed": _version("deepspeed"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": dirty,
        "hostname": socket.gethostname(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": os.environ.get("BENCH_COMMAND")
        or "python -m " + " ".join(shlex.quote(a) for a in [_module_name()] + sys.argv[1:]),
    }


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None and spec.name else os.path.basename(sys.argv[0])


@dataclass
class E2ERow:
    """One measured configuration of `python -m bench.e2e` (one system, one batch)."""

    system: str
    """ours | hf-ddp | hf-static."""
    model: str
    critic: str
    gpus: int
    batch: int
    """Per-GPU generation batch (= training batch: DeepSpeed-Chat's benchmark setting)."""
    prompt_len: int
    gen_len: int
    status: str = "ok"
    """ok | oom (did not fit: no throughput) | error."""
    batch_mode: str = "fixed"
    """fixed (given --batch) | auto-best (largest that fits this system) | auto-equal (min over systems)."""
    warmup: int = 0
    iters: int = 0
    generation_path: str | None = None
    """What generated the answers: hybrid-engine | hf-generate | hf-generate-static."""
    actor_params: int | None = None
    critic_params: int | None = None
    # Phase times, seconds, means over the measured iterations (warm-up excluded).
    time_generation_s: float | None = None
    time_experience_s: float | None = None
    time_training_s: float | None = None
    time_e2e_s: float | None = None
    iter_e2e_s: list = field(default_factory=list)
    """Every measured iteration's e2e time."""
    # Cold phase times: the first warm-up iteration (the first measured one with --warmup 0), reported apart.
    cold_generation_s: float | None = None
    cold_experience_s: float | None = None
    cold_training_s: float | None = None
    cold_e2e_s: float | None = None
    warmup_e2e_s: list = field(default_factory=list)
    samples_per_s: float | None = None
    """Query-answer pairs per second, all GPUs."""
    tokens_per_s_per_gpu: float | None = None
    """(prompt + answer) tokens per second per GPU."""
    gen_tokens_per_s_per_gpu: float | None = None
    """Generated answer tokens per second of generation time, per GPU."""
    tflops_generation: float | None = None
    """Per GPU, DeepSpeed-Chat's accounting over generation + experience time (bench/flops.py)."""
    tflops_training: float | None = None
    tflops_effective: float | None = None
    decode_ms_per_token: float | None = None
    """Generation time / answer length (DeepSpeed-Chat's per-token latency; includes prefill)."""
    decode_bytes: float | None = None
    copy_bandwidth_gb_s: float | None = None
    """Measured device copy bandwidth (read + write) the MBU is divided by."""
    decode_mbu: float | None = None
    peak_memory_gib: float | None = None
    """Max over ranks of torch.cuda.max_memory_allocated during the measured iterations."""
    peak_memory_warmup_gib: float | None = None
    epoch_hours: float | None = None
    """Projected hours for DeepSpeed-Chat's 135.3M-token epoch at this throughput (bench/cost.py)."""
    epoch_gpu_hours: float | None = None
    epoch_usd: float | None = None
    usd_per_gpu_hour: float | None = None
    price_source: str | None = None
    """'--gpu-hour-price' or 'bench/hardware.py table (CARD)'."""
    extra: dict = field(default_factory=dict)
    """System-specific numbers (ZeRO stages, losses, ...)."""
    error: str | None = None
    kind: str = "e2e"
    schema: int = ROW_SCHEMA_VERSION


E2E_REQUIRED = (
    "system", "model", "critic", "gpus", "batch", "prompt_len", "gen_len", "status",
    "time_generation_s", "time_experience_s", "time_training_s", "time_e2e_s", "cold_e2e_s",
    "samples_per_s", "tokens_per_s_per_gpu", "tflops_generation", "tflops_training",
    "tflops_effective", "decode_mbu", "peak_memory_gib", "epoch_hours", "gpu_name", "card",
    "torch", "triton", "deepspeed", "transformers", "git_commit", "timestamp", "command",
)
"""Keys every ok e2e row has (tests check them; the report reads them)."""


def append_row(row: dict | E2ERow, name: str, directory: str | os.PathLike | None = None) -> Path:
    """Append one row (environment added where missing) to <dir>/<name>.jsonl; returns the path."""
    data = asdict(row) if isinstance(row, E2ERow) else dict(row)
    for key, value in environment().items():
        data.setdefault(key, value)
    out_dir = results_dir(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.jsonl"
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(_finite(data), sort_keys=True, allow_nan=False) + "\n")
    return path


def _finite(value):
    """NaN / inf become null, so rows stay strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def read_rows(directory: str | os.PathLike) -> list[dict]:
    """All rows of every *.jsonl under a directory, each with `_file` naming where it came from."""
    rows = []
    for path in sorted(Path(directory).glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not a JSON row ({e})") from e
                row["_file"] = path.name
                rows.append(row)
    return rows
