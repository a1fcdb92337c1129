"""cuBLASLt through ctypes: every algorithm its heuristic offers for one decode GEMM shape.

torch's F.linear runs cuBLAS(Lt)'s first heuristic pick. For the skinny decode GEMMs (M <= 256
rows, 8-200 MB of weight) that pick is tuned for throughput, not for streaming a weight once, and
the heuristic's other candidates (tile shapes, split-K with in-kernel or separate reduction, other
cluster shapes) can be faster on a given card. This module asks cuBLASLt for up to `max_algos`
candidates of y[M, N] = act(x[M, K] @ w[N, K]^T + b) and runs any one of them; hybrid.ops.linear's
autotune times them next to its other variants (variant names "lt0", "lt1", ...).

Same library torch already loaded (found in the process's maps), same math (fp32 accumulation, bias
and ReLU in the epilogue), so results agree with F.linear up to summation order. Calls are
graph-capturable (cublasLtMatmul on the current stream, a fixed workspace per device). Nothing here
is imported on the CPU path: `available()` is False without CUDA.
"""
from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# cublasLt.h / library_types.h constants (CUDA 12 and 13)
_COMPUTE_32F = 68
_R_32F, _R_16F, _R_16BF = 0, 2, 14
_OP_N, _OP_T = 0, 1
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8
_EPI_DEFAULT, _EPI_BIAS, _EPI_RELU_BIAS = 1, 4, 6
_PREF_MAX_WORKSPACE = 1
_CFG_ID, _CFG_TILE, _CFG_SPLITK, _CFG_REDUCTION, _CFG_STAGES, _CFG_CLUSTER = 0, 1, 2, 3, 6, 8
WORKSPACE_BYTES = 32 << 20


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", _Algo), ("workspaceSize", ctypes.c_size_t), ("state", ctypes.c_int),
                ("wavesCount", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


@dataclass(frozen=True)
class AlgoInfo:
    index: int
    algo_id: int
    tile: int
    splitk: int
    reduction: int
    stages: int
    cluster: int
    workspace: int
    waves: float

    def describe(self) -> str:
        return (f"id{self.algo_id}/tile{self.tile}/splitk{self.splitk}/red{self.reduction}/st{self.stages}"
                f"/cl{self.cluster} waves {self.waves:.2f}")


_lib = None
_lib_error: str | None = None
_handles: dict[int, ctypes.c_void_p] = {}
_workspaces: dict[int, torch.Tensor] = {}


def _find_lib() -> str | None:
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if "libcublasLt.so" in line:
                    return line.split()[-1]
    except OSError:
        pass
    return None


def _load():
    global _lib, _lib_error
    if _lib is not None or _lib_error is not None:
        return _lib
    try:
        torch.empty(1, device="cuda") @ torch.empty(1, 1, device="cuda")  # torch loads cuBLAS(Lt)
        path = _find_lib() or "libcublasLt.so"
        lib = ctypes.CDLL(path)
        for fn in ("cublasLtCreate", "cublasLtMatmulDescCreate", "cublasLtMatmulDescSetAttribute",
                   "cublasLtMatrixLayoutCreate", "cublasLtMatmulPreferenceCreate",
                   "cublasLtMatmulPreferenceSetAttribute", "cublasLtMatmulAlgoGetHeuristic", "cublasLtMatmul",
                   "cublasLtMatmulAlgoConfigGetAttribute"):
            getattr(lib, fn).restype = ctypes.c_int
        lib.cublasLtMatrixLayoutCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_uint64,
                                                   ctypes.c_uint64, ctypes.c_int64]
        _lib = lib
        log.info("cuBLASLt loaded from %s", path)
    except Exception as err:  # noqa: BLE001 - no cuBLASLt: the autotune offers no lt variants
        _lib_error = repr(err)
        log.info("cuBLASLt not usable through ctypes: %s", _lib_error)
    return _lib


def available() -> bool:
    return torch.cuda.is_available() and _load() is not None


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLASLt {what} failed with status {status}")


def _handle(device: int) -> ctypes.c_void_p:
    if device not in _handles:
        h = ctypes.c_void_p()
        _check(_lib.cublasLtCreate(ctypes.byref(h)), "create")
        _handles[device] = h
        _workspaces[device] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=f"cuda:{device}")
    return _handles[device]


_DTYPES = {torch.bfloat16: _R_16BF, torch.float16: _R_16F, torch.float32: _R_32F}


class Plan:
    """Descriptors and heuristic candidates of one (m, n, k, dtype, bias, act) GEMM on one device."""

    def __init__(self, m: int, n: int, k: int, dtype: torch.dtype, has_bias: bool, act: str | None,
                 device: int, max_algos: int = 16) -> None:
        if _load() is None:
            raise RuntimeError(f"cuBLASLt is not available: {_lib_error}")
        if dtype not in _DTYPES:
            raise ValueError(f"cuBLASLt plan: unsupported dtype {dtype}")
        if act not in (None, "relu") or (act == "relu" and not has_bias):
            raise ValueError(f"cuBLASLt plan: act {act!r} (bias {has_bias}) is not offered")
        self.key = (m, n, k, dtype, has_bias, act)
        self.device = device
        lib, dt = _lib, _DTYPES[dtype]
        self.handle = _handle(device)
        self.desc = ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F, _R_32F), "desc")
        for attr, val in ((_DESC_TRANSA, _OP_T), (_DESC_TRANSB, _OP_N)):
            v = ctypes.c_int32(val)
            _check(lib.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(v), ctypes.c_size_t(4)), "set trans")
        epi = _EPI_DEFAULT if not has_bias else (_EPI_RELU_BIAS if act == "relu" else _EPI_BIAS)
        v = ctypes.c_uint32(epi)
        _check(lib.cublasLtMatmulDescSetAttribute(self.desc, _DESC_EPILOGUE, ctypes.byref(v), ctypes.c_size_t(4)), "set epilogue")
        # column-major view: D[n, m] = W[k, n]^T @ x[k, m]  (both stored K-contiguous)
        self.a, self.b, self.d = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(self.a), dt, k, n, k), "layout A")
        _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(self.b), dt, k, m, k), "layout B")
        _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(self.d), dt, n, m, n), "layout D")
        pref = ctypes.c_void_p()
        _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference")
        ws = ctypes.c_uint64(WORKSPACE_BYTES)
        _check(lib.cublasLtMatmulPreferenceSetAttribute(pref, _PREF_MAX_WORKSPACE, ctypes.byref(ws), ctypes.c_size_t(8)), "pref ws")
        res = (_Heuristic * max_algos)()
        count = ctypes.c_int(0)
        _check(lib.cublasLtMatmulAlgoGetHeuristic(self.handle, self.desc, self.a, self.b, self.d, self.d, pref,
                                                  max_algos, res, ctypes.byref(count)), "heuristic")
        self.results = [res[i] for i in range(count.value) if res[i].state == 0]
        self.infos = [self._info(i, r) for i, r in enumerate(self.results)]
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    @staticmethod
    def _cfg(algo: _Algo, attr: int) -> int:
        # exact value sizes (cublasLt.h): cluster shape is uint16, the others 32-bit
        v = ctypes.c_uint16(0) if attr == _CFG_CLUSTER else ctypes.c_int32(0)
        written = ctypes.c_size_t(0)
        st = _lib.cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(algo), attr, ctypes.byref(v),
                                                       ctypes.c_size_t(ctypes.sizeof(v)), ctypes.byref(written))
        return int(v.value) if st == 0 else -1

    def _info(self, i: int, r: _Heuristic) -> AlgoInfo:
        c = self._cfg
        return AlgoInfo(index=i, algo_id=c(r.algo, _CFG_ID), tile=c(r.algo, _CFG_TILE), splitk=c(r.algo, _CFG_SPLITK),
                        reduction=c(r.algo, _CFG_REDUCTION), stages=c(r.algo, _CFG_STAGES),
                        cluster=c(r.algo, _CFG_CLUSTER), workspace=int(r.workspaceSize), waves=float(r.wavesCount))

    def run(self, i: int, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        m, n, k, dtype, has_bias, _ = self.key
        if x.shape != (m, k) or w.shape != (n, k) or not (x.is_contiguous() and w.is_contiguous()):
            raise ValueError(f"cuBLASLt plan {self.key}: got x {tuple(x.shape)} w {tuple(w.shape)} "
                             f"(contiguous {x.is_contiguous()}, {w.is_contiguous()})")
        if (b is not None) != has_bias:
            raise ValueError(f"cuBLASLt plan {self.key}: bias given {b is not None}")
        y = torch.empty(m, n, device=x.device, dtype=dtype)
        lib = _lib
        if b is not None:
            ptr = ctypes.c_void_p(b.data_ptr())
            _check(lib.cublasLtMatmulDescSetAttribute(self.desc, _DESC_BIAS_POINTER, ctypes.byref(ptr), ctypes.c_size_t(8)), "bias")
        r = self.results[i]
        stream = ctypes.c_void_p(torch.cuda.current_stream(x.device).cuda_stream)
        ws = _workspaces[self.device]
        _check(lib.cublasLtMatmul(self.handle, self.desc, ctypes.byref(self.alpha), ctypes.c_void_p(w.data_ptr()),
                                  self.a, ctypes.c_void_p(x.data_ptr()), self.b, ctypes.byref(self.beta),
                                  ctypes.c_void_p(y.data_ptr()), self.d, ctypes.c_void_p(y.data_ptr()), self.d,
                                  ctypes.byref(r.algo), ctypes.c_void_p(ws.data_ptr()),
                                  ctypes.c_size_t(WORKSPACE_BYTES), stream), "matmul")
        return y


_plans: dict[tuple, Plan] = {}


def plan(m: int, n: int, k: int, dtype: torch.dtype, has_bias: bool, act: str | None, device: int,
         max_algos: int = 16) -> Plan:
    key = (m, n, k, dtype, has_bias, act, device)
    if key not in _plans:
        _plans[key] = Plan(m, n, k, dtype, has_bias, act, device, max_algos)
    return _plans[key]
