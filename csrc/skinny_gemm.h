// Torch-free launch interface of the skinny (decode) GEMM: y[M, N] = act(x[M, K] @ w[N, K]^T + b).
// Like launch.h, the kernel TU sees only this header and cuda_runtime.h, so a bare `nvcc -c`
// compiles it (the CPU test does). ops.cpp checks the tensors and fills the struct.
#pragma once

#include <cuda_runtime.h>

namespace hybrid {

constexpr int kSkinnyMaxM = 64;      // 4 m16 tiles per warp at most
constexpr int kSkinnyTileN = 64;     // output columns per CTA (N % 64 == 0)
constexpr int kSkinnyTileK = 64;     // K % 64 == 0 (whole k32 steps for every lane, 16-byte rows)
constexpr int kSkinnyMaxKSplits = 8; // CTAs of one cluster splitting K (portable cluster size)

struct SkinnyGemmParams {
  void* y;           // [M, N] contiguous, dtype of x
  const void* x;     // [M, K] contiguous, 16-byte aligned
  const void* w;     // [N, K] contiguous, 16-byte aligned (the stored weight, read in place)
  const void* bias;  // [N] or nullptr
  int m;             // 1..64
  int n;             // multiple of 64
  int k;             // multiple of 64
  int k_splits;      // 1..8: CTAs of a cluster over K, reduced through distributed shared memory
  bool relu;
};

// half_precision: false = bfloat16, true = float16.
cudaError_t launch_skinny_gemm(bool half_precision, const SkinnyGemmParams& p, cudaStream_t stream);

// Resident CTAs per SM of the kernel launch_skinny_gemm runs for m rows (cudaOccupancy).
cudaError_t skinny_gemm_ctas_per_sm(bool half_precision, int m, int* ctas);

}  // namespace hybrid
