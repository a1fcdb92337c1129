"""The CUDA backend on a machine without a GPU: the loader says "unavailable" without raising, and
(slow) csrc/ compiles here: every kernel for sm_90 with nvcc, with no register spills and 16-byte
KV loads in the SASS, and the torch host code (ops.cpp, bindings.cpp) against this torch's headers.
Nothing runs on a GPU here; the device tests are tests/gpu/test_cuda_ext.py.
"""
import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from hybrid.ops import cuda_backend as cb
from hybrid.ops import cuda_skinny as cs
from hybrid.ops import cuda_mlp as cm
from hybrid.ops.testing import find_cuobjdump

NVCC = shutil.which("nvcc")
KERNEL_FILES = ["paged_attention_bf16.cu", "paged_attention_fp16.cu", "paged_attention_fp32.cu",
                "paged_attention.cu", "cache_kernels.cu", "skinny_gemm.cu", "l2_prefetch.cu",
                "decode_mlp.cu", "decode_mlp_bf16.cu", "decode_mlp_fp16.cu", "decode_mlp_accumulate.cu",
                "decode_mlp_cluster.cu",
                "skinny_wgmma.cu", "skinny_streamk.cu"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_unavailable_without_cuda_never_raises():
    assert cb.available() is False
    assert cb.load() is False  # cached failure, still no exception
    assert "CUDA" in (cb.load_error() or ""), cb.load_error()
    q = torch.randn(2, 4, 64)
    with pytest.raises(RuntimeError, match="unavailable"):
        cb.paged_decode_attention(q, q, q, q.int(), q.int(), 0.125)
    with pytest.raises(RuntimeError, match="unavailable"):
        cb.write_kv_cache(q, q, q, q, q.long())
    with pytest.raises(RuntimeError, match="unavailable"):
        cb.paged_decode_attention_append(q, q, q, q, q, q[:, 0, 0].long(), q.int(), q.int(), 0.125)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="unavailable"):
        cs.skinny_gemm(x, x, None, False)
    assert "CUDA" in cs.skinny_gemm_unsupported(x, x)
    assert cs.skinny_gemm_selfcheck("cpu") is not None
    with pytest.raises(RuntimeError, match="unavailable"):
        cm.decode_mlp(x, x, None, x)
    assert cm.decode_mlp_selfcheck("cpu") is not None
    with pytest.raises(RuntimeError, match="unavailable"):
        cm.decode_mlp_norm(x, x, None, x, None, None, x[0], None, 1e-5)


class _FakeCuda:
    """A meta tensor that says it is on CUDA (is_cuda / device / data_ptr are all the checks read
    besides shapes, strides and dtypes)."""

    def __init__(self, t, ptr=0):
        self.t, self.ptr = t, ptr

    def __getattr__(self, name):
        return getattr(self.t, name)

    is_cuda = True

    def data_ptr(self):
        return self.ptr

    @property
    def device(self):
        return torch.device("cuda", 0)


def test_persistent_zeros_made_once_and_never_inside_a_capture(monkeypatch):
    """The kernels' counters / sums (cuda_skinny, cuda_streamk, cuda_mlp): zeroed on first use, the
    same tensor afterwards, and an error instead of a graph-pool tensor inside a capture."""
    cache: dict = {}
    t = cb.persistent_zeros(cache, "k", (3, 2), torch.int32, torch.device("cpu"), "the test's counter")
    assert t.shape == (3, 2) and t.dtype == torch.int32 and not t.any()
    t += 1
    assert cb.persistent_zeros(cache, "k", (3, 2), torch.int32, torch.device("cpu"), "x") is t
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="the test's counter must be created outside CUDA-graph capture"):
        cb.persistent_zeros(cache, "other", (1,), torch.int32, torch.device("cpu"), "the test's counter")
    assert cb.persistent_zeros(cache, "k", (3, 2), torch.int32, torch.device("cpu"), "x") is t  # existing: fine


def test_skinny_gemm_unsupported_mirrors_ops_cpp():
    """The Python-side checks (csrc/ops.cpp skinny_gemm's TORCH_CHECKs) on meta tensors: no GPU
    needed, and none of these may ever reach the op."""
    def t(*shape, dtype=torch.bfloat16, ptr=0):
        return _FakeCuda(torch.empty(*shape, dtype=dtype, device="meta"), ptr)

    ok = cs.skinny_gemm_unsupported
    assert ok(t(16, 2048), t(6144, 2048), t(6144)) is None
    assert ok(t(64, 8192), t(2048, 8192)) is None
    assert ok(t(1, 64), t(64, 64), t(64), k_splits=8) is None
    assert "M <=" in ok(t(65, 2048), t(6144, 2048))
    assert "M <=" in ok(_FakeCuda(torch.empty(0, 2048, dtype=torch.bfloat16, device="meta")), t(6144, 2048))
    assert "N %" in ok(t(16, 2048), t(6100, 2048))
    assert "K %" in ok(t(16, 2016), t(6144, 2016))
    assert "differ" in ok(t(16, 2048), t(6144, 1024)) or "[M, K]" in ok(t(16, 2048), t(6144, 1024))
    assert "bfloat16 or float16" in ok(t(16, 2048, dtype=torch.float32), t(6144, 2048, dtype=torch.float32))
    assert "bfloat16 or float16" in ok(t(16, 2048), t(6144, 2048, dtype=torch.float16))
    assert "aligned" in ok(t(16, 2048, ptr=8), t(6144, 2048))
    assert "bias" in ok(t(16, 2048), t(6144, 2048), t(6143))
    assert "bias" in ok(t(16, 2048), t(6144, 2048), t(6144, dtype=torch.float16))
    assert "bias" in ok(t(16, 2048), t(6144, 2048), t(6144, ptr=2))
    assert "k_splits" in ok(t(16, 2048), t(6144, 2048), k_splits=9)
    strided = _FakeCuda(torch.empty(2048, 16, dtype=torch.bfloat16, device="meta").t())
    assert "contiguous" in ok(strided, t(6144, 2048))


def test_skinny_gemm_norm_unsupported_mirrors_ops_cpp():
    def t(*shape, dtype=torch.bfloat16, ptr=0):
        return _FakeCuda(torch.empty(*shape, dtype=dtype, device="meta"), ptr)

    ok = cs.skinny_gemm_norm_unsupported
    assert ok(t(16, 2048), t(2048, 2048), t(2048), t(16, 2048), t(2048), t(2048)) is None
    assert ok(t(64, 11008), t(4096, 11008), None, None, t(4096), None) is None  # RMSNorm, no residual
    assert "M <=" in ok(t(65, 2048), t(2048, 2048), None, None, t(2048), None)
    assert "N <= 4096" in ok(t(16, 2048), t(4160, 2048), None, None, t(4160), None)
    assert "norm_w is required" in ok(t(16, 2048), t(2048, 2048), None, None, None, None)
    assert "norm_w" in ok(t(16, 2048), t(2048, 2048), None, None, t(2048, ptr=8), None)  # 16-byte aligned
    assert "norm_b" in ok(t(16, 2048), t(2048, 2048), None, None, t(2048), t(1024))
    assert "residual" in ok(t(16, 2048), t(2048, 2048), None, t(16, 1024), t(2048), None)
    strided = _FakeCuda(torch.empty(16, 4096, dtype=torch.bfloat16, device="meta")[:, :2048])
    assert "residual" in ok(t(16, 2048), t(2048, 2048), None, strided, t(2048), None)
    assert "bias" in ok(t(16, 2048), t(2048, 2048), t(2047), None, t(2048), None)


def test_decode_mlp_unsupported_mirrors_ops_cpp():
    """The Python-side checks of csrc/ops.cpp decode_mlp on meta tensors: none may reach the op."""
    def t(*shape, dtype=torch.bfloat16, ptr=0):
        return _FakeCuda(torch.empty(*shape, dtype=dtype, device="meta"), ptr)

    ok = cm.decode_mlp_unsupported
    assert ok(t(16, 2048), t(8192, 2048), t(8192), t(2048, 8192)) is None
    assert ok(t(64, 1024), t(4096, 1024), None, t(1024, 4096), k_splits=16) is None
    assert "M <=" in ok(t(65, 2048), t(8192, 2048), None, t(2048, 8192))
    assert "multiples of 64" in ok(t(4, 2016), t(8192, 2016), None, t(2016, 8192))
    assert "multiples of 64" in ok(t(4, 2048), t(8032, 2048), None, t(2048, 8032))
    assert "w2 [2048, ffn]" in ok(t(4, 2048), t(8192, 2048), None, t(8192, 2048))
    assert "bfloat16 or float16" in ok(t(4, 64, dtype=torch.float32), t(128, 64, dtype=torch.float32), None,
                                       t(64, 128, dtype=torch.float32))
    assert "aligned" in ok(t(4, 64, ptr=8), t(128, 64), None, t(64, 128))
    assert "b1" in ok(t(4, 64), t(128, 64), t(64), t(64, 128))
    assert "b1" in ok(t(4, 64), t(128, 64), t(128, ptr=2), t(64, 128))
    assert "k_splits" in ok(t(4, 64), t(128, 64), None, t(64, 128), k_splits=3)  # ffn 128 = 2 blocks
    assert "CUDA" in ok(torch.empty(4, 64), torch.empty(128, 64), None, torch.empty(64, 128))
    okn = cm.decode_mlp_norm_unsupported
    base = (t(16, 2048), t(8192, 2048), t(8192), t(2048, 8192))
    assert okn(*base, t(2048), t(16, 2048), t(2048), t(2048)) is None
    assert okn(*base, None, None, t(2048), None) is None  # no bias, no residual, RMSNorm
    assert "M <=" in okn(t(65, 2048), *base[1:], None, None, t(2048), None)  # decode_mlp's checks first
    assert "norm_w is required" in okn(*base, None, None, None, None)
    assert "norm_b" in okn(*base, None, None, t(2048), t(1024))
    assert "b2" in okn(*base, t(2048, ptr=2), None, t(2048), None)
    assert "residual" in okn(*base, None, t(16, 4096), t(2048), None)
    strided = _FakeCuda(torch.empty(16, 4096, dtype=torch.bfloat16, device="meta")[:, :2048])
    assert okn(*base, None, strided, t(2048), None) is None  # a row-strided view is fine
    assert "hidden <=" in okn(t(4, 16448), t(64, 16448), None, t(16448, 64), None, None, t(16448), None)


def test_decode_mlp_cluster_unsupported_and_cluster_size():
    """The cluster schedule's Python-side checks (csrc/ops.cpp decode_mlp_cluster) and its default
    cluster size; _cluster_smem is decode_mlp_cluster.cu's ClusterCfg::smem."""
    def t(*shape, dtype=torch.bfloat16, ptr=0):
        return _FakeCuda(torch.empty(*shape, dtype=dtype, device="meta"), ptr)

    ok = cm.decode_mlp_cluster_unsupported
    opt13 = (t(8192, 2048), t(8192), t(2048, 8192))
    assert ok(t(16, 2048), *opt13, 8) is None
    assert ok(t(32, 2048), *opt13, 8) is None
    assert ok(t(16, 2048), *opt13, 16) is None  # 8 partials
    assert "M <= 32" in ok(t(33, 2048), *opt13, 8)
    assert "cluster must be" in ok(t(16, 2048), *opt13, 3)
    assert "shared memory" in ok(t(32, 2048), *opt13, 16)  # 5 stages + 64 KB of act do not fit
    assert "multiples of 64 x cluster" in ok(t(4, 192), t(704, 192), None, t(192, 704), 2)
    assert "partials" in ok(t(4, 256), t(4096, 256), None, t(256, 4096), 2)  # 32 K slices
    assert "M <=" in ok(t(65, 2048), *opt13, 8)  # decode_mlp's checks first
    assert cm.cluster_size_for(16, 2048, 8192) == 8
    assert cm.cluster_size_for(16, 2048, 8192, largest=16) == 16
    assert cm.cluster_size_for(32, 2048, 8192, largest=16) == 8
    assert cm.cluster_size_for(16, 128, 256) == 2  # the tiny test model
    assert cm.cluster_size_for(16, 192, 704) == 0
    assert cm.cluster_size_for(33, 2048, 8192) == 0
    assert cm._cluster_smem(16, 8) == 6 * (16384 + 4096) + 8 * 16 * 72 * 4 + 4 * 4096
    assert cm._cluster_smem(32, 8) <= 227 * 1024 < cm._cluster_smem(32, 16)


def test_append_unsupported_mirrors_ops_cpp():
    """cuda_backend.append_unsupported = ops.cpp paged_decode_attention_append's TORCH_CHECKs
    (the decode checks plus key / value / slot_mapping), on meta tensors."""
    def t(*shape, dtype=torch.bfloat16, ptr=0):
        return _FakeCuda(torch.empty(*shape, dtype=dtype, device="meta"), ptr)

    def args(b=4, h=32, hkv=8, d=128, **over):
        a = dict(query=t(b, h, d), key=t(b, hkv, d), value=t(b, hkv, d), key_cache=t(64, 16, hkv, d),
                 value_cache=t(64, 16, hkv, d), slot_mapping=t(b, dtype=torch.int64),
                 block_tables=t(b, 8, dtype=torch.int32), seq_lens=t(b, dtype=torch.int32))
        a.update(over)
        return a

    ok = cb.append_unsupported
    assert ok(**args()) is None
    assert ok(**args(h=32, hkv=32, d=64)) is None  # OPT-1.3B
    qkv = torch.empty(4, 48 * 128, dtype=torch.bfloat16, device="meta")  # k / v as views of a fused row
    k_view = _FakeCuda(qkv[:, 32 * 128:40 * 128].view(4, 8, 128))
    assert ok(**args(key=k_view, value=k_view)) is None
    assert "head_size" in ok(**args(d=16))  # no kernel (the decode checks come first)
    assert "key/value" in ok(**args(key=t(3, 8, 128)))
    assert "key/value" in ok(**args(value=t(4, 8, 64)))
    assert "does not hold" in ok(**args(key=t(4, 4, 128), value=t(4, 4, 128)))
    half = t(4, 8, 128, dtype=torch.float16)
    assert "share a dtype" in ok(**args(key=half, value=half))
    assert "slot_mapping" in ok(**args(slot_mapping=t(4, dtype=torch.int32)))
    assert "slot_mapping" in ok(**args(slot_mapping=t(5, dtype=torch.int64)))
    strided = _FakeCuda(torch.empty(4, 2, dtype=torch.int64, device="meta")[:, 0])
    assert "slot_mapping" in ok(**args(slot_mapping=strided))
    assert "seq_lens" in ok(**args(seq_lens=t(4, dtype=torch.int64)))
    assert "aligned" in ok(**args(key_cache=t(64, 16, 8, 128, ptr=8)))
    assert "heads_per_cta" in ok(**args(), heads_per_cta=3)
    cpu_key = torch.empty(4, 8, 128, dtype=torch.bfloat16)
    assert "CUDA" in ok(**args(key=cpu_key))


def test_sources_are_what_setup_py_builds():
    """The JIT build compiles the same csrc/*.cu + *.cpp set as setup.py's hybrid._C."""
    names = {p.name for p in cb.sources()}
    on_disk = {p.name for p in cb.CSRC_DIR.iterdir() if p.suffix in (".cu", ".cpp")}
    assert names == on_disk
    assert {"bindings.cpp", "ops.cpp", *KERNEL_FILES} <= names
    setup_py = (cb.CSRC_DIR.parent / "setup.py").read_text()
    assert 'endswith((".cu", ".cpp"))' in setup_py and '"hybrid._C"' in setup_py


def test_extra_nvcc_flags_build_apart(monkeypatch, tmp_path):
    """HYBRID_NVCC_EXTRA reaches nvcc and gets a build directory of its own per flag set."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("HYBRID_NVCC_EXTRA", raising=False)
    assert cb.extra_nvcc_flags() == []
    default = cb.build_directory()
    monkeypatch.setenv("HYBRID_NVCC_EXTRA", " -DHYBRID_MLP_STAGES_M16=4  -lineinfo ")
    assert cb.extra_nvcc_flags() == ["-DHYBRID_MLP_STAGES_M16=4", "-lineinfo"]
    four = cb.build_directory()
    monkeypatch.setenv("HYBRID_NVCC_EXTRA", "-DHYBRID_MLP_STAGES_M16=6")
    six = cb.build_directory()
    assert len({default, four, six}) == 3 and all(Path(d).is_dir() for d in (default, four, six))
    assert Path(four).name.startswith(Path(default).name + "_x")


def _nvcc_cmd(src: Path, obj: Path) -> list[str]:
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # the -D__CUDA_NO_HALF_* torch adds

    return [NVCC, *COMMON_NVCC_FLAGS, *cb.NVCC_FLAGS, "-std=c++17",
            "-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-v", "-c", str(src), "-o", str(obj)]


def _sm90a_build(name: str, kernel: str, tmp_path) -> tuple[list[int], list[str] | None]:
    """csrc/<name> built for sm_90a with HYBRID_SM90A (what the JIT build does on H100 / H200), no
    warnings and no spills: the registers of each instantiation of `kernel`, and the SASS body of
    each function (None without cuobjdump)."""
    obj = tmp_path / (name + ".o")
    cmd = _nvcc_cmd(cb.CSRC_DIR / name, obj)
    cmd[cmd.index("-gencode=arch=compute_90,code=sm_90")] = "-gencode=arch=compute_90a,code=sm_90a"
    res = subprocess.run([*cmd, "-DHYBRID_SM90A=1"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "warning" not in res.stderr.lower(), res.stderr[-4000:]
    regs = [int(r) for r in re.findall(kernel + r".*?\n.*?\n.*?Used (\d+) registers", res.stderr)]
    assert all(s == ("0", "0") for s in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr))
    dump = find_cuobjdump()
    if dump is None:
        return regs, None
    sass = subprocess.run([dump, "-sass", str(obj)], capture_output=True, text=True, timeout=300)
    assert sass.returncode == 0, sass.stderr
    return regs, re.split(r"\n\s*Function : ", sass.stdout)[1:]


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_wgmma_skinny_gemm_compiles_for_sm90a(tmp_path):
    """csrc/skinny_wgmma.cu for sm_90a: both dtypes in at most 128 registers (2 CTAs of 256 threads
    per SM) without spills; the SASS multiplies with HGMMA 64x64x16 from shared-memory descriptors
    (4 per stage and warpgroup), makes the cp.async writes visible to the async proxy first, and has
    no ldmatrix. (Built for plain sm_90, as the test below does, the kernel is a trap the launcher
    never reaches.)"""
    regs, bodies = _sm90a_build("skinny_wgmma.cu", "skinny_wgmma_kernel", tmp_path)
    assert len(regs) == 2 and max(regs) <= 128, regs
    for body in bodies or []:
        head = body.split("\n", 1)[0]
        assert len(re.findall(r"HGMMA\.64x64x16\.F32", body)) == 4, head
        assert "FENCE.VIEW.ASYNC.S" in body and "WARPGROUP.DEPBAR" in body, head
        assert "LDSM" not in body and not re.search(r"\b(LDL|STL)\b", body), head


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_streamk_gemm_compiles_for_sm90a(tmp_path):
    """csrc/skinny_streamk.cu for sm_90a: both dtypes without spills, in at most 168 registers (a
    288-thread CTA is given registers as 12 warps); the SASS loads by TMA (2-D tensor boxes), waits
    on mbarriers, multiplies with 4 HGMMA 64x64x16 per unit from shared-memory descriptors, and has
    no ldmatrix or local memory."""
    regs, bodies = _sm90a_build("skinny_streamk.cu", "skinny_streamk_kernel", tmp_path)
    assert len(regs) == 2 and max(regs) <= 168, regs
    if bodies is None:
        return
    assert len(bodies) == 2
    for body in bodies:
        head = body.split("\n", 1)[0]
        assert len(re.findall(r"HGMMA\.64x64x16\.F32", body)) == 4, head
        assert "UTMALDG.2D" in body and "SYNCS.PHASECHK.TRANS64" in body, head
        assert "LDSM" not in body and not re.search(r"\b(LDL|STL)\b", body), head


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_kernels_compile_for_sm90_without_spills(tmp_path):
    def build(name):
        obj = tmp_path / (name + ".o")
        res = subprocess.run(_nvcc_cmd(cb.CSRC_DIR / name, obj), capture_output=True, text=True,
                             timeout=600)
        return name, obj, res

    with ThreadPoolExecutor(max_workers=max(1, min(len(KERNEL_FILES), os.cpu_count() or 1))) as ex:
        results = list(ex.map(build, KERNEL_FILES))
    for name, obj, res in results:
        assert res.returncode == 0, f"nvcc {name} failed:\n{res.stderr[-4000:]}"
        assert "warning" not in res.stderr.lower(), res.stderr[-4000:]
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr)
        # the dispatch TUs hold no kernel
        assert spills or name in ("paged_attention.cu", "decode_mlp.cu"), f"no ptxas report for {name}"
        assert all(s == ("0", "0") for s in spills), f"{name}: register spills {spills}"
    skinny = next(r for r in results if r[0] == "skinny_gemm.cu")
    # plain and block-end (kNorm) builds, each bf16/fp16 x 1..4 m16 tiles
    assert skinny[2].stderr.count("skinny_gemm_kernel") >= 2 * 16, "16 kernels: 2 builds x bf16/fp16 x 1..4 tiles"
    regs = [int(r) for r in re.findall(r"skinny_gemm_kernel.*?\n.*?\n.*?Used (\d+) registers", skinny[2].stderr)]
    assert len(regs) == 16 and max(regs) <= 128, f"skinny v2 needs <= 128 registers for 2 CTAs/SM: {regs}"
    # decode_mlp_kernel without and with phase 3, each x 1..4 m16 tiles, in one TU per dtype (built
    # in parallel); the accumulate kernel (the same 8) in a TU of its own
    mlp_tus = [r for r in results if r[0] in ("decode_mlp_bf16.cu", "decode_mlp_fp16.cu")]
    mlp_log = "".join(r[2].stderr for r in mlp_tus)
    for name, _, res in mlp_tus:
        assert res.stderr.count("Compiling entry function") == 8, f"{name}: 8 kernels: 2 builds x 1..4 tiles"
    assert next(r for r in results if r[0] == "decode_mlp.cu")[2].stderr.count("Compiling entry function") == 0
    acc = next(r for r in results if r[0] == "decode_mlp_accumulate.cu")
    assert acc[2].stderr.count("Compiling entry function") == 8, "the accumulate kernel, 8 instantiations"
    assert acc[2].stderr.count("decode_mlp_accumulate_kernel") >= 8
    clu = next(r for r in results if r[0] == "decode_mlp_cluster.cu")
    assert clu[2].stderr.count("decode_mlp_cluster_kernel") >= 4, "the cluster kernel: bf16/fp16 x 1..2 m16 tiles"
    entries = [c for c in mlp_log.split("Compiling entry function")[1:] if "decode_mlp_kernel" in c.split("\n")[0]]
    plain = [int(re.search(r"Used (\d+) registers", c).group(1)) for c in entries
             if re.search(r"Lb0EEEvNS_15DecodeMlpParams", c.split("\n")[0])]  # kNorm = false
    assert len(plain) == 8 and all(r <= 200 for r in plain), (
        f"the kernels without phase 3 keep their registers (the row code is in the kNorm build only): {plain}")
    split_kernels = [r for r in results if r[0].startswith("paged_attention_")]
    for name, _, res in split_kernels:  # 23 (head_size, heads_per_cta) kernels per dtype, x2: append
        assert res.stderr.count("paged_decode_split_kernel") >= 2 * 2 * 20, name
        # the append variant (template flag true, mangled Lb1E) exists for every configuration
        entry = r"Compiling entry function '_ZN6hybrid25paged_decode_split_kernel\w*"
        plain = len(re.findall(entry + "Lb0E", res.stderr))
        fused = len(re.findall(entry + "Lb1E", res.stderr))
        assert plain == fused >= 20, (name, plain, fused)

    dump = find_cuobjdump()
    if dump is None:
        return
    for name, obj, _ in split_kernels:
        sass = subprocess.run([dump, "-sass", str(obj)], capture_output=True, text=True, timeout=300)
        assert sass.returncode == 0, sass.stderr
        funcs = re.split(r"\n\s*Function : ", sass.stdout)[1:]
        decode = [f for f in funcs if "paged_decode_split_kernel" in f.split("\n", 1)[0]]
        assert len(decode) >= 2 * 20, name
        for body in decode:  # K/V (and q) come in 16-byte vectors, and nothing goes to local memory
            head = body.split("\n", 1)[0]
            assert "LDG.E.128" in body, f"{name}: no 16-byte loads in {head}"
            assert not re.search(r"\b(LDL|STL)\b", body), f"{name}: local memory in {head}"
    sass = subprocess.run([dump, "-sass", str(skinny[1])], capture_output=True, text=True, timeout=300)
    assert sass.returncode == 0, sass.stderr
    funcs = [f for f in re.split(r"\n\s*Function : ", sass.stdout)[1:] if "skinny_gemm_kernel" in f.split("\n", 1)[0]]
    assert len(funcs) == 16
    for body in funcs:  # v2: W and x through 16-byte L1-bypassing cp.async into shared memory,
        head = body.split("\n", 1)[0]  # ldmatrix into tensor cores, no local memory, no shared atomics
        assert re.search(r"LDGSTS\.E\.BYPASS\.[A-Z0-9.]*128", body), f"no 16-byte cp.async.cg in {head}"
        assert "LDGDEPBAR" in body and "DEPBAR" in body, f"no cp.async commit / wait in {head}"
        assert "LDSM.16.M88.4" in body, f"no ldmatrix.x4 in {head}"
        assert "HMMA.16816.F32" in body, head
        # no per-lane 16-byte register loads of W (v1's path); the only LDGs left are 4-byte bias pairs
        assert not re.search(r"\bLDG\.E[A-Z0-9.]*\.128\b", body), f"16-byte register loads in {head}"
        assert not re.search(r"\b(LDL|STL|ATOMS)\b", body), f"local memory or shared atomics in {head}"
        if "Lb1EEEvNS_16SkinnyGemmParams" in head:  # the block end: one arrival atomic, no polling loop
            assert re.search(r"\bATOMG\.E\.ADD", body), f"no arrival atomic in {head}"
    funcs = []
    for _, obj, _ in mlp_tus:
        sass = subprocess.run([dump, "-sass", str(obj)], capture_output=True, text=True, timeout=300)
        assert sass.returncode == 0, sass.stderr
        funcs += [f for f in re.split(r"\n\s*Function : ", sass.stdout)[1:] if "decode_mlp_kernel" in f.split("\n", 1)[0]]
    assert len(funcs) == 16
    for body in funcs:  # the skinny core (cp.async ring, ldmatrix, mma) + the grid barrier's atomics
        head = body.split("\n", 1)[0]
        assert re.search(r"LDGSTS\.E\.BYPASS\.[A-Z0-9.]*128", body), f"no 16-byte cp.async.cg in {head}"
        assert "LDSM.16.M88.4" in body and "HMMA.16816.F32" in body, head
        assert re.search(r"\bATOMG?\.E\.ADD|\bRED\.E\.ADD|\bATOMG\.E\.EXCH", body), f"no barrier atomics in {head}"
        assert not re.search(r"\b(LDL|STL)\b", body), f"local memory in {head}"


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_host_code_compiles_against_torch_headers(tmp_path):
    """ops.cpp / bindings.cpp with g++ -fsyntax-only (no CUDA torch here to link against)."""
    from torch.utils.cpp_extension import include_paths

    torch_inc = include_paths()
    if not any((Path(p) / "c10" / "cuda" / "CUDAStream.h").exists() for p in torch_inc):
        pytest.skip("this torch ships no c10/cuda headers")
    # CPU wheels lack the generated cmake header c10/cuda/CUDAMacros.h includes; a CUDA build has it.
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", str(Path(NVCC).resolve().parent.parent)]
    cuda_inc = next((Path(h) / "include" for h in homes
                     if h and (Path(h) / "include" / "cuda_runtime.h").exists()), None)
    if cuda_inc is None:
        pytest.skip("CUDA headers (cuda_runtime.h) not found")
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    std = "-std=c++20" if torch.__version__ >= "2.10" else "-std=c++17"
    base = [cxx, std, "-fsyntax-only", "-DTORCH_EXTENSION_NAME=hybrid_C",
            "-DTORCH_API_INCLUDE_EXTENSION_H", *[f"-I{p}" for p in torch_inc],
            f"-I{tmp_path / 'stub'}", f"-I{cuda_inc}", f"-I{sysconfig.get_paths()['include']}"]

    def check(name):
        return name, subprocess.run(base + [str(cb.CSRC_DIR / name)], capture_output=True,
                                    text=True, timeout=600)

    with ThreadPoolExecutor(max_workers=2) as ex:
        for name, res in ex.map(check, ["ops.cpp", "bindings.cpp"]):
            assert res.returncode == 0, f"{name}:\n{res.stderr[-4000:]}"
            ours = [ln for ln in res.stderr.splitlines()
                    if "warning" in ln and str(cb.CSRC_DIR) in ln]
            assert not ours, "\n".join(ours)


def test_selfcheck_bodies_pass_a_correct_kernel_and_catch_a_wrong_one(monkeypatch):
    """The self-checks' comparisons, run on CPU against torch stand-ins for the CUDA ops: a
    correct stand-in passes, one wrong by a little fails with the shape it failed at."""
    import torch.nn.functional as F

    def skinny(x, w, b, relu, k_splits=0):
        y = F.linear(x.float(), w.float(), None if b is None else b.float())
        return (y.relu() if relu else y).to(x.dtype)

    def mlp(x, w1, b1, w2, relu=True, k_splits=0, flow=False):
        h = F.linear(x.float(), w1.float(), None if b1 is None else b1.float())
        act = (h.relu() if relu else h).to(x.dtype).float()
        s = k_splits or 2
        return torch.stack([act[:, i::s] @ w2.float()[:, i::s].t() for i in range(s)])

    def mlp_norm(x, w1, b1, w2, b2, res, nw, nb, eps, relu=True, k_splits=0):
        h = (mlp(x, w1, b1, w2, relu, k_splits).sum(0) + b2.float()).to(x.dtype).float() + res.float()
        r = h.to(x.dtype).float()
        if nb is None:
            out = (r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype).float() * nw.float()
        else:
            out = F.layer_norm(r, (r.shape[-1],), nw.float(), nb.float(), eps)
        return out.to(x.dtype), r.to(x.dtype)

    def accumulate(x, w1, b1, w2t, part, relu=True, **_):
        h = F.linear(x.float(), w1.float(), None if b1 is None else b1.float())
        part += (h.relu() if relu else h).to(x.dtype).float() @ w2t.float()
        return part

    cpu, gen = torch.device("cpu"), lambda: torch.Generator().manual_seed(0)
    monkeypatch.setattr(cs, "skinny_gemm", skinny)
    monkeypatch.setattr(cm, "decode_mlp", mlp)
    monkeypatch.setattr(cm, "decode_mlp_norm", mlp_norm)
    monkeypatch.setattr(cm, "decode_mlp_accumulate", accumulate)
    assert cs._check_skinny(cpu, torch.bfloat16, gen()) is None
    assert cm._check_mlp(cpu, torch.bfloat16, gen()) is None
    monkeypatch.setattr(cs, "skinny_gemm", lambda *a, **k: skinny(*a, **k) * 1.05)
    assert "M=1 k_splits=0 bias=False: max error" in cs._check_skinny(cpu, torch.bfloat16, gen())
    monkeypatch.setattr(cm, "decode_mlp_norm", lambda *a, **k: (mlp_norm(*a, **k)[0] + 1, mlp_norm(*a, **k)[1]))
    assert "normed (layer): max error" in cm._check_mlp(cpu, torch.bfloat16, gen())
    monkeypatch.setattr(cm, "decode_mlp", lambda *a, **k: mlp(*a, **k).nan_to_num() * float("nan"))
    assert "max error" in cm._check_mlp(cpu, torch.bfloat16, gen())  # NaN fails
    monkeypatch.setattr(cm, "decode_mlp_norm", mlp_norm)  # only the flow schedule wrong: caught as such
    monkeypatch.setattr(cm, "decode_mlp", lambda *a, **k: mlp(*a, **k) * (1.05 if k.get("flow") else 1.0))
    assert "flow=True: max error" in cm._check_mlp(cpu, torch.bfloat16, gen())
    monkeypatch.setattr(cm, "decode_mlp", mlp)  # only the accumulate schedule wrong: a scaled sum, or a
    monkeypatch.setattr(cm, "decode_mlp_accumulate", lambda x, w1, b1, w2t, part, *a, **k: accumulate(
        x, w1, b1, w2t, part, *a, **k).mul_(1.05))
    assert "accumulate x1: max error" in cm._check_mlp(cpu, torch.bfloat16, gen())
    # second launch that overwrites instead of adding
    monkeypatch.setattr(cm, "decode_mlp_accumulate", lambda x, w1, b1, w2t, part, *a, **k: accumulate(
        x, w1, b1, w2t, part.zero_(), *a, **k))
    assert "accumulate x2: max error" in cm._check_mlp(cpu, torch.bfloat16, gen())


_CHECK_PROGRAM = r"""
#include <iostream>
#include "check.h"
int main() {
  const int64_t n = 100;
  const std::vector<int64_t> shape{16, 2048};
  const auto probe = [](auto&& fn) {
    try { fn(); std::cout << "no error\n"; } catch (const c10::Error& e) { std::cout << e.msg() << "\n"; }
  };
  probe([&] { HYBRID_CHECK(n % 64 == 0, "N % ", 64, " == 0, got ", n); });
  probe([&] { HYBRID_CHECK(false, "x ", c10::IntArrayRef(shape), " dtype ", c10::ScalarType::BFloat16, " on ",
                           c10::Device(c10::DeviceType::CUDA, 1), " eps ", 0.5, " pdl ", true); });
  int evaluated = 0;
  probe([&] { HYBRID_CHECK(true, "never built ", ++evaluated); });
  std::cout << "evaluated " << evaluated << "\n";
}
"""


@pytest.mark.slow
def test_check_messages_format_numbers_sizes_dtypes_devices(tmp_path):
    """csrc/check.h (HYBRID_CHECK, used by every check in ops.cpp): the message, built without
    std::ostream, says what TORCH_CHECK's would, and is built only when the check fails. Compiled
    against this torch's c10 and run here."""
    from torch.utils.cpp_extension import include_paths, library_paths

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src, exe = tmp_path / "check_messages.cpp", tmp_path / "check_messages"
    src.write_text(_CHECK_PROGRAM)
    lib = library_paths()[0]
    std = "-std=c++20" if torch.__version__ >= "2.10" else "-std=c++17"
    cmd = [cxx, std, "-O1", str(src), "-o", str(exe), f"-I{cb.CSRC_DIR}", *[f"-I{p}" for p in include_paths()],
           f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10"]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "N % 64 == 0, got 100",
        "x [16, 2048] dtype BFloat16 on cuda:1 eps 0.5 pdl true",
        "no error",
        "evaluated 0",
    ], run.stdout
