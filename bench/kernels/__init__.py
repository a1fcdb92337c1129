"""Kernel microbenchmarks (pytest-benchmark, GPU only): `pytest bench/kernels --benchmark-only -m gpu`."""
