"""Test-wide environment: CPU runs use the Triton interpreter and DeepSpeed's CPU accelerator.

The variables must be set before triton / deepspeed are first imported, which is why they live in
the root conftest (loaded before any test module, for tests/ and bench/kernels/ alike).
"""
import os
import shutil

_HAS_NVIDIA = shutil.which("nvidia-smi") is not None
if not _HAS_NVIDIA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
