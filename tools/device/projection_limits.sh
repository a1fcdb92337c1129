#!/usr/bin/env bash
# The standalone measurements behind the decode projections' limits (csrc/NOTES.md, Session 14), in
# one call. On the device, after `source tools/device_setup.sh`:
#   bash tools/device/projection_limits.sh
# 1. bench.kernels.stream_consume: the skinny GEMM's cp.async ring under each consumer (which of x's
#    ring share, bytes in flight or shared-memory reads limits 49-64 rows);
# 2. bench.kernels.wgmma_rate: tensor-core issue rates alone (wgmma, mma.sync).
# Rows go to $OUT/reports/results (stream_consume.jsonl, wgmma_rate.jsonl); each step has a timeout.
set -u
timeout 300 python3 -m bench.kernels.stream_consume || echo "stream_consume failed: $?"
timeout 300 python3 -m bench.kernels.wgmma_rate || echo "wgmma_rate failed: $?"
