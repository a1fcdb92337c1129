// Skinny (decode) GEMM on Hopper warpgroup MMA, for 33-64 rows: y[M, N] = act(x[M, K] @ w[N, K]^T + b).
//
// Why (csrc/NOTES.md, "Session 11"): the mma.sync skinny GEMM (skinny_gemm.cu) slows down at four
// m16 tiles (49-64 rows) far more than the extra rows of x it reads explain: each warp then issues
// 32 mma.sync and 12 ldmatrix.x4 per 128-k stage. Here one wgmma.m64n64k16 per k16 step reads both
// operands from shared memory (no ldmatrix, no A / B fragments in registers), and its 64 x 64 fp32
// tile is 32 registers per thread.
//
// - Same grid, ring and PDL prologue as skinny_gemm.cu: CTA = a 64-column tile and one K slice
//   (k_splits CTAs of a column tile form a cluster and sum through distributed shared memory),
//   stages of 128 k streamed by 16-byte cp.async into a 3-deep ring (W before griddepcontrol.wait,
//   x after), 2 CTAs per SM.
// - A stage's W tile and x tile (64 rows each; x rows past M zero-filled) are each two 64-k halves
//   in wgmma's K-major 128-byte swizzle atoms: row r of a half at r * 128, its 16-byte chunk j at
//   j ^ (r % 8) (the hardware applies the XOR from address bits, so the ring is 1024-byte aligned).
//   Descriptors: start >> 4, stride between 8-row groups 1024 B, 128-byte swizzle; the k16 steps of
//   a half advance the start address by 32 B.
// - 256 threads = two warpgroups: warpgroup g computes half g of every stage (4 wgmma), then waits
//   for them (wgmma.wait_group 0) before the barrier that lets the slot be refilled. Each keeps its
//   own 64 x 64 partial; the epilogue sums the two through shared memory, then the cluster's.
// - cp.async writes reach wgmma (the async proxy) after fence.proxy.async + the CTA barrier.
#include "skinny_gemm.h"
#include "split_k_tile.cuh"
#include "tc_pipeline.cuh"
#include "wgmma.cuh"

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace hybrid {
namespace {

using namespace tc;  // NOLINT: the pipeline pieces (tc_pipeline.cuh)
using namespace wg;  // NOLINT: the warpgroup MMA pieces (wgmma.cuh)

constexpr int kWgThreads = 256;               // two warpgroups
constexpr int kWgStages = 3;
constexpr int kRows = 64;                     // x rows (zero-filled past M) and W rows per CTA
constexpr int kHalfBytes = kRows * 128;       // 64 rows x 64 k: eight 1024-byte swizzle atoms
constexpr int kTileBytes = 2 * kHalfBytes;    // 64 rows x 128 k (16 KB)
constexpr int kStageBytes = 2 * kTileBytes;   // W then x (32 KB)
constexpr int kRingBytes = kWgStages * kStageBytes;
constexpr int kWgSmemBytes = kRingBytes + 1024;  // + the ring's alignment to 1024 bytes
constexpr int kRedLd = kSkinnyTileN + 8;         // padded fp32 row of a partial tile
static_assert(2 * kRows * kRedLd * 4 <= kRingBytes, "the two partial tiles reuse the ring");
static_assert(2 * (kWgSmemBytes + 1024) <= 228 * 1024, "2 CTAs per SM");

// The device pieces exist only where wgmma does (sm_90a; and the host pass, which sees the kernel).
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Byte offset of 16-byte chunk c (0..15) of tile row r within a W or x tile.
__device__ __forceinline__ uint32_t wg_swizzle(int row, int chunk) {
  return static_cast<uint32_t>((chunk >> 3) * kHalfBytes + row * 128 + (((chunk & 7) ^ (row & 7)) << 4));
}
#endif  // wgmma targets

template <typename T, bool kHalf>
__global__ void __launch_bounds__(kWgThreads, 2) skinny_wgmma_kernel(const SkinnyGemmParams p) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // built for a target without wgmma (not sm_90a): the launcher refuses before this
#else
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t ring = (raw + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (ring - raw);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int wg = threadIdx.x >> 7;  // warpgroup: the 64-k half of each stage it computes
  const int K = p.k;
  const int n_cta = blockIdx.x * kSkinnyTileN;

  // This CTA's K slice in 64-wide blocks (uneven splits differ by one block), in stages of two.
  const int blocks = K / kSkinnyTileK;
  const int b0 = static_cast<int>(static_cast<long long>(blocks) * blockIdx.y / p.k_splits);
  const int b1 = static_cast<int>(static_cast<long long>(blocks) * (blockIdx.y + 1) / p.k_splits);
  const int nstages = (b1 - b0 + 1) / 2;

  const size_t g_row = static_cast<size_t>(K) * sizeof(T);
  const char* wg_src = static_cast<const char*>(p.w) + static_cast<size_t>(n_cta) * g_row +
                       static_cast<size_t>(b0) * kSkinnyTileK * sizeof(T);
  const char* xg = static_cast<const char*>(p.x) + static_cast<size_t>(b0) * kSkinnyTileK * sizeof(T);

  auto load_stage_w = [&](int st) {
    const uint32_t ws = ring + (st % kWgStages) * kStageBytes;
    const int valid = min(kChunks, (b1 - b0 - 2 * st) * (kChunks / 2));  // 16 or 8 chunks per row
    const char* src = wg_src + static_cast<size_t>(st) * kRowBytes;
#pragma unroll
    for (int i = 0; i < kRows * kChunks / kWgThreads; ++i) {
      const int id = threadIdx.x + i * kWgThreads;
      const int row = id / kChunks, ch = id % kChunks;
      if (ch < valid) cp_async16(ws + wg_swizzle(row, ch), src + row * g_row + ch * 16, 16);
    }
  };
  auto load_stage_x = [&](int st) {
    const uint32_t xs = ring + (st % kWgStages) * kStageBytes + kTileBytes;
    const int valid = min(kChunks, (b1 - b0 - 2 * st) * (kChunks / 2));
    const char* src = xg + static_cast<size_t>(st) * kRowBytes;
#pragma unroll
    for (int i = 0; i < kRows * kChunks / kWgThreads; ++i) {
      const int id = threadIdx.x + i * kWgThreads;
      const int row = id / kChunks, ch = id % kChunks;
      if (ch < valid) cp_async16(xs + wg_swizzle(row, ch), src + min(row, p.m - 1) * g_row + ch * 16, row < p.m ? 16 : 0);
    }
  };

  float acc[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) acc[i] = 0.f;

  using T2 = typename Pair<T>::T2;
  const T2* bias = static_cast<const T2*>(p.bias);
  constexpr int kPairsPerRow = kSkinnyTileN / 2;
  static_assert(kWgThreads % kPairsPerRow == 0, "one bias pair per thread");
  const float2 bias_f = bias != nullptr ? Pair<T>::to_float2(bias[n_cta / 2 + threadIdx.x % kPairsPerRow])
                                        : make_float2(0.f, 0.f);
#pragma unroll
  for (int s = 0; s < kWgStages - 1; ++s)
    if (s < nstages) load_stage_w(s);
  grid_dependency_wait();
#pragma unroll
  for (int s = 0; s < kWgStages - 1; ++s) {
    if (s < nstages) load_stage_x(s);
    cp_async_commit();
  }
  grid_launch_dependents();
  for (int st = 0; st < nstages; ++st) {
    cp_async_wait<kWgStages - 2>();
    fence_proxy_async();  // this thread's cp.async writes, visible to wgmma's async proxy
    __syncthreads();      // stage st complete for all; every warpgroup is done with stage st-1's slot
    if (st + kWgStages - 1 < nstages) {
      load_stage_w(st + kWgStages - 1);
      load_stage_x(st + kWgStages - 1);
    }
    cp_async_commit();
    const int halves = min(2, b1 - b0 - 2 * st);  // a last stage of 64 k has one half
    if (wg < halves) {  // warpgroup-uniform
      const uint32_t ws = ring + (st % kWgStages) * kStageBytes + wg * kHalfBytes;
      const uint32_t xs = ws + kTileBytes;
      pin(acc);
      wg_fence();
#pragma unroll
      for (int j = 0; j < 4; ++j) wgmma_m64n64k16<kHalf>(acc, wg_desc(xs + 32 * j), wg_desc(ws + 32 * j));
      wg_commit();
      wg_wait_all();
      pin(acc);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring is free: the partial tiles reuse it

  // m64nN D fragment: warp w of the warpgroup holds rows 16w..16w+15; register 4j + e sits at row
  // 16w + lane / 4 (+ 8 for e >= 2), column 8j + 2 * (lane % 4) + (e & 1).
  float* red = reinterpret_cast<float*>(smem);
  constexpr int kSlab = kRows * kRedLd;
  {
    const int w = warp & 3;
    const int r0 = 16 * w + (lane >> 2);
    const int c0 = 2 * (lane & 3);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      float* at = red + wg * kSlab + r0 * kRedLd + 8 * j + c0;
      *reinterpret_cast<float2*>(at) = make_float2(acc[4 * j], acc[4 * j + 1]);
      *reinterpret_cast<float2*>(at + 8 * kRedLd) = make_float2(acc[4 * j + 2], acc[4 * j + 3]);
    }
  }
  __syncthreads();

  T2* y = static_cast<T2*>(p.y);
  const int pairs = p.m * kPairsPerRow;
  auto offset = [](int i) { return (i / kPairsPerRow) * kRedLd + 2 * (i % kPairsPerRow); };
  auto both = [&](int i) {
    const float2 a = *reinterpret_cast<const float2*>(red + offset(i));
    const float2 b = *reinterpret_cast<const float2*>(red + kSlab + offset(i));
    return make_float2(a.x + b.x, a.y + b.y);
  };
  auto store = [&](int i, float2 v) {
    const int row = i / kPairsPerRow;
    const int col = n_cta + 2 * (i % kPairsPerRow);  // i % kPairsPerRow == threadIdx.x % kPairsPerRow
    v.x += bias_f.x;
    v.y += bias_f.y;
    if (p.relu) {
      v.x = fmaxf(v.x, 0.f);
      v.y = fmaxf(v.y, 0.f);
    }
    y[(static_cast<size_t>(row) * p.n + col) / 2] = Pair<T>::from_float2(v);
  };
  split_k_store<kWgThreads>(red, pairs, p.k_splits, both, offset, store);
#endif
}

template <typename T, bool kHalf>
cudaError_t launch_wg_typed(const SkinnyGemmParams& p, cudaStream_t stream) {
  using Kern = decltype(&skinny_wgmma_kernel<T, kHalf>);
  if (const cudaError_t err = opt_in_shared_memory<Kern, &skinny_wgmma_kernel<T, kHalf>, kWgSmemBytes>();
      err != cudaSuccess) {
    return err;
  }
  return launch_split_k_grid(skinny_wgmma_kernel<T, kHalf>, p.n / kSkinnyTileN, p.k_splits, kWgThreads, kWgSmemBytes,
                             p.pdl, stream, p);
}

}  // namespace

bool skinny_gemm_wgmma_built() { return wg::kSm90aBuild; }

cudaError_t launch_skinny_gemm_wgmma(bool half_precision, const SkinnyGemmParams& p, cudaStream_t stream) {
  if (!skinny_gemm_wgmma_built()) return cudaErrorNotSupported;
  if (p.m < 1 || p.m > kSkinnyMaxM || p.n <= 0 || p.n % kSkinnyTileN != 0 || p.k <= 0 ||
      p.k % kSkinnyTileK != 0 || p.k_splits < 1 || p.k_splits > kSkinnyMaxKSplits || p.k_cache != nullptr) {
    return cudaErrorInvalidValue;
  }
  return half_precision ? launch_wg_typed<__half, true>(p, stream) : launch_wg_typed<__nv_bfloat16, false>(p, stream);
}

}  // namespace hybrid
