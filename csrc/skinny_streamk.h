// Torch-free launch interface of the stream-K skinny GEMM (skinny_streamk.cu; sm_90a):
// y[M, N] = act(x[M, K] @ w[N, K]^T + b), M <= 64, bf16 / fp16, fp32 accumulation.
//
// The work is the grid of units (64-column tile t, 64-wide k block kb), k block fastest; CTA c of G
// takes the contiguous units [c * U / G, (c + 1) * U / G), so every SM streams the same number of
// weight bytes whatever N and K are (no waves, no idle SMs). A tile whose k blocks lie in one CTA is
// stored by it; a tile shared by several CTAs is summed by the last of them to arrive (a counter per
// tile; the others leave fp32 partials in a workspace), in a fixed order, so the result does not
// depend on the arrival order. tests/hybrid/test_skinny_streamk_layout.py models the partition.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace hybrid {

constexpr int kStreamKTile = 64;        // output columns per tile and k per unit (N, K multiples of 64)
constexpr int kStreamKMaxM = 64;        // one wgmma m64 tile of rows
constexpr int kStreamKMaxTilesPerCta = 16;  // the bias of a CTA's tiles is staged in shared memory
constexpr int kStreamKMaxTiles = 4096;  // counters per device (N <= 262144)

struct StreamKParams {
  void* y;               // [M, N] contiguous, dtype of x
  const void* x;         // [M, K] contiguous, 16-byte aligned
  const void* w;         // [N, K] contiguous, 16-byte aligned (the stored weight, read in place)
  const void* bias;      // [N] or nullptr; a parameter: read before the PDL wait
  float* workspace;      // [N / 64, max_contrib, M, 64] fp32 partial tiles
  unsigned int* counters;  // [>= N / 64], zero on entry and left zero (one stream at a time)
  int m;                 // 1..64
  int n;                 // multiple of 64
  int k;                 // multiple of 64
  int ctas;              // G: 1..N/64 * K/64 CTAs (one per SM at most: ~213 KB of shared memory each)
  int max_contrib;       // streamk_max_contrib(n, k, ctas): workspace slots per tile
  bool relu;
  bool pdl;              // programmatic dependent launch: the first W stages load before the wait
  // Optional diagnostics (nullptr: off): per CTA kStreamKStamps %globaltimer values (ns), written by
  // consumer thread 0: kernel start, first unit landed, last unit consumed, the last flush's partial
  // stored, its ticket taken, its sum done (last arriver), the kernel's end.
  unsigned long long* stamps;
};
constexpr int kStreamKStamps = 8;

// Units per CTA are U / G or U / G + 1; a tile of K / 64 units meets at most this many CTAs.
inline int streamk_max_contrib(int n, int k, int ctas) {
  const int64_t kb = k / kStreamKTile;
  const int64_t units = static_cast<int64_t>(n / kStreamKTile) * kb;
  const int64_t shortest = units / ctas;
  return static_cast<int>((kb + shortest - 1) / shortest + 1);
}

// Tiles one CTA touches at most (its bias is staged in shared memory: <= kStreamKMaxTilesPerCta).
inline int streamk_max_tiles_per_cta(int n, int k, int ctas) {
  const int64_t kb = k / kStreamKTile;
  const int64_t units = static_cast<int64_t>(n / kStreamKTile) * kb;
  const int64_t longest = (units + ctas - 1) / ctas;
  return static_cast<int>((longest + kb - 1) / kb + 1);
}

// half_precision: false = bfloat16, true = float16. cudaErrorNotSupported without an sm_90a build
// or without the driver's tensor-map entry point; cudaErrorInvalidValue for a shape it does not take.
cudaError_t launch_skinny_streamk(bool half_precision, const StreamKParams& p, cudaStream_t stream);
bool skinny_streamk_built();

}  // namespace hybrid
