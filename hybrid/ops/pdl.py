"""Programmatic dependent launch (Hopper+) helpers for the Triton kernels.

Two uses:
- trigger: a kernel that calls `griddepcontrol.launch_dependents` lets a PDL-launched kernel after
  it (csrc/skinny_gemm.cu with pdl=True) start its prologue before this one ends. The row kernels
  that precede the decode GEMMs (norms, split-K reduces) do it first thing when `trigger(x)` says
  so: on sm_90+ CUDA tensors with a Triton that has the instruction. For a next kernel launched
  without PDL the instruction does nothing.
- launch: with `set_launch(True)` (EngineConfig.pdl_launch), the decode step's Triton kernels are
  themselves launched with PDL (`launch(x)` gives the launch keywords): each becomes resident while
  the kernel before it drains, and its first instructions are `launch_dependents` then
  `griddepcontrol.wait` (`prologue()`), so it touches no memory before the previous kernel's writes
  are visible. Everything a PDL kernel reads or writes is behind that wait, so the stream order the
  caching allocator and every other op rely on holds. Read at trace time: CUDA graphs keep the
  launch attributes they were captured with.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    AVAILABLE = True
except ImportError:  # pragma: no cover - older Triton: never traced (the constexprs stay False)
    gdc_launch_dependents = gdc_wait = None
    AVAILABLE = False

try:  # the launcher option (Triton >= 3.3 on NVIDIA)
    from triton.backends.nvidia.compiler import CUDAOptions
    LAUNCH_AVAILABLE = AVAILABLE and "launch_pdl" in CUDAOptions.__dataclass_fields__
except ImportError:  # pragma: no cover
    LAUNCH_AVAILABLE = False

_cap: dict[int, bool] = {}
_launch = False


def trigger(t: torch.Tensor) -> bool:
    """True where a kernel over t should execute griddepcontrol.launch_dependents (sm_90+ CUDA)."""
    if not AVAILABLE or not t.is_cuda:
        return False
    i = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if i not in _cap:
        _cap[i] = torch.cuda.get_device_capability(i)[0] >= 9
    return _cap[i]


def set_launch(on: bool) -> None:
    """Launch the decode-path Triton kernels with PDL from now on (where trigger() holds)."""
    global _launch
    _launch = bool(on)


def launch_enabled() -> bool:
    return _launch and LAUNCH_AVAILABLE


def launch(t: torch.Tensor) -> dict:
    """Keywords for a kernel launch over t: {"PDL": True, "launch_pdl": True} when PDL launches
    are on and usable for t, else {} (the kernel's PDL constexpr defaults to False)."""
    if _launch and LAUNCH_AVAILABLE and trigger(t):
        return {"PDL": True, "launch_pdl": True}
    return {}


@triton.jit
def prologue():
    """First thing in a PDL-launched kernel: let the next one launch, then wait for the previous."""
    gdc_launch_dependents()
    gdc_wait()
