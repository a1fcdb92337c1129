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


_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_leaked_dist_env():
    """rlhf.deepspeed_utils.init_distributed() sets MASTER_PORT etc. for an in-process group whose
    store keeps listening on that port; a later test's subprocess launcher would inherit the same port
    and fail with EADDRINUSE. Restore the variables after every test."""
    before = {k: os.environ.get(k) for k in _DIST_ENV}
    yield
    import sys

    hf_ds = sys.modules.get("transformers.integrations.deepspeed")
    if hf_ds is not None:  # a ZeRO-3 model built by an earlier test must not make later loads zero.Init
        hf_ds.unset_hf_deepspeed_config()
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
