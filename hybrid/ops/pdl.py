"""Programmatic dependent launch (Hopper+) helpers for the Triton kernels.

A kernel launched with PDL (csrc/skinny_gemm.cu with pdl=True) may start its prologue (streaming
its weights) before the previous kernel in the stream has finished, once every program of that
previous kernel has executed `griddepcontrol.launch_dependents` (or exited); it then waits
(`griddepcontrol.wait`) for that kernel's writes before reading its input. The row kernels that
precede the decode GEMMs (norms, split-K reduces, SiLU-and-mul) call launch_dependents first thing
when `trigger(x)` says so: on sm_90+ CUDA tensors with a Triton that has the instruction. For a
next kernel launched without PDL the instruction does nothing.
"""
from __future__ import annotations

import torch

try:  # Triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents  # noqa: F401 - used inside @triton.jit
    AVAILABLE = True
except ImportError:  # pragma: no cover - older Triton: never traced (the constexpr stays False)
    gdc_launch_dependents = None
    AVAILABLE = False

_cap: dict[int, bool] = {}


def trigger(t: torch.Tensor) -> bool:
    """True where a kernel over t should execute griddepcontrol.launch_dependents (sm_90+ CUDA)."""
    if not AVAILABLE or not t.is_cuda:
        return False
    i = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if i not in _cap:
        _cap[i] = torch.cuda.get_device_capability(i)[0] >= 9
    return _cap[i]
