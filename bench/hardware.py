"""The cards the benchmarks know: peak bf16 TFLOP/s, HBM bandwidth, default $/GPU-hour.

One table, so every report uses the same assumptions, and a measured copy-bandwidth helper that
the decode bandwidth-utilisation figure (MBU) is divided by.

Peaks are NVIDIA's datasheet figures for dense bf16 tensor-core math (no sparsity) and HBM
bandwidth. Prices are ASSUMPTIONS, not quotes: on-demand list prices per GPU-hour at specialty
GPU clouds as published in 2026 (e.g. mercatus-ai.com "Cloud GPU pricing" May 2026: A100-80G
$1.10-1.50, H100 SXM $2.50-3.50, H200 SXM $3.50-4.50; Lambda / CoreWeave on-demand pages), taking
the upper-middle of each range. Hyperscalers charge 2-4x more (AWS p5.48xlarge $98.32 / 8 =
$12.29 per H100-hour). DeepSpeed-Chat's own cost table used Azure A100-80G at about $4.1 per
GPU-hour ($290 for 9 h on 8 GPUs); pass `--gpu-hour-price 4.1` to compare with it.
"""
from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CardSpec:
    name: str
    """Short name used in reports (H100-SXM, H200, ...)."""
    pattern: str
    """Regex matched (case-insensitively) against torch.cuda.get_device_name()."""
    peak_bf16_tflops: float
    """Dense bf16 tensor-core peak, TFLOP/s (datasheet, no sparsity)."""
    hbm_tb_s: float
    """HBM bandwidth, TB/s (datasheet)."""
    memory_gib: float
    """Device memory, GiB as sold (80, 141, ...)."""
    usd_per_gpu_hour: float
    """Default price for the cost projection (an assumption; see the module docstring)."""


# Order matters: the first pattern that matches wins (PCIe / NVL variants before the SXM default).
CARDS: tuple[CardSpec, ...] = (
    CardSpec("H200", r"H200", 989.0, 4.8, 141.0, 4.00),
    CardSpec("H100-PCIe", r"H100.*PCIe", 756.0, 2.0, 80.0, 2.50),
    CardSpec("H100-NVL", r"H100.*NVL", 835.0, 3.9, 94.0, 3.00),
    CardSpec("H100-SXM", r"H100", 989.0, 3.35, 80.0, 3.00),
    CardSpec("A100-80G", r"A100.*80", 312.0, 2.039, 80.0, 1.50),
    CardSpec("A100-40G", r"A100", 312.0, 1.555, 40.0, 1.20),
    CardSpec("L40S", r"L40S", 362.0, 0.864, 48.0, 1.00),
    CardSpec("A10G", r"A10G", 70.0, 0.6, 24.0, 1.00),
)


def card_spec(device_name: str) -> CardSpec | None:
    """The table entry for a device name as torch reports it, or None (CPU, unknown card)."""
    for spec in CARDS:
        if re.search(spec.pattern, device_name, flags=re.IGNORECASE):
            return spec
    return None


def device_name() -> str:
    """The name of this process's GPU as torch reports it, or 'cpu'.

    Where CUDA is not initialised yet in this process it asks nvidia-smi (same string), so a parent
    process that only launches workers (bench.max_model) does not take GPU memory for a context."""
    return device_info()[0]


def device_info() -> tuple[str, float | None]:
    """(name, total memory GiB) of this process's GPU; ('cpu', None) without one."""
    if not torch.cuda.is_available():
        return "cpu", None
    if not torch.cuda.is_initialized():
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30, check=True)
            name, mib = out.stdout.strip().splitlines()[0].rsplit(",", 1)
            return name.strip(), float(mib) / 1024
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            pass
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return props.name, props.total_memory / 2**30


def default_gpu_hour_price(name: str | None = None) -> float | None:
    """$/GPU-hour from the table for this card (None where the card is not in it, e.g. CPU)."""
    spec = card_spec(name if name is not None else device_name())
    return spec.usd_per_gpu_hour if spec else None


def measure_copy_bandwidth(
    device: str | torch.device | None = None, nbytes: int = 1 << 30, iters: int = 10
) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + bytes written.

    That is the convention of ../shared/device/README.md (4.27 TB/s on an H200), so MBU = bytes
    that must move / time / this number. On CPU it measures memcpy on a smaller buffer.
    """
    dev = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    )
    if dev.type == "cpu":
        nbytes = min(nbytes, 64 << 20)
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=dev).uniform_()  # [n]
    dst = torch.empty_like(src)  # [n]
    dst.copy_(src)  # warm-up: first touch, allocator
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(dev)
        start.record()
        for _ in range(iters):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize(dev)
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        seconds = time.perf_counter() - t0
    del src, dst
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return 2.0 * n * 4 * iters / seconds
