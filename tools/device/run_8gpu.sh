#!/usr/bin/env bash
# Issue 6: the headline benchmark on one node of 8 GPUs, both systems, one model per call (each fits
# the device's 10-minute call limit). On the device, after `source tools/device_setup.sh`:
#   bash tools/device/run_8gpu.sh opt-13b     # then opt-6.7b, opt-1.3b
#   bash tools/device/run_8gpu.sh opt-13b 4   # the same on a 4-GPU machine (what the lent kinds allow)
# Rows (bench/rows.py) and logs go to one tarball, $OUT/run<GPUS>.tgz: the device returns at most 8 files.
# SECONDS_LIMIT (default 540) bounds bench.e2e; rows of a system that finished before it are kept.
# Memory choices (per GPU): opt-1.3b as the 1/2/4-GPU rows (ZeRO-2, batch 64); opt-6.7b and opt-13b
# with ZeRO-3 for ours (DeepSpeed-Chat's setting for these sizes) and gradient checkpointing for all
# systems, batch 16. The HF-DDP baseline keeps a full replica per GPU (fp32 master weights + AdamW):
# where it does not fit, bench.e2e records an OOM row with batch and memory, which is the result.
set -u
model=${1:?model: opt-1.3b | opt-6.7b | opt-13b}
gpus=${2:-8}
real_out=$OUT; export OUT=/tmp/run$gpus; mkdir -p "$OUT"
case $model in
  opt-1.3b) flags=(--batch 64) ;;
  opt-6.7b|opt-13b) flags=(--batch 16 --actor-zero-stage 3 --critic-zero-stage 3 --gradient-checkpointing) ;;
  *) echo "unknown model $model" >&2; exit 2 ;;
esac
timeout "${SECONDS_LIMIT:-540}" python3 -m bench.e2e --model "$model" --critic opt-350m --gpus "$gpus" --system ours,hf-ddp \
  --warmup 1 --iters 2 --no-progress "${flags[@]}" > "$OUT/e2e_${model}.log" 2>&1
echo "bench.e2e exit $?"
grep -E "^\[bench.e2e\] (ours|hf)|e2e [0-9]|TFLOPs|OUT OF MEMORY" "$OUT/e2e_${model}.log"
tar czf "$real_out/run$gpus.tgz" -C "$OUT" .
