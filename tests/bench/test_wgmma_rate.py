"""bench/kernels/wgmma_rate: the CUDA microbenchmark builds for sm_90a here (no GPU needed) with the
instructions it claims to time in its SASS, and its JSON lines parse into rows."""
import shutil
import subprocess

import pytest

from bench.kernels import wgmma_rate
from hybrid.ops.testing import find_cuobjdump


def test_parse_reads_every_json_line():
    out = ('{"bench": "wgmma_rate", "n": 64, "operands": "SS", "ns_per_instr_sm": 18.7}\n\n'
           '{"bench": "mma_sync_rate", "ldmatrix": true, "tflops_chip": 650.4}\n')
    rows = wgmma_rate.parse(out)
    assert [r["bench"] for r in rows] == ["wgmma_rate", "mma_sync_rate"]
    assert rows[0]["ns_per_instr_sm"] == 18.7
    with pytest.raises(ValueError):
        wgmma_rate.parse("m64n64 k16 SS wait0 ...")  # the table, not --json


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_builds_for_sm90a_with_the_timed_instructions(tmp_path):
    exe = wgmma_rate.build(tmp_path)
    assert exe.exists()
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not installed")
    sass = subprocess.run([cuobjdump, "-sass", str(exe)], capture_output=True, text=True, timeout=300).stdout
    for shape in ("64x16x16", "64x64x16", "64x128x16", "64x256x16"):
        assert f"HGMMA.{shape}.F32.BF16" in sass, shape
    assert "HMMA.16816.F32.BF16" in sass and "LDSM.16.M88.4" in sass
