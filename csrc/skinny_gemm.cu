// Skinny (decode) GEMM v2: y[M, N] = act(x[M, K] @ w[N, K]^T + b), M <= 64, bf16/fp16 in and out,
// fp32 accumulation on tensor cores (mma.sync m16n8k16). Memory-bound: W is the whole stream.
//
// Why v2 (csrc/NOTES.md "skinny_gemm"): v1 loaded W per lane into registers, so the bytes in flight
// per SM were bounded by registers (16 x 16 B per lane) and M > 32 needed 190 registers (1 CTA/SM);
// it lost to cuBLAS. v2 streams W through shared memory instead:
//
// - CTA = 8 warps on a 64-column tile (64 W rows) and one K slice. The slice is walked in stages of
//   128 k (the last one may be 64 wide): each stage is the W tile [64 x 128] (16 KB) plus the x slice
//   [MT*16 x 128] (4 KB per m16 tile; rows past M zero-filled), both fetched with 16-byte
//   `cp.async.cg` (L1 bypass) into a STAGES-deep ring (4 stages for M <= 32, 3 above): 48-64 KB of W
//   in flight per CTA, and 2 CTAs per SM (<= 96 KB of shared memory and <= 128 registers each). Every
//   W byte crosses HBM once and every M row reuses it from shared memory.
// - Shared rows are 256 B (16 chunks of 16 B); chunk c of row r sits at c ^ (r & 7), so the 8 row
//   addresses of every ldmatrix phase hit 8 different bank quads (no conflicts) and cp.async writes
//   stay whole 16-byte chunks.
// - Fragments: `ldmatrix.x4` of x gives the m16n8k16 A fragment (matrices rows 0-7 / 8-15 x k 0-7 /
//   8-15); `ldmatrix.x4` of W rows (non-transposed: W[n][k] is the col-major B operand) gives the B
//   fragments of two n8 tiles. tests/hybrid/test_skinny_gemm_layout.py transliterates every index
//   (chunk ownership, swizzle, ldmatrix lane addresses, fragment registers, warp split, reduction)
//   against the PTX ISA tables on integers.
// - Warps: M <= 32 -> 1 (N) x 8 (K): each warp owns one k16 step of every stage and all 8 n8 tiles;
//   M > 32 -> 2 x 4: 4 n8 tiles, two k16 steps per stage. Either way <= 64 fp32 accumulators.
// - End: each K warp writes its partial tile to shared memory (reusing the ring), all threads sum
//   the warps' tiles; with k_splits > 1 the k_splits CTAs of a column tile form one thread-block
//   cluster and sum their tiles through distributed shared memory, then bias, ReLU, store. One
//   launch, no workspace: CUDA-graph safe.
#include "skinny_gemm.h"
#include "split_k_tile.cuh"
#include "tc_pipeline.cuh"

#include <atomic>
#include <cstdint>

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace hybrid {
namespace {

namespace cg = cooperative_groups;
using namespace tc;  // NOLINT: the pipeline pieces (tc_pipeline.cuh)

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRedLd = kSkinnyTileN + 8;         // padded fp32 row of a partial tile (float2 stores
                                                 // of a half warp hit 16 different bank pairs)
static_assert(kSkinnyTileK * 2 == kStageK, "a stage is 1 or 2 of the 64-wide k blocks");

// gpu-scope acq_rel add (thread 0 of a cluster's leader, after a barrier over the cluster's stores):
// publishes them and, for the last arriver, acquires every other cluster's.
__device__ __forceinline__ unsigned int atom_add_acq_rel(unsigned int* c) {
  unsigned int old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(c) : "memory");
  return old;
}

__device__ __forceinline__ void prefetch_l2(const void* ptr) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr));
}

__device__ __forceinline__ float warp_allsum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// The block end's norm ("skinny_norm", SkinnyGemmParams::norm_w), run by the last cluster's CTAs
// once every column tile of res_out is stored (acquired by the caller): warps first_warp,
// first_warp + warps, ... each take one row and write its LayerNorm / RMSNorm with linear_norm's
// _splitk_add_norm_kernel rounding steps (two passes over the row for LayerNorm). Everything goes
// through the (free) ring with cp.async, so nothing lives in registers: the norm's weight and bias
// once per CTA (L2 hits: prefetched at the kernel's start), then each warp's row in a slot of its
// own (16-byte chunks lane, lane + 32, ...; L2, where the other clusters stored them).
constexpr int kNormParamBytes = kSkinnyNormMaxN * 2;  // one [N] weight of 2-byte elements
constexpr int kNormSmemBytes = 2 * kNormParamBytes + kWarps * kNormParamBytes;


template <typename T>
__device__ __forceinline__ void skinny_norm_rows(const SkinnyNormParams& p, int n, int m, unsigned char* smem, int first_warp,
                                                 int warps) {
  using T2 = typename Pair<T>::T2;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int chunks = n / 8;  // 16-byte chunks per row
  const bool rms = p.norm_b == nullptr;
  const float inv_n = 1.f / static_cast<float>(n);
  const uint32_t ring = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t w_s = ring, b_s = ring + kNormParamBytes;
  const uint32_t row_s = ring + 2 * kNormParamBytes + warp * kNormParamBytes;
  const char* nw = static_cast<const char*>(p.norm_w);
  const char* nb = static_cast<const char*>(p.norm_b);
  const char* res = static_cast<const char*>(p.res_out);
  auto load_row = [&](int row) {
    const char* src = res + static_cast<size_t>(row) * chunks * 16;
    for (int c = lane; c < chunks; c += 32) cp_async16(row_s + c * 16, src + c * 16, 16);
    cp_async_commit();
  };
  for (int c = threadIdx.x; c < chunks; c += kThreads) {
    cp_async16(w_s + c * 16, nw + c * 16, 16);
    if (!rms) cp_async16(b_s + c * 16, nb + c * 16, 16);
  }
  cp_async_commit();
  if (first_warp < m) load_row(first_warp);
  cp_async_wait<0>();
  __syncthreads();  // the weight / bias every warp reads
  const uint4* w_p = reinterpret_cast<const uint4*>(smem + (w_s - ring));
  const uint4* b_p = reinterpret_cast<const uint4*>(smem + (b_s - ring));
  const uint4* row_p = reinterpret_cast<const uint4*>(smem + (row_s - ring));
  auto pair = [](const uint4& v, int q) {
    const uint32_t u = q == 0 ? v.x : q == 1 ? v.y : q == 2 ? v.z : v.w;
    return Pair<T>::to_float2(*reinterpret_cast<const T2*>(&u));
  };
  for (int row = first_warp; row < m; row += warps) {
    if (row != first_warp) {
      __syncwarp();  // every lane is done with the slot's previous row
      load_row(row);
      cp_async_wait<0>();
      __syncwarp();
    }
    float sum = 0.f;
    for (int c = lane; c < chunks; c += 32) {
      const uint4 h = row_p[c];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float2 f = pair(h, q);
        sum += rms ? f.x * f.x + f.y * f.y : f.x + f.y;
      }
    }
    sum = warp_allsum(sum);
    float mean = 0.f, rstd;
    if (rms) {
      rstd = 1.f / sqrtf(sum * inv_n + p.eps);
    } else {
      mean = sum * inv_n;
      float var = 0.f;
      for (int c = lane; c < chunks; c += 32) {
        const uint4 h = row_p[c];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float2 f = pair(h, q);
          var += (f.x - mean) * (f.x - mean) + (f.y - mean) * (f.y - mean);
        }
      }
      rstd = 1.f / sqrtf(warp_allsum(var) * inv_n + p.eps);
    }
    uint4* dst = static_cast<uint4*>(p.out) + static_cast<size_t>(row) * chunks;
    for (int c = lane; c < chunks; c += 32) {
      const uint4 h = row_p[c], wv = w_p[c], bv = rms ? make_uint4(0u, 0u, 0u, 0u) : b_p[c];
      uint32_t o[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float2 f = pair(h, q), wf = pair(wv, q), bf = pair(bv, q);
        T2 r;
        if (rms) {  // as rmsnorm.py: normalised value rounded, times the weight, rounded once
          const float2 nv = Pair<T>::to_float2(Pair<T>::from_float2(make_float2(f.x * rstd, f.y * rstd)));
          r = Pair<T>::from_float2(make_float2(nv.x * wf.x, nv.y * wf.y));
        } else {  // as layernorm.py
          r = Pair<T>::from_float2(make_float2((f.x - mean) * rstd * wf.x + bf.x, (f.y - mean) * rstd * wf.y + bf.y));
        }
        o[q] = *reinterpret_cast<const uint32_t*>(&r);
      }
      dst[c] = make_uint4(o[0], o[1], o[2], o[3]);
    }
  }
}

template <int MT>
struct Config {
  static constexpr int kWN = MT <= 2 ? 1 : 2;          // warps along N
  static constexpr int kWK = kWarps / kWN;             // warps along K (k16 steps of a stage)
  static constexpr int kNT = kSkinnyTileN / 8 / kWN;   // n8 tiles per warp
  static constexpr int kStages = MT <= 2 ? 4 : 3;
  static constexpr int kXRows = MT * 16;
  static constexpr int kWBytes = kSkinnyTileN * kRowBytes;  // 16 KB
  static constexpr int kXBytes = kXRows * kRowBytes;
  static constexpr int kStageBytes = kWBytes + kXBytes;
  static constexpr int kRedBytes = kWK * kXRows * kRedLd * 4;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  static_assert(kRedBytes <= kSmemBytes, "the partial tiles reuse the ring");
  static_assert(2 * (kSmemBytes + 1024) <= 228 * 1024, "2 CTAs per SM");
  static_assert((kStageK / 16) % kWK == 0 && kNT % 2 == 0, "warp grid");
  static_assert(kNormSmemBytes <= kSmemBytes, "the block end's norm reuses the ring");
};

// MT: m16 tiles (ceil(M / 16)). kNorm: the block-end build, which reads `nrm` (the plain build
// ignores it).
template <typename T, bool kHalf, int MT, bool kNorm>
__global__ void __launch_bounds__(kThreads, 2) skinny_gemm_kernel(const SkinnyGemmParams p, const SkinnyNormParams nrm) {
  using C = Config<MT>;
  constexpr int WN = C::kWN, WK = C::kWK, NT = C::kNT, STAGES = C::kStages;
  extern __shared__ __align__(128) unsigned char smem[];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int wn = warp % WN;
  const int wk = warp / WN;
  const int K = p.k;
  const int n_cta = blockIdx.x * kSkinnyTileN;

  // This CTA's K slice in 64-wide blocks (uneven splits differ by one block), walked in stages of 2.
  const int blocks = K / kSkinnyTileK;
  const int b0 = static_cast<int>(static_cast<long long>(blocks) * blockIdx.y / p.k_splits);
  const int b1 = static_cast<int>(static_cast<long long>(blocks) * (blockIdx.y + 1) / p.k_splits);
  const int nstages = (b1 - b0 + 1) / 2;

  const uint32_t ring = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const size_t g_row = static_cast<size_t>(K) * sizeof(T);  // bytes per global row of x and W
  const char* wg = static_cast<const char*>(p.w) + static_cast<size_t>(n_cta) * g_row +
                   static_cast<size_t>(b0) * kSkinnyTileK * sizeof(T);
  const char* xg = static_cast<const char*>(p.x) + static_cast<size_t>(b0) * kSkinnyTileK * sizeof(T);

  // A stage is W (the stored weight: never written by a previous kernel) and x (the activations:
  // the previous kernel's output). Split so the prologue can stream W before griddepcontrol.wait.
  auto load_stage_w = [&](int st) {
    const uint32_t ws = ring + (st % STAGES) * C::kStageBytes;
    const int valid = min(kChunks, (b1 - b0 - 2 * st) * (kChunks / 2));  // 16 or 8 chunks per row
    const char* wsrc = wg + static_cast<size_t>(st) * kRowBytes;
#pragma unroll
    for (int i = 0; i < kSkinnyTileN * kChunks / kThreads; ++i) {  // a row's 16 chunks: 16 threads
      const int id = threadIdx.x + i * kThreads;
      const int row = id / kChunks, ch = id % kChunks;
      if (ch < valid) cp_async16(ws + swizzle(row, ch), wsrc + row * g_row + ch * 16, 16);
    }
  };
  auto load_stage_x = [&](int st) {
    const uint32_t xs = ring + (st % STAGES) * C::kStageBytes + C::kWBytes;
    const int valid = min(kChunks, (b1 - b0 - 2 * st) * (kChunks / 2));
    const char* xsrc = xg + static_cast<size_t>(st) * kRowBytes;
#pragma unroll
    for (int i = 0; i < C::kXRows * kChunks / kThreads; ++i) {
      const int id = threadIdx.x + i * kThreads;
      const int row = id / kChunks, ch = id % kChunks;
      if (ch < valid) {
        cp_async16(xs + swizzle(row, ch), xsrc + min(row, p.m - 1) * g_row + ch * 16, row < p.m ? 16 : 0);
      }
    }
  };
  auto load_stage = [&](int st) {
    load_stage_w(st);
    load_stage_x(st);
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;

  // ldmatrix.x4: lanes 8j..8j+7 address the rows of matrix j, which lands in register j.
  const int mat = lane >> 3;
  const int mrow = lane & 7;
  auto compute = [&](int st) {
    const uint32_t ws = ring + (st % STAGES) * C::kStageBytes;
    const uint32_t xs = ws + C::kWBytes;
    const int k16 = min(kStageK / 16, (b1 - b0 - 2 * st) * (kSkinnyTileK / 16));  // 8, or 4 in a half stage
#pragma unroll
    for (int j = 0; j < kStageK / 16 / WK; ++j) {
      const int kk = wk + j * WK;
      if (kk < k16) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {  // A: (rows 0-7, k 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15)
          ldmatrix_x4(a[mt][0], a[mt][1], a[mt][2], a[mt][3],
                      xs + swizzle(mt * 16 + (mat & 1) * 8 + mrow, kk * 2 + (mat >> 1)));
        }
        uint32_t b[NT][2];
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {  // B: (tile 2np, k 0-7), (2np, 8-15), (2np+1, 0-7), (2np+1, 8-15)
          ldmatrix_x4(b[2 * np][0], b[2 * np][1], b[2 * np + 1][0], b[2 * np + 1][1],
                      ws + swizzle((wn * NT + 2 * np + (mat >> 1)) * 8 + mrow, kk * 2 + (mat & 1)));
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma16816<kHalf>(acc[mt][nt], a[mt], b[nt][0], b[nt][1]);
      }
    }
  };

  // Ring: STAGES-1 stages in flight ahead of the one computed. One commit group per stage (empty
  // past the slice end) so wait_group<STAGES-2> always means "stage st has landed". The prologue's
  // W chunks go first, all into group 0, before griddepcontrol.wait: launched with programmatic
  // dependent launch (p.pdl) they stream while the previous kernel drains; x, which that kernel
  // writes, only after the wait. Group s then holds x(s) (and group 0 every prologue W), so
  // "groups 0..st complete" still covers W(st) and x(st). Without PDL the wait returns at once.
  using T2 = typename Pair<T>::T2;
  const T2* bias = static_cast<const T2*>(p.bias);
  // The epilogue's pair index i always has i % 32 == threadIdx.x % 32 (256 threads, 32 column pairs
  // per row), so each thread adds one bias pair: loaded here, with the weight prologue, before the
  // PDL wait (a parameter: no decode step writes it), not as a cold round trip in the tail.
  constexpr int kPairsPerRow = kSkinnyTileN / 2;
  static_assert(kThreads % kPairsPerRow == 0, "one bias pair per thread");
  const float2 bias_f = bias != nullptr ? Pair<T>::to_float2(bias[n_cta / 2 + threadIdx.x % kPairsPerRow])
                                        : make_float2(0.f, 0.f);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s)
    if (s < nstages) load_stage_w(s);
  if constexpr (kNorm) {  // the norm's weight / bias (parameters) into L2 for the last cluster's rows
    if (blockIdx.x == 0 && blockIdx.y == 0) {
      const int lines = p.n * static_cast<int>(sizeof(T)) / 128;  // N % 64 == 0
      const int total = nrm.norm_b != nullptr ? 2 * lines : lines;
      for (int i = threadIdx.x; i < total; i += kThreads) {
        const char* base = static_cast<const char*>(i < lines ? nrm.norm_w : nrm.norm_b);
        prefetch_l2(base + static_cast<size_t>(i % lines) * 128);
      }
    }
  }
  grid_dependency_wait();
  // the KV-cache slots of the rows (written by an earlier kernel of the step): read now, so the
  // epilogue's cache stores wait for no load (visible after the main loop's __syncthreads)
  __shared__ int64_t slots_sh[kSkinnyMaxM];
  if (p.k_cache != nullptr && threadIdx.x < p.m) slots_sh[threadIdx.x] = p.slots[threadIdx.x];
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nstages) load_stage_x(s);
    cp_async_commit();
  }
  // The next PDL kernel may start its own prologue on free SM slots. Not in the block-end build:
  // there the next kernel would take SM slots while this grid still streams (in the decode step the
  // next is the persistent MLP, one large CTA per SM; measured 6 us per layer slower with the early
  // trigger). It triggers when a CTA is done (exit), the last cluster before its norm rows.
  if constexpr (!kNorm) grid_launch_dependents();
  for (int st = 0; st < nstages; ++st) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // stage st visible to all; every warp is done with stage st-1's slot
    if (st + STAGES - 1 < nstages) load_stage(st + STAGES - 1);  // refills stage st-1's slot
    cp_async_commit();
    compute(st);
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring is free: reuse it for the partial tiles

  // Accumulator layout of m16n8: c0, c1 at (row g, cols 2t, 2t+1), c2, c3 at (row g + 8, same cols).
  float* red = reinterpret_cast<float*>(smem);
  constexpr int kSlab = C::kXRows * kRedLd;
  {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        float* at = red + wk * kSlab + (mt * 16 + g) * kRedLd + (wn * NT + nt) * 8 + 2 * t;
        *reinterpret_cast<float2*>(at) = make_float2(acc[mt][nt][0], acc[mt][nt][1]);
        *reinterpret_cast<float2*>(at + 8 * kRedLd) = make_float2(acc[mt][nt][2], acc[mt][nt][3]);
      }
  }
  __syncthreads();

  T2* y = static_cast<T2*>(p.y);
  const int pairs = p.m * kPairsPerRow;
  auto offset = [](int i) { return (i / kPairsPerRow) * kRedLd + 2 * (i % kPairsPerRow); };
  auto warp_sum = [&](int i) {
    float2 v = make_float2(0.f, 0.f);
#pragma unroll
    for (int w = 0; w < WK; ++w) {
      const float2 t = *reinterpret_cast<const float2*>(red + w * kSlab + offset(i));
      v.x += t.x;
      v.y += t.y;
    }
    return v;
  };
  auto store = [&](int i, float2 v) {
    const int row = i / kPairsPerRow;
    const int col = n_cta + 2 * (i % kPairsPerRow);  // i % kPairsPerRow == threadIdx.x % kPairsPerRow
    v.x += bias_f.x;  // zero without a bias
    v.y += bias_f.y;
    if constexpr (kNorm) {  // linear_norm's steps: the projection rounded, + residual, rounded
      const size_t at = (static_cast<size_t>(row) * p.n + col) / 2;
      float2 r = Pair<T>::to_float2(Pair<T>::from_float2(v));
      if (nrm.residual != nullptr) {
        const float2 res = Pair<T>::to_float2(static_cast<const T2*>(nrm.residual)[at]);
        r.x += res.x;
        r.y += res.y;
      }
      static_cast<T2*>(nrm.res_out)[at] = Pair<T>::from_float2(r);
      return;
    }
    if (p.relu) {
      v.x = fmaxf(v.x, 0.f);
      v.y = fmaxf(v.y, 0.f);
    }
    const T2 out = Pair<T>::from_float2(v);
    y[(static_cast<size_t>(row) * p.n + col) / 2] = out;
    if (p.k_cache != nullptr && col >= p.kv_col0 && col < p.kv_col0 + 2 * p.kv_width) {
      const int64_t slot = slots_sh[row];  // read after the PDL wait (above)
      if (slot >= 0 && slot < p.num_slots) {
        const bool is_v = col >= p.kv_col0 + p.kv_width;
        const int j = col - p.kv_col0 - (is_v ? p.kv_width : 0);
        T2* cache = static_cast<T2*>(is_v ? p.v_cache : p.k_cache);
        cache[(slot * p.kv_width + j) / 2] = out;
      }
    }
  };
  split_k_store<kThreads>(red, pairs, p.k_splits, warp_sum, offset, store);
#ifndef HYBRID_SKINNY_NORM_TAIL  // 0: no counter, no norm rows (a timing experiment's build; out unwritten)
#define HYBRID_SKINNY_NORM_TAIL 1
#endif
  if constexpr (kNorm && HYBRID_SKINNY_NORM_TAIL) {
    // Last arriver: the cluster's leader counts the column tiles whose res_out is stored (its
    // acq_rel add publishes the cluster's stores, ordered before it by the cluster barrier above /
    // the CTA barrier below, and acquires the earlier clusters'); the last one tells its peers
    // (distributed shared memory + a cluster barrier), zeroes the counter for the next launch and
    // its CTAs normalise every row. Nobody waits on another cluster.
    __shared__ unsigned int last_sh;
    if (p.k_splits > 1) {
      cg::cluster_group cluster = cg::this_cluster();
      if (cluster.block_rank() == 0 && threadIdx.x == 0) {
        const unsigned int last = atom_add_acq_rel(nrm.counter) == gridDim.x - 1;
        if (last) *nrm.counter = 0u;
        for (int c = 0; c < p.k_splits; ++c) *cluster.map_shared_rank(&last_sh, c) = last;
      }
      cluster.sync();
      grid_launch_dependents();
      if (last_sh) skinny_norm_rows<T>(nrm, p.n, p.m, smem, static_cast<int>(cluster.block_rank()) * kWarps + warp, p.k_splits * kWarps);
    } else {
      __syncthreads();  // the CTA's res_out stores before thread 0's release
      if (threadIdx.x == 0) {
        const unsigned int last = atom_add_acq_rel(nrm.counter) == gridDim.x - 1;
        if (last) *nrm.counter = 0u;
        last_sh = last;
      }
      __syncthreads();
      grid_launch_dependents();
      if (last_sh) skinny_norm_rows<T>(nrm, p.n, p.m, smem, warp, kWarps);
    }
  }
}

template <typename T, bool kHalf, int MT, bool kNorm = false>
cudaError_t prepare() {  // > 48 KB of dynamic shared memory (tc_pipeline.cuh)
  using K = decltype(&skinny_gemm_kernel<T, kHalf, MT, kNorm>);
  return opt_in_shared_memory<K, &skinny_gemm_kernel<T, kHalf, MT, kNorm>, Config<MT>::kSmemBytes>();
}

template <typename T, bool kHalf, int MT, bool kNorm>
cudaError_t launch_tiles(const SkinnyGemmParams& p, const SkinnyNormParams& nrm, cudaStream_t stream) {
  if (const cudaError_t err = prepare<T, kHalf, MT, kNorm>(); err != cudaSuccess) return err;
  return launch_split_k_grid(skinny_gemm_kernel<T, kHalf, MT, kNorm>, p.n / kSkinnyTileN, p.k_splits, kThreads,
                             Config<MT>::kSmemBytes, p.pdl, stream, p, nrm);
}

template <typename T, bool kHalf>
cudaError_t launch_typed(const SkinnyGemmParams& p, const SkinnyNormParams* norm, cudaStream_t stream) {
  if (norm != nullptr) {
    return with_m_tiles(p.m, [&](auto mt) { return launch_tiles<T, kHalf, decltype(mt)::value, true>(p, *norm, stream); });
  }
  return with_m_tiles(p.m, [&](auto mt) {
    return launch_tiles<T, kHalf, decltype(mt)::value, false>(p, SkinnyNormParams{}, stream);
  });
}

// Clusters of k_splits CTAs the whole device holds at once (cudaOccupancyMaxActiveClusters: a
// cluster's CTAs must share a GPC, so this can be less than SMs x CTAs/SM / k_splits).
template <typename T, bool kHalf, int MT>
cudaError_t clusters_tiles(int k_splits, int* clusters) {
  if (const cudaError_t err = prepare<T, kHalf, MT>(); err != cudaSuccess) return err;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(1, k_splits, 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = Config<MT>::kSmemBytes;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = k_splits;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaOccupancyMaxActiveClusters(clusters, skinny_gemm_kernel<T, kHalf, MT, false>, &cfg);
}

template <typename T, bool kHalf>
cudaError_t clusters_typed(int m, int k_splits, int* clusters) {
  return with_m_tiles(m, [&](auto mt) { return clusters_tiles<T, kHalf, decltype(mt)::value>(k_splits, clusters); });
}

}  // namespace

cudaError_t skinny_gemm_max_active_clusters(bool half_precision, int m, int k_splits, int* clusters) {
  if (m < 1 || m > kSkinnyMaxM || k_splits < 1 || k_splits > kSkinnyMaxKSplits) return cudaErrorInvalidValue;
  return half_precision ? clusters_typed<__half, true>(m, k_splits, clusters)
                        : clusters_typed<__nv_bfloat16, false>(m, k_splits, clusters);
}

cudaError_t launch_skinny_gemm(bool half_precision, const SkinnyGemmParams& p, cudaStream_t stream,
                               const SkinnyNormParams* norm) {
  if (p.m < 1 || p.m > kSkinnyMaxM || p.n <= 0 || p.n % kSkinnyTileN != 0 || p.k <= 0 ||
      p.k % kSkinnyTileK != 0 || p.k_splits < 1 || p.k_splits > kSkinnyMaxKSplits) {
    return cudaErrorInvalidValue;
  }
  if (norm != nullptr && (p.n > kSkinnyNormMaxN || norm->res_out == nullptr || norm->out == nullptr ||
                          norm->norm_w == nullptr || norm->counter == nullptr || p.k_cache != nullptr || p.relu)) {
    return cudaErrorInvalidValue;
  }
  return half_precision ? launch_typed<__half, true>(p, norm, stream)
                        : launch_typed<__nv_bfloat16, false>(p, norm, stream);
}

}  // namespace hybrid
