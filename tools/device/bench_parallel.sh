#!/usr/bin/env bash
# Runs independent one-GPU benchmark jobs side by side, one per GPU of a multi-GPU machine, each
# under its own timeout, logs under $OUT/logs. Usage (on the device, after tools/device_setup.sh):
#   bash tools/device/bench_parallel.sh SECONDS "job for GPU 0" "job for GPU 1" ...
# Rows land in $OUT/reports/results (bench/rows.py); a job cut by its timeout keeps the rows it wrote.
limit=$1; shift
mkdir -p "$OUT/logs"
pids=()
gpu=0
for job in "$@"; do
  ( export CUDA_VISIBLE_DEVICES=$gpu; echo "[gpu $gpu] $job"; timeout "$limit" bash -c "$job" ) \
    >"$OUT/logs/gpu$gpu.log" 2>&1 &
  pids+=($!)
  gpu=$((gpu + 1))
done
rc=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; r=$?
  echo "[bench_parallel] gpu $i exit $r"; tail -n 25 "$OUT/logs/gpu$i.log" | grep -v -E "WARNING|warn" | tail -n 12
  [ $r -ne 0 ] && rc=$r
done
exit $rc
