// Pieces shared by the persistent decode MLP's kernels: decode_mlp.cu (the grid-barrier and flow
// schedules) and decode_mlp_accumulate.cu (the ffn-split schedule). The CTA shape and ring
// configuration, the GEMM unit over tc_pipeline.cuh's ring, the warp-partial tiles, the diagnostic
// stamps and the launch. In an anonymous namespace: each kernel TU compiles its own copy.
#pragma once

#include "decode_mlp.h"
#include "tc_pipeline.cuh"

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace hybrid {
namespace {

using namespace tc;  // NOLINT: the pipeline pieces (tc_pipeline.cuh)

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRedLd = kMlpTile + 8;  // padded fp32 row of a warp-partial tile (as skinny_gemm.cu)
constexpr int kMaxSmem = 227 * 1024;                    // sm_90 dynamic shared memory per CTA
static_assert(kMlpTile * 2 == kStageK, "a stage is 1 or 2 of the 64-wide k blocks");

// Ring depth for M <= 16 (one m16 tile), a build-time knob for experiments (HYBRID_NVCC_EXTRA=
// "-DHYBRID_MLP_STAGES_M16=4", hybrid/ops/cuda_backend.py). 6: the OPT-1.3B decode step at 16 rows
// on an H200 (bench.kernels.decode_knockout, flow_pdl, one build each) measured 2 stages 1.698 ms,
// 3 1.492, 4 1.459-1.460, 6 1.450, 8 1.477 (the earlier default; 1.481-1.486 in other runs).
#ifndef HYBRID_MLP_STAGES_M16
#define HYBRID_MLP_STAGES_M16 6
#endif
static_assert(HYBRID_MLP_STAGES_M16 >= 2 && HYBRID_MLP_STAGES_M16 <= 8, "ring depth");

template <int MT>
struct Config {
  static constexpr int kWN = MT <= 2 ? 1 : 2;       // warps along N
  static constexpr int kWK = kWarps / kWN;          // warps along K (k16 steps of a stage)
  static constexpr int kNT = kMlpTile / 8 / kWN;    // n8 tiles per warp
  static constexpr int kStages = MT == 1 ? HYBRID_MLP_STAGES_M16 : MT == 2 ? 6 : MT == 3 ? 5 : 4;
  static constexpr int kXRows = MT * 16;
  static constexpr int kWBytes = kMlpTile * kRowBytes;  // 16 KB
  static constexpr int kXBytes = kXRows * kRowBytes;
  static constexpr int kStageBytes = kWBytes + kXBytes;
  static constexpr int kRingBytes = kStages * kStageBytes;
  static constexpr int kSlab = kXRows * kRedLd;     // floats of one warp-partial tile
  static constexpr int kRedBytes = kWK * kSlab * 4;
  static constexpr int kActBytes = kXRows * kMlpTile * 2;  // accumulate: the CTA's act tile (128-byte rows)
  static constexpr int kSmemBytes = kRingBytes + kRedBytes + kActBytes;
  static_assert(kSmemBytes <= kMaxSmem, "one CTA per SM");
  static_assert((kStageK / 16) % kWK == 0 && kNT % 2 == 0, "warp grid");
};

__device__ __forceinline__ void st_shared16(uint32_t addr, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

// One ring stage's products: the 64-row W tile at shared address ws times the x tile at xs (both
// in the swizzled 256-byte rows), k16 of its 8 k16 steps valid, into acc; the warps split over K
// (and over N for M > 32) as Config says. Unit::compute and the cluster schedule's kernel
// (decode_mlp_cluster.cu, whose fc2 x lives in an act area outside the ring) both use it.
template <bool kHalf, int MT>
__device__ __forceinline__ void mma_stage(uint32_t ws, uint32_t xs, int k16,
                                          float (&acc)[MT][Config<MT>::kNT][4]) {
  using C = Config<MT>;
  constexpr int WN = C::kWN, WK = C::kWK, NT = C::kNT;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wn = warp % WN, wk = warp / WN;
  const int mat = lane >> 3, mrow = lane & 7;
#pragma unroll
  for (int j = 0; j < kStageK / 16 / WK; ++j) {
    const int kk = wk + j * WK;
    if (kk < k16) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ldmatrix_x4(a[mt][0], a[mt][1], a[mt][2], a[mt][3],
                    xs + swizzle(mt * 16 + (mat & 1) * 8 + mrow, kk * 2 + (mat >> 1)));
      uint32_t b[NT][2];
#pragma unroll
      for (int np = 0; np < NT / 2; ++np)
        ldmatrix_x4(b[2 * np][0], b[2 * np][1], b[2 * np + 1][0], b[2 * np + 1][1],
                    ws + swizzle((wn * NT + 2 * np + (mat >> 1)) * 8 + mrow, kk * 2 + (mat & 1)));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma16816<kHalf>(acc[mt][nt], a[mt], b[nt][0], b[nt][1]);
    }
  }
}

// One GEMM unit: a 64-row W tile [64, 64*nblk] (row pitch w_row bytes) times the x slice
// [m, 64*nblk] (row pitch x_row), accumulated into acc through the ring.
template <typename T, bool kHalf, int MT>
struct Unit {
  using C = Config<MT>;
  static constexpr int STAGES = C::kStages;
  static constexpr int WN = C::kWN, WK = C::kWK, NT = C::kNT;
  uint32_t ring;
  const char* wg;
  const char* xg;
  size_t w_row;
  size_t x_row;
  int nblk;
  int m;

  // fc1 tile u: w1 rows 64 u..64 u + 63 times x, over all of hidden
  static __device__ __forceinline__ Unit fc1(uint32_t ring, const DecodeMlpParams& p, int u) {
    const size_t row = static_cast<size_t>(p.hidden) * sizeof(T);  // bytes per row of x and w1
    return Unit{ring, static_cast<const char*>(p.w1) + static_cast<size_t>(u) * kMlpTile * row,
                static_cast<const char*>(p.x), row, row, p.hidden / kMlpTile, p.m};
  }

  __device__ __forceinline__ int stages() const { return (nblk + 1) / 2; }
  __device__ __forceinline__ int valid(int st) const { return min(kChunks, (nblk - 2 * st) * (kChunks / 2)); }

  __device__ __forceinline__ void load_w(int st) const {
    const uint32_t ws = ring + (st % STAGES) * C::kStageBytes;
    const int v = valid(st);
    const char* src = wg + static_cast<size_t>(st) * kRowBytes;
#pragma unroll
    for (int i = 0; i < kMlpTile * kChunks / kThreads; ++i) {  // a row's 16 chunks: 16 threads
      const int id = threadIdx.x + i * kThreads;
      const int row = id / kChunks, ch = id % kChunks;
      if (ch < v) cp_async16(ws + swizzle(row, ch), src + row * w_row + ch * 16, 16);
    }
  }
  __device__ __forceinline__ void load_x(int st) const {
    const uint32_t xs = ring + (st % STAGES) * C::kStageBytes + C::kWBytes;
    const int v = valid(st);
    const char* src = xg + static_cast<size_t>(st) * kRowBytes;
#pragma unroll
    for (int i = 0; i < C::kXRows * kChunks / kThreads; ++i) {
      const int id = threadIdx.x + i * kThreads;
      const int row = id / kChunks, ch = id % kChunks;
      if (ch < v) cp_async16(xs + swizzle(row, ch), src + min(row, m - 1) * x_row + ch * 16, row < m ? 16 : 0);
    }
  }
  // The W part of the prologue: stages 0..STAGES-2, one commit group each (empty past the slice),
  // so the main loop's first waits need only their own stage, not the whole prologue. The stored
  // weight: safe to issue before griddepcontrol.wait / the grid barrier.
  __device__ __forceinline__ void prologue_w(int from = 0, int to = STAGES - 1) const {
    const int ns = stages();
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s >= from && s < to) {
        if (s < ns) load_w(s);
        cp_async_commit();
      }
    }
  }
  // The x part of the prologue (what the previous kernel or phase wrote: after the wait / barrier):
  // plain 16-byte L2 loads (ld.global.cg: never a stale L1 line) into the stages' x slots, all
  // issued before the first store (one L2 round trip, not one per stage). Small (<= 16 KB per
  // stage) L2 hits; visible to every warp after the main loop's first __syncthreads.
  __device__ __forceinline__ void prologue_x() const {
    constexpr int kPer = C::kXRows * kChunks / kThreads;  // 16-byte chunks per thread and stage
    const int ns = stages();
    uint4 v[STAGES - 1][kPer];
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      const int lim = s < ns ? valid(s) : 0;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int id = threadIdx.x + i * kThreads;
        const int row = id / kChunks, ch = id % kChunks;
        v[s][i] = make_uint4(0u, 0u, 0u, 0u);
        if (ch < lim && row < m)
          v[s][i] = __ldcg(reinterpret_cast<const uint4*>(xg + static_cast<size_t>(s) * kRowBytes + row * x_row + ch * 16));
      }
    }
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      const int lim = s < ns ? valid(s) : 0;
      const uint32_t xs = ring + s * C::kStageBytes + C::kWBytes;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int id = threadIdx.x + i * kThreads;
        const int row = id / kChunks, ch = id % kChunks;
        if (ch < lim) st_shared16(xs + swizzle(row, ch), v[s][i]);
      }
    }
  }
  __device__ __forceinline__ void compute(int st, float (&acc)[MT][NT][4]) const {
    const uint32_t ws = ring + (st % STAGES) * C::kStageBytes;
    mma_stage<kHalf, MT>(ws, ws + C::kWBytes, min(kStageK / 16, (nblk - 2 * st) * (kMlpTile / 16)), acc);
  }
  // After both prologue parts: the ring runs STAGES-1 stages ahead of the one computed. Groups:
  // W(0..STAGES-2) one each, then one per iteration (W + x of stage st+STAGES-1, empty past the
  // end), so wait_group<STAGES-2> at iteration st means groups up to W(st) / x(st) are complete.
  // On return every copy has landed and every warp is done with the ring.
  __device__ __forceinline__ void run(float (&acc)[MT][NT][4]) const {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;
    const int ns = stages();
    for (int st = 0; st < ns; ++st) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();  // stage st visible to all; every warp is done with stage st-1's slot
      if (st + STAGES - 1 < ns) {
        load_w(st + STAGES - 1);
        load_x(st + STAGES - 1);
      }
      cp_async_commit();
      compute(st, acc);
    }
    cp_async_wait<0>();
    __syncthreads();
  }
};

// Warp-partial tiles -> the shared area (not the ring, which may already hold the next prefetch).
template <int MT>
__device__ __forceinline__ void stash(float* red, const float (&acc)[MT][Config<MT>::kNT][4]) {
  using C = Config<MT>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wn = warp % C::kWN, wk = warp / C::kWN;
  const int g = lane >> 2, t = lane & 3;  // m16n8 accumulator: c0,c1 (row g, cols 2t,2t+1); c2,c3 row g+8
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < C::kNT; ++nt) {
      float* at = red + wk * C::kSlab + (mt * 16 + g) * kRedLd + (wn * C::kNT + nt) * 8 + 2 * t;
      *reinterpret_cast<float2*>(at) = make_float2(acc[mt][nt][0], acc[mt][nt][1]);
      *reinterpret_cast<float2*>(at + 8 * kRedLd) = make_float2(acc[mt][nt][2], acc[mt][nt][3]);
    }
}

// Sum of the K warps' partials of (row, column pair c2) of the tile, in warp order.
template <int MT>
__device__ __forceinline__ float2 warp_sum(const float* red, int row, int c2) {
  using C = Config<MT>;
  float2 v = make_float2(0.f, 0.f);
#pragma unroll
  for (int w = 0; w < C::kWK; ++w) {
    const float2 t = *reinterpret_cast<const float2*>(red + w * C::kSlab + row * kRedLd + 2 * c2);
    v.x += t.x;
    v.y += t.y;
  }
  return v;
}

__device__ __forceinline__ void stamp(const DecodeMlpParams& p, int i) {
  if (p.stamps != nullptr && threadIdx.x == 0) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    p.stamps[blockIdx.x * kMlpStamps + i] = t;
  }
}

// Launches `kernel` with the MLP's CTA shape and ring (grid p.grid), PDL-launched when p.pdl.
template <int MT, typename Kernel>
cudaError_t launch_mlp_kernel(Kernel kernel, const DecodeMlpParams& p, cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(p.grid, 1, 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = Config<MT>::kSmemBytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  cfg.numAttrs = 0;
  if (p.pdl) {
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.numAttrs = 1;
  }
  cfg.attrs = attr;
  return cudaLaunchKernelEx(&cfg, kernel, p);
}

}  // namespace
}  // namespace hybrid
