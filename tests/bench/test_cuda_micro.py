"""bench/kernels' standalone CUDA microbenchmarks (wgmma_rate.cu, stream_consume.cu): each builds
for sm_90a here (no GPU needed) with the instructions it claims to time in its SASS, and the
runner turns their --json lines into rows with the environment."""
import json
import shutil
import subprocess

import pytest

from bench.kernels import cuda_micro, stream_consume, wgmma_rate
from hybrid.ops.testing import find_cuobjdump


def test_parse_reads_every_json_line():
    out = ('{"bench": "wgmma_rate", "n": 64, "operands": "SS", "ns_per_instr_sm": 18.7}\n\n'
           '{"bench": "mma_sync_rate", "ldmatrix": true, "tflops_chip": 650.4}\n')
    rows = cuda_micro.parse(out)
    assert [r["bench"] for r in rows] == ["wgmma_rate", "mma_sync_rate"]
    assert rows[0]["ns_per_instr_sm"] == 18.7
    with pytest.raises(ValueError):
        cuda_micro.parse("m64n64 k16 SS wait0 ...")  # the table, not --json


def test_run_prints_the_table_and_appends_rows_with_the_environment(tmp_path, monkeypatch, capsys):
    exe = tmp_path / "fake"
    monkeypatch.setattr(cuda_micro, "build", lambda source, out_dir: exe)

    real_run = subprocess.run

    def fake_run(cmd, **kw):
        if cmd[0] != str(exe):  # the rows' environment (git) runs for real
            return real_run(cmd, **kw)
        out = '{"bench": "x", "v": 1}\n' if "--json" in cmd else "a table\n"
        return subprocess.CompletedProcess(cmd, 0, stdout=out, stderr="")

    monkeypatch.setattr(cuda_micro.subprocess, "run", fake_run)
    rows = cuda_micro.run(tmp_path / "fake.cu", "fake_bench", ["--iters", "3"], str(tmp_path / "res"))
    assert "a table" in capsys.readouterr().out
    assert rows == [{"bench": "x", "v": 1, "args": "--iters 3"}]
    saved = [json.loads(line) for line in (tmp_path / "res" / "fake_bench.jsonl").read_text().splitlines()]
    assert saved[0]["v"] == 1 and saved[0]["args"] == "--iters 3" and "git_commit" in saved[0]


def _sass(exe) -> str:
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not installed")
    return subprocess.run([cuobjdump, "-sass", str(exe)], capture_output=True, text=True, timeout=300).stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_wgmma_rate_builds_with_the_timed_instructions(tmp_path):
    sass = _sass(cuda_micro.build(wgmma_rate.SOURCE, tmp_path))
    for shape in ("64x16x16", "64x64x16", "64x128x16", "64x256x16"):
        assert f"HGMMA.{shape}.F32.BF16" in sass, shape
    assert "HMMA.16816.F32.BF16" in sass and "LDSM.16.M88.4" in sass


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_stream_consume_builds_with_the_skinny_gemms_instructions(tmp_path):
    sass = _sass(cuda_micro.build(stream_consume.SOURCE, tmp_path))
    assert "LDGSTS.E.BYPASS.LTC256B.128" in sass  # tc_pipeline's cp.async, as the skinny GEMM
    assert "LDSM.16.M88.4" in sass and "HMMA.16816.F32.BF16" in sass
    assert "LDL" not in sass and "STL" not in sass  # no local memory (spills) in any configuration
