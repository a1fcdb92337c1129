// Torch-free launch interface of the persistent decode MLP (decode_mlp.cu):
//
//   act = relu?(x @ w1^T + b1)                 [M, ffn], rounded to the dtype (phase 1)
//   part[s] = act[:, K_s] @ w2[:, K_s]^T       [k_splits, M, hidden] fp32 (phase 2, no bias)
//
// in ONE launch: phase 2's first weight stages stream while phase 1 drains and the CTAs meet at a
// grid barrier, instead of two GEMM launches each paying its own ramp and tail. The partials are
// what linear.splitk_partials returns, so the split-K reduce + bias + residual + norm kernel
// (hybrid/ops/linear_norm.py) finishes the block unchanged. ops.cpp checks the tensors.
#pragma once

#include <cuda_runtime.h>

namespace hybrid {

constexpr int kMlpMaxM = 64;       // 4 m16 tiles at most
constexpr int kMlpTile = 64;       // hidden and ffn are multiples of this
constexpr int kMlpMaxKSplits = 16; // phase-2 K slices (partials the norm kernel sums)

struct DecodeMlpParams {
  float* part;              // [k_splits, M, hidden] fp32
  void* act;                // [M, ffn] workspace, dtype of x
  const void* x;            // [M, hidden] contiguous, 16-byte aligned
  const void* w1;           // [ffn, hidden] contiguous, 16-byte aligned
  const void* b1;           // [ffn] or nullptr
  const void* w2;           // [hidden, ffn] contiguous, 16-byte aligned
  unsigned int* barrier;    // [2] = one 8-byte aligned uint64 arrival counter: zero once, never reset;
                            // flow: [kMlpSyncInts]; [2..) zero before the first launch, every launch leaves it zero
  int m;                    // 1..64
  int hidden;               // multiple of 64
  int ffn;                  // multiple of 64
  int k_splits;             // 1..16, ffn / 64 >= k_splits
  int grid;                 // CTAs; every one must be resident at once (decode_mlp_resident_ctas)
  bool relu;
  bool pdl;                 // programmatic dependent launch: w1's first stages before griddepcontrol.wait
  int prefetch2;            // phase-2 weight stages issued between barrier arrival and wait (flow: before an
                            // fc2 unit's slice wait) (-1: the whole prologue)
  // Dataflow schedule instead of the grid barrier (flow = true; no phase 3): one queue of units,
  // the fc1 tiles first, then the fc2 (K slice, column tile) units slice by slice; CTA c starts
  // with unit c, then claims the next unit from barrier[2] while it computes the current one. An
  // fc2 unit waits only for the fc1 tiles of its K slice (counter barrier[4 + s], bumped by each
  // tile's CTA after its act stores), so stragglers of phase 1 hold up one slice, not the grid,
  // and every CTA streams the next unit's weights while it waits. The last CTA to leave
  // (barrier[3]) zeroes the counters. Needs grid <= resident CTAs, as the barrier does (ops.cpp
  // launches as many CTAs as the larger phase has units, at most that).
  bool flow;
  // ffn-split schedule instead (accumulate = true; k_splits 1, no phase 3, barrier untouched): CTA
  // c takes ffn tiles c, c + grid, ...; for each it streams the fc1 tile's weights, then, through
  // the same ring with no drain between, the matching 64 columns of w2, and multiplies its own act
  // tile (kept in shared memory) by them, adding the fp32 products into part[0] [M, hidden] with
  // vector atomics. No CTA ever waits for another, so DRAM streams from the first stage to the last;
  // the price is nondeterministic fp32 summation order and part[0] having to be ZERO on entry
  // (linear_norm.splitk_add_norm(..., zero_part=True) reads it and leaves it zero again).
  // Here w2 is fc2's weight TRANSPOSED, [ffn, hidden] contiguous (a tile's fc2 rows then stream
  // like its fc1 rows; the [hidden, ffn] column blocks streamed at ~1.5 TB/s on an H200).
  bool accumulate;
  // Phase 3 (norm_w != nullptr): after one more grid barrier (flow: no barrier; every CTA, leaving
  // its unit loop, publishes how many fc2 partials it stored and takes a ticket, and the last
  // min(M, grid) CTAs out wait for all fc2 partials and take the rows), CTA r (< M) finishes row r as
  // linear_norm's split-K reduce + add + norm kernel does: y = sum_s part[s] (+ b2), rounded;
  // res_out = y + residual, rounded; out = LayerNorm(res_out; norm_w, norm_b) or, norm_b null,
  // RMSNorm(res_out; norm_w). The same rounding steps; the row statistics sum in another order.
  const void* b2;           // [hidden] or nullptr
  const void* residual;     // [M, hidden] rows (unit column stride) or nullptr
  long long residual_stride;
  const void* norm_w;       // [hidden] or nullptr: no phase 3
  const void* norm_b;       // [hidden] (LayerNorm) or nullptr (RMSNorm)
  void* out;                // [M, hidden] contiguous: the normed rows
  void* res_out;            // [M, hidden] contiguous: the residual stream after the block
  float eps;
  // Diagnostics (nullptr: off): thread 0 of CTA c writes %globaltimer (ns) to stamps[c * 8 + i] at
  // 0 start, 1 after griddepcontrol.wait, 2 phase-1 GEMMs done, 3 phase-1 epilogue done (barrier
  // arrival), 4 barrier 1 passed, 5 phase 2 done, 6 barrier 2 passed (row CTAs), 7 end; phase 3's
  // first row: 8 its loads summed, 9 after the first block sum, 10 after the second (LayerNorm).
  // accumulate: 2 the first act tile in shared memory, 5 the last fc2 stage's atomics issued.
  unsigned long long* stamps;
};
constexpr int kMlpStamps = 12;
// flow: barrier (2), queue, exit count, slice counters, then (phase 3) fc2 partials stored, norm tickets
constexpr int kMlpSyncInts = 6 + kMlpMaxKSplits;
constexpr int kMlpMaxHidden = 16384;  // phase 3 keeps a row in registers (32 column pairs per thread)

// half_precision: false = bfloat16, true = float16.
cudaError_t launch_decode_mlp(bool half_precision, const DecodeMlpParams& p, cudaStream_t stream);

// The accumulate schedule's launch (decode_mlp_accumulate.cu), which launch_decode_mlp calls for
// p.accumulate after checking p; not meant to be called directly.
cudaError_t launch_decode_mlp_accumulate(bool half_precision, const DecodeMlpParams& p, cudaStream_t stream);

// The cluster schedule (decode_mlp_cluster.cu): one CTA per fc1 tile (grid ffn / 64, p.grid
// ignored) in clusters of `cluster` (2, 4, 8 or 16) CTAs; cluster c computes fc1 tiles
// c * cluster.. and, from their act (exchanged through distributed shared memory after one
// cluster barrier), the partial of K slice c for every output column: p.k_splits must equal
// ffn / (64 * cluster), and hidden and ffn must be multiples of 64 * cluster. M <= 32. No grid-wide
// wait, so neither p.barrier nor co-residency of the grid is needed; p.flow / p.accumulate /
// p.norm_w / p.prefetch2 are ignored. p.stamps (if set) needs ffn / 64 CTAs' rows.
constexpr int kMlpClusterMaxM = 32;
bool decode_mlp_cluster_valid(const DecodeMlpParams& p, int cluster);
cudaError_t launch_decode_mlp_cluster(bool half_precision, const DecodeMlpParams& p, int cluster, cudaStream_t stream);
// Clusters of that launch the current device holds at once (cudaOccupancyMaxActiveClusters).
cudaError_t decode_mlp_cluster_active(bool half_precision, const DecodeMlpParams& p, int cluster, int* clusters);

// CTAs of the kernel for m rows the current device holds at once (SMs x resident CTAs per SM).
cudaError_t decode_mlp_resident_ctas(bool half_precision, int m, int* ctas);

// The per-dtype halves of the two above (decode_mlp_bf16.cu / decode_mlp_fp16.cu, one TU each so
// nvcc builds them in parallel); launch_decode_mlp checks p first, call that instead.
cudaError_t launch_decode_mlp_bf16(const DecodeMlpParams& p, cudaStream_t stream);
cudaError_t launch_decode_mlp_fp16(const DecodeMlpParams& p, cudaStream_t stream);
cudaError_t decode_mlp_resident_ctas_bf16(int m, int* ctas);
cudaError_t decode_mlp_resident_ctas_fp16(int m, int* ctas);

}  // namespace hybrid
