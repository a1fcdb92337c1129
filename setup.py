"""Builds the csrc/ CUDA extension only where a CUDA-enabled torch is present; else pure Python."""
import os

from setuptools import setup


def _ext_modules():
    if os.environ.get("HYBRID_RLHF_SKIP_CUDA"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(
        os.path.join("csrc", f) for f in os.listdir(os.path.join(here, "csrc")) if f.endswith((".cu", ".cpp"))
    )
    ext = CUDAExtension(
        name="hybrid._C",
        sources=sources,
        # sm_90a: H100 / H200 only, and what the wgmma kernel (csrc/skinny_wgmma.cu) needs
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-gencode=arch=compute_90a,code=sm_90a",
                                                     "-DHYBRID_SM90A=1"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
