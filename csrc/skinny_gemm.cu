// Skinny (decode) GEMM: y[M, N] = act(x[M, K] @ w[N, K]^T + b), M <= 64, bf16/fp16 in and out, fp32
// accumulation on tensor cores (mma.sync m16n8k16). Memory-bound: the weight is the whole stream,
// so every W byte is read once, with 16-byte loads, straight from the stored [N, K] layout.
//
// Fragment trick (tests/hybrid/test_skinny_gemm_layout.py transliterates it): lane l loads
// W[n + l/4, kb + (l%4)*8 .. +8] (one uint4 = 4 registers of 2 values). The mma's B fragment for
// lane l wants k slots (l%4)*2+{0,1} (reg 0) and 8+(l%4)*2+{0,1} (reg 1) of column l/4, so
// {w.x, w.y} feed one mma and {w.z, w.w} a second one: the k32 chunk is consumed as two k16 mmas
// over a permuted k order. A dot product does not care about the order as long as x uses the same
// one, so the A fragment (rows l/4 and l/4+8, same k slots) is read from x at the same physical
// offsets: a = {xa.x, xb.x, xa.y, xb.y} and {xa.z, xb.z, xa.w, xb.w} with xa/xb the uint4 of rows
// l/4 and l/4+8 at kb + (l%4)*8.
//
// CTA = 8 warps over a 64-column tile: WN warps along N (NT n8 tiles each) x WK warps along K.
// Grid (N/64, k_splits): the k_splits CTAs of a column tile form one thread-block cluster and each
// takes a K slice; partials are summed in shared memory (warps) and then across the cluster
// through distributed shared memory, where bias and ReLU are applied: one launch, no workspace,
// CUDA-graph safe. x (<= 64 rows) is read with L1-cached 16-byte loads (the WN warps of a CTA
// read the same x slice); W with L1::no_allocate streaming loads.
#include "skinny_gemm.h"

#include <cstdint>

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace cg = cooperative_groups;

namespace hybrid {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kLoadsInFlight = 16;  // 16-byte W loads per lane issued before the first mma of a block

__device__ __forceinline__ uint4 load_stream(const void* ptr) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(ptr));
  return v;
}

template <bool kHalf>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  if constexpr (kHalf) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

template <typename T>
struct Pair;
template <>
struct Pair<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static __device__ __forceinline__ float2 to_float2(T2 v) { return __bfloat1622float2(v); }
  static __device__ __forceinline__ T2 from_float2(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
};
template <>
struct Pair<__half> {
  using T2 = __half2;
  static __device__ __forceinline__ float2 to_float2(T2 v) { return __half22float2(v); }
  static __device__ __forceinline__ T2 from_float2(float2 v) { return __floats2half2_rn(v.x, v.y); }
};

// MT: m16 tiles (ceil(M / 16)); NT: n8 tiles per warp.
template <typename T, bool kHalf, int MT, int NT>
__global__ void __launch_bounds__(kThreads) skinny_gemm_kernel(const SkinnyGemmParams p) {
  constexpr int WN = kSkinnyTileN / (8 * NT);  // warps along N
  constexpr int WK = kWarps / WN;              // warps along K
  constexpr int U = kLoadsInFlight / NT;       // k32 steps per unrolled block
  constexpr int LD = kSkinnyTileN + 4;         // padded row of the partial tile
  static_assert(WN * NT * 8 == kSkinnyTileN && WN * WK == kWarps, "warp grid must tile 64 columns");
  __shared__ __align__(16) float part[MT * 16 * LD];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int wn = warp % WN;
  const int wk = warp / WN;
  const int q = lane & 3;   // k quad: 8 consecutive k of the 32-wide step
  const int r = lane >> 2;  // W row within the n8 tile, x row within the m16 tile
  const int K = p.k;
  const int n_cta = blockIdx.x * kSkinnyTileN;

  // This warp's k32 steps: K/32 steps spread evenly over k_splits CTAs x WK warps.
  const int steps = K / 32;
  const int slices = p.k_splits * WK;
  const int slice = blockIdx.y * WK + wk;
  const int s0 = static_cast<int>(static_cast<long long>(steps) * slice / slices);
  const int s1 = static_cast<int>(static_cast<long long>(steps) * (slice + 1) / slices);

  const T* w = static_cast<const T*>(p.w) + static_cast<size_t>(n_cta + wn * NT * 8 + r) * K + q * 8;
  const size_t w_tile = static_cast<size_t>(8) * K;  // next n8 tile
  const T* x = static_cast<const T*>(p.x) + q * 8;
  int xo[MT][2];  // rows past M read row M-1: computed, never stored
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    xo[mt][0] = min(mt * 16 + r, p.m - 1) * K;
    xo[mt][1] = min(mt * 16 + r + 8, p.m - 1) * K;
  }

  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;

  auto compute = [&](const uint4(&wv)[NT], int s) {
    const int kb = s * 32;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const uint4 xa = __ldg(reinterpret_cast<const uint4*>(x + xo[mt][0] + kb));
      const uint4 xb = __ldg(reinterpret_cast<const uint4*>(x + xo[mt][1] + kb));
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        mma16816<kHalf>(acc[mt][nt], xa.x, xb.x, xa.y, xb.y, wv[nt].x, wv[nt].y);
        mma16816<kHalf>(acc[mt][nt], xa.z, xb.z, xa.w, xb.w, wv[nt].z, wv[nt].w);
      }
    }
  };

  int s = s0;
  for (; s + U <= s1; s += U) {
    uint4 wv[U][NT];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) wv[u][nt] = load_stream(w + nt * w_tile + (s + u) * 32);
#pragma unroll
    for (int u = 0; u < U; ++u) compute(wv[u], s + u);
  }
  for (; s < s1; ++s) {
    uint4 wv[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) wv[nt] = load_stream(w + nt * w_tile + s * 32);
    compute(wv, s);
  }

  // Warps along K -> one partial tile in shared memory. Accumulator layout of m16n8: c0, c1 at
  // (row r, cols 2q, 2q+1), c2, c3 at (row r + 8, same cols).
  auto at = [&](int mt, int nt, int half) {
    return &part[(mt * 16 + r + 8 * half) * LD + wn * NT * 8 + nt * 8 + 2 * q];
  };
  if (wk == 0) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        *reinterpret_cast<float2*>(at(mt, nt, 0)) = make_float2(acc[mt][nt][0], acc[mt][nt][1]);
        *reinterpret_cast<float2*>(at(mt, nt, 1)) = make_float2(acc[mt][nt][2], acc[mt][nt][3]);
      }
  }
  // The other K warps add in turn (shared fp32 atomicAdd is a CAS loop on sm_90: slower).
#pragma unroll
  for (int j = 1; j < WK; ++j) {
    __syncthreads();
    if (wk == j) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          float2* lo = reinterpret_cast<float2*>(at(mt, nt, 0));
          float2* hi = reinterpret_cast<float2*>(at(mt, nt, 1));
          const float2 a = *lo, b = *hi;
          *lo = make_float2(a.x + acc[mt][nt][0], a.y + acc[mt][nt][1]);
          *hi = make_float2(b.x + acc[mt][nt][2], b.y + acc[mt][nt][3]);
        }
    }
  }
  __syncthreads();

  // Epilogue over column pairs: sum the cluster's partials, + bias, ReLU, round, store.
  using T2 = typename Pair<T>::T2;
  const T2* bias = static_cast<const T2*>(p.bias);
  T2* y = static_cast<T2*>(p.y);
  const int pairs = p.m * (kSkinnyTileN / 2);
  auto store = [&](int i, float2 v) {
    const int row = i / (kSkinnyTileN / 2);
    const int col = n_cta + 2 * (i % (kSkinnyTileN / 2));
    if (bias != nullptr) {
      const float2 b = Pair<T>::to_float2(bias[col / 2]);
      v.x += b.x;
      v.y += b.y;
    }
    if (p.relu) {
      v.x = fmaxf(v.x, 0.f);
      v.y = fmaxf(v.y, 0.f);
    }
    y[(static_cast<size_t>(row) * p.n + col) / 2] = Pair<T>::from_float2(v);
  };
  auto offset = [](int i) { return (i / (kSkinnyTileN / 2)) * LD + 2 * (i % (kSkinnyTileN / 2)); };
  if (p.k_splits > 1) {
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every CTA's partial tile is complete
    const int rank = static_cast<int>(cluster.block_rank());
    for (int i = rank * kThreads + threadIdx.x; i < pairs; i += p.k_splits * kThreads) {
      float2 v = make_float2(0.f, 0.f);
      for (int c = 0; c < p.k_splits; ++c) {
        const float2 t = *reinterpret_cast<const float2*>(cluster.map_shared_rank(part, c) + offset(i));
        v.x += t.x;
        v.y += t.y;
      }
      store(i, v);
    }
    cluster.sync();  // peers read this CTA's shared memory: it must outlive their reads
  } else {
    for (int i = threadIdx.x; i < pairs; i += kThreads) {
      store(i, *reinterpret_cast<const float2*>(part + offset(i)));
    }
  }
}

template <typename T, bool kHalf, int MT>
cudaError_t launch_tiles(const SkinnyGemmParams& p, cudaStream_t stream) {
  constexpr int NT = MT <= 2 ? 2 : 4;  // wider warp tiles at large M: fewer x fragment loads per W byte
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(p.n / kSkinnyTileN, p.k_splits, 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = p.k_splits;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = p.k_splits > 1 ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, skinny_gemm_kernel<T, kHalf, MT, NT>, p);
}

template <typename T, bool kHalf>
cudaError_t launch_typed(const SkinnyGemmParams& p, cudaStream_t stream) {
  switch ((p.m + 15) / 16) {
    case 1:
      return launch_tiles<T, kHalf, 1>(p, stream);
    case 2:
      return launch_tiles<T, kHalf, 2>(p, stream);
    case 3:
      return launch_tiles<T, kHalf, 3>(p, stream);
    default:
      return launch_tiles<T, kHalf, 4>(p, stream);
  }
}

template <typename T, bool kHalf, int MT>
cudaError_t occupancy_tiles(int* ctas) {
  constexpr int NT = MT <= 2 ? 2 : 4;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(ctas, skinny_gemm_kernel<T, kHalf, MT, NT>, kThreads, 0);
}

template <typename T, bool kHalf>
cudaError_t occupancy_typed(int m, int* ctas) {
  switch ((m + 15) / 16) {
    case 1:
      return occupancy_tiles<T, kHalf, 1>(ctas);
    case 2:
      return occupancy_tiles<T, kHalf, 2>(ctas);
    case 3:
      return occupancy_tiles<T, kHalf, 3>(ctas);
    default:
      return occupancy_tiles<T, kHalf, 4>(ctas);
  }
}

}  // namespace

cudaError_t skinny_gemm_ctas_per_sm(bool half_precision, int m, int* ctas) {
  if (m < 1 || m > kSkinnyMaxM) return cudaErrorInvalidValue;
  return half_precision ? occupancy_typed<__half, true>(m, ctas) : occupancy_typed<__nv_bfloat16, false>(m, ctas);
}

cudaError_t launch_skinny_gemm(bool half_precision, const SkinnyGemmParams& p, cudaStream_t stream) {
  if (p.m < 1 || p.m > kSkinnyMaxM || p.n <= 0 || p.n % kSkinnyTileN != 0 || p.k <= 0 ||
      p.k % kSkinnyTileK != 0 || p.k_splits < 1 || p.k_splits > kSkinnyMaxKSplits) {
    return cudaErrorInvalidValue;
  }
  return half_precision ? launch_typed<__half, true>(p, stream) : launch_typed<__nv_bfloat16, false>(p, stream);
}

}  // namespace hybrid
