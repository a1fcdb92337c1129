// Torch-free launch interface of the skinny (decode) GEMM: y[M, N] = act(x[M, K] @ w[N, K]^T + b).
// Like launch.h, the kernel TU sees only this header and cuda_runtime.h, so a bare `nvcc -c`
// compiles it (the CPU test does). ops.cpp checks the tensors and fills the struct.
#pragma once

#include <cuda_runtime.h>

namespace hybrid {

constexpr int kSkinnyMaxM = 64;      // 4 m16 tiles at most
constexpr int kSkinnyTileN = 64;     // output columns per CTA (N % 64 == 0)
constexpr int kSkinnyTileK = 64;     // K % 64 == 0 (pipeline stages of 128 k; the last may be 64)
constexpr int kSkinnyMaxKSplits = 8; // CTAs of one cluster splitting K (portable cluster size)
// Auto k_splits keeps >= 4 pipeline stages of 128 k per CTA: shorter slices are mostly ring
// prologue and cluster reduction (v1's H200 table: o_proj K=2048 was best at 4 splits, not 8).
constexpr int kSkinnyMinKPerSplit = 512;

struct SkinnyGemmParams {
  void* y;           // [M, N] contiguous, dtype of x
  const void* x;     // [M, K] contiguous, 16-byte aligned
  const void* w;     // [N, K] contiguous, 16-byte aligned (the stored weight, read in place)
  const void* bias;  // [N] or nullptr; a parameter: read before the PDL wait (nothing in the stream writes it)
  int m;             // 1..64
  int n;             // multiple of 64
  int k;             // multiple of 64
  int k_splits;      // 1..8: CTAs of a cluster over K, reduced through distributed shared memory
  bool relu;
  bool pdl;          // launch with programmatic dependent launch: W prologue overlaps the previous kernel
  // Optional paged KV-cache write of a fused qkv projection (decode): output columns
  // [kv_col0, kv_col0 + kv_width) are also stored to k_cache and the next kv_width columns to
  // v_cache, at row slots[m] * kv_width (cache [num_blocks, block_size, kv_heads, head_size]
  // contiguous: one slot = kv_width elements); slots < 0 or >= num_slots are skipped. k_cache
  // nullptr: no cache write.
  void* k_cache;
  void* v_cache;
  const int64_t* slots;  // [M]
  int64_t num_slots;
  int kv_col0;   // multiple of 2
  int kv_width;  // multiple of 2
};

// Optional block end ("skinny_norm": an o_proj / down_proj followed by the residual add and the next
// norm, linear_norm's rounding steps), a second kernel argument (a build of its own, so the plain
// kernel's parameters and code stay as they are). With it, y is not written; instead
//   res_out = round(round(x @ w^T + bias) + residual)      (residual nullptr: no add)
//   out     = round(LayerNorm(res_out) * norm_w + norm_b)  (norm_b nullptr: RMSNorm)
// Each cluster stores its column tile of res_out; the last cluster to finish (counter) normalises
// every row, one warp per row. No CTA waits on another cluster. N <= kSkinnyNormMaxN; no KV write,
// no ReLU.
constexpr int kSkinnyNormMaxN = 4096;  // the norm's weight, bias and 8 rows fit the ring

struct SkinnyNormParams {
  const void* residual;   // [M, N] contiguous or nullptr
  void* res_out;          // [M, N] contiguous
  void* out;              // [M, N] contiguous (y of SkinnyGemmParams is not written)
  const void* norm_w;     // [N], 16-byte aligned: a parameter (prefetched to L2 before the PDL wait)
  const void* norm_b;     // [N], 16-byte aligned, or nullptr (RMSNorm)
  float eps;
  unsigned int* counter;  // one word, zero on entry and left zero (launches on one stream only)
};

// half_precision: false = bfloat16, true = float16.
// norm: the block end (SkinnyNormParams); nullptr for the plain GEMM.
cudaError_t launch_skinny_gemm(bool half_precision, const SkinnyGemmParams& p, cudaStream_t stream,
                               const SkinnyNormParams* norm = nullptr);

// The same GEMM on Hopper warpgroup MMA (skinny_wgmma.cu; sm_90): 64-row tiles, for 33-64 rows.
// No KV-cache write (k_cache must be nullptr) and no block end.
cudaError_t launch_skinny_gemm_wgmma(bool half_precision, const SkinnyGemmParams& p, cudaStream_t stream);
// Whether this build has it (compiled for sm_90a with HYBRID_SM90A; else the launcher refuses).
bool skinny_gemm_wgmma_built();

// Clusters of k_splits CTAs of the kernel launch_skinny_gemm runs for m rows that the current
// device holds at once (cudaOccupancyMaxActiveClusters; k_splits 1 = resident CTAs in all).
cudaError_t skinny_gemm_max_active_clusters(bool half_precision, int m, int k_splits, int* clusters);

}  // namespace hybrid
