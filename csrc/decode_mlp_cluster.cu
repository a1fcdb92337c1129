// The persistent decode MLP's cluster schedule (decode_mlp.h, launch_decode_mlp_cluster): fc1 ->
// ReLU -> fc2's split-K partials in one launch with no grid-wide dependency at all.
//
// The grid is one CTA per fc1 tile (ffn / 64 CTAs), in thread-block clusters of `cluster` CTAs.
// Cluster c owns K slice c of fc2: the cluster * 64 ffn columns its CTAs produce in fc1. CTA r of
// the cluster streams, through ONE ring with no drain between:
//
//   fc1 tile u = c * cluster + r   (w1 rows 64 u.., all of hidden; x from the ring)
//   -> bias, ReLU, rounded: the [M, 64] act tile, written into EVERY peer's shared act area
//      (st.shared::cluster, distributed shared memory), then one hardware cluster barrier
//   -> fc2 column tiles r, r + cluster, ... over K slice c (w2 rows 64 t.., columns of slice c),
//      x = the act area (the slice's [M, cluster * 64] act, never in global memory)
//   -> fp32 partial part[c][:, 64 t..] per column tile (no bias; linear_norm's split-K reduce +
//      bias + residual + norm kernel finishes the block, as after the other schedules)
//
// Why: in the flow schedule an fc2 unit waits for its K slice's 32 fc1
// tiles through a global counter, and those polls pass ~2.5 us after the last tile (they queue
// behind the SM's in-flight weight loads); that wait and the per-unit ring drains are most of the
// ~7 us the flow launch loses against its bytes. Here the only wait is a cluster barrier between 8
// CTAs that started together (no memory polls), the fc2 weights stream into the ring across it
// (they are stored weights), and act moves SM to SM. The price: ffn / (64 * cluster) partials
// (OPT-1.3B: 16) for the reduce kernel to sum instead of 4. No CTA waits for another cluster, so
// the grid needs no co-residency and there are no counters to reset.
//
// Measured (NVIDIA H200, csrc/NOTES.md "Session 12"): correct, but slower than the flow schedule.
// The card holds 15 clusters of 8 one-SM CTAs at once (and 7 of 16), so OPT-1.3B's 16 clusters run in
// two waves, and even the first wave streamed fc2 at ~2.5 TB/s. Not offered by the autotune.
#include "decode_mlp_core.cuh"

namespace hybrid {
namespace {

template <int MT>
struct ClusterCfg {
  using C = Config<MT>;
  static constexpr int kStages = MT == 1 ? HYBRID_MLP_STAGES_M16 : 5;  // M 17-32: 5 (the act area must fit)
  static constexpr int kRingBytes = kStages * C::kStageBytes;
  static constexpr int kFixedBytes = kRingBytes + C::kRedBytes;
  // + the act area: cluster / 2 blocks of [16 MT rows, 128 k] in the x slots' swizzled layout
  static constexpr int smem(int cluster) { return kFixedBytes + cluster / 2 * C::kXBytes; }
};

__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_arrive_release() {
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait_acquire() {
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ uint32_t peer_address(uint32_t local, uint32_t rank) {
  uint32_t out;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(out) : "r"(local), "r"(rank));
  return out;
}
__device__ __forceinline__ void st_cluster16(uint32_t addr, uint4 v) {
  asm volatile("st.shared::cluster.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z),
               "r"(v.w)
               : "memory");
}

template <typename T, bool kHalf, int MT>
__global__ void __launch_bounds__(kThreads, 1) decode_mlp_cluster_kernel(const DecodeMlpParams p, const int cl) {
  using C = Config<MT>;
  using CC = ClusterCfg<MT>;
  constexpr int STAGES = CC::kStages;
  constexpr int NT = C::kNT;
  using T2 = typename Pair<T>::T2;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t ring = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  float* red = reinterpret_cast<float*>(smem + CC::kRingBytes);
  const uint32_t act_s = ring + CC::kFixedBytes;

  // the stored weights and parameters may be read before griddepcontrol.wait; x only after it
  cluster_arrive_relaxed();  // "started": peers may write into this CTA's act area once all arrived
  stamp(p, 0);
  const int u = blockIdx.x;  // fc1 tile; clusters are consecutive CTAs along x
  const int r = u % cl, c = u / cl;
  const size_t row1 = static_cast<size_t>(p.hidden) * sizeof(T);  // bytes per row of x and w1
  const size_t row2 = static_cast<size_t>(p.ffn) * sizeof(T);     // bytes per row of w2
  const int nblk1 = p.hidden / kMlpTile;
  const int s1 = (nblk1 + 1) / 2;        // fc1 stages (the last one half when hidden % 128 == 64)
  const int sk = cl / 2;                 // stages per fc2 column tile: the slice's cl * 64 k
  const int n2 = p.hidden / kMlpTile / cl;  // fc2 column tiles of this CTA: r, r + cl, ...
  const int total = s1 + n2 * sk;
  const char* w1 = static_cast<const char*>(p.w1) + static_cast<size_t>(u) * kMlpTile * row1;
  const char* w2 = static_cast<const char*>(p.w2) + static_cast<size_t>(c) * cl * kMlpTile * sizeof(T);
  const char* xg = static_cast<const char*>(p.x);
  auto valid1 = [&](int g) { return min(kChunks, (nblk1 - 2 * g) * (kChunks / 2)); };
  auto tile_of = [&](int j) { return r + cl * (j / sk); };  // fc2 stage j's output column tile

  auto load_w = [&](int g) {
    const uint32_t ws = ring + (g % STAGES) * C::kStageBytes;
    const char* src;
    size_t pitch;
    int v;
    if (g < s1) {
      src = w1 + static_cast<size_t>(g) * kRowBytes;
      pitch = row1;
      v = valid1(g);
    } else {
      const int j = g - s1;
      src = w2 + static_cast<size_t>(tile_of(j)) * kMlpTile * row2 + static_cast<size_t>(j % sk) * kRowBytes;
      pitch = row2;
      v = kChunks;
    }
#pragma unroll
    for (int i = 0; i < kMlpTile * kChunks / kThreads; ++i) {
      const int id = threadIdx.x + i * kThreads;
      const int row = id / kChunks, ch = id % kChunks;
      if (ch < v) cp_async16(ws + swizzle(row, ch), src + row * pitch + ch * 16, 16);
    }
  };
  auto load_x = [&](int g) {  // fc1 stages only; rows past M zero-filled
    const uint32_t xs = ring + (g % STAGES) * C::kStageBytes + C::kWBytes;
    const int v = valid1(g);
    const char* src = xg + static_cast<size_t>(g) * kRowBytes;
#pragma unroll
    for (int i = 0; i < C::kXRows * kChunks / kThreads; ++i) {
      const int id = threadIdx.x + i * kThreads;
      const int row = id / kChunks, ch = id % kChunks;
      if (ch < v) cp_async16(xs + swizzle(row, ch), src + min(row, p.m - 1) * row1 + ch * 16, row < p.m ? 16 : 0);
    }
  };
  auto compute = [&](int g, float (&acc)[MT][NT][4]) {  // x: the ring's slot (fc1) or the act area (fc2)
    const uint32_t ws = ring + (g % STAGES) * C::kStageBytes;
    const uint32_t xs = g < s1 ? ws + C::kWBytes : act_s + ((g - s1) % sk) * C::kXBytes;
    mma_stage<kHalf, MT>(ws, xs, g < s1 ? min(kStageK / 16, (nblk1 - 2 * g) * (kMlpTile / 16)) : kStageK / 16, acc);
  };

  // this thread's act chunk (8 columns = 4 pairs of the tile: chunk threadIdx.x % 8 of every row it
  // writes) and its b1 pairs, loaded with the prologue (parameters)
  static_assert(kThreads % (kMlpTile / 8) == 0, "one act chunk column per thread");
  const int ach = threadIdx.x % (kMlpTile / 8);
  float2 bias[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    bias[q] = p.b1 != nullptr ? Pair<T>::to_float2(static_cast<const T2*>(p.b1)[(u * kMlpTile + ach * 8) / 2 + q])
                              : make_float2(0.f, 0.f);
  }
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {  // the W prologue, one commit group per stage
    if (s < total) load_w(s);
    cp_async_commit();
  }
  grid_dependency_wait();
  stamp(p, 1);
  {  // x of the prologue's fc1 stages: plain L2 loads, all issued before the first store
    constexpr int kPer = C::kXRows * kChunks / kThreads;
    uint4 v[STAGES - 1][kPer];
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      const int lim = s < s1 ? valid1(s) : 0;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int id = threadIdx.x + i * kThreads;
        const int row = id / kChunks, ch = id % kChunks;
        v[s][i] = make_uint4(0u, 0u, 0u, 0u);
        if (ch < lim && row < p.m)
          v[s][i] = __ldcg(reinterpret_cast<const uint4*>(xg + static_cast<size_t>(s) * kRowBytes + row * row1 + ch * 16));
      }
    }
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      const int lim = s < s1 ? valid1(s) : 0;
      const uint32_t xs = ring + s * C::kStageBytes + C::kWBytes;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int id = threadIdx.x + i * kThreads;
        const int row = id / kChunks, ch = id % kChunks;
        if (ch < lim) st_shared16(xs + swizzle(row, ch), v[s][i]);
      }
    }
  }

  float acc[MT][NT][4];
  auto zero = [&]() {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;
  };
  zero();
  for (int g = 0; g < total; ++g) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // stage g visible to all; every warp is done with stage g-1's slot (and red)
    if (g + STAGES - 1 < total) {
      load_w(g + STAGES - 1);
      if (g + STAGES - 1 < s1) load_x(g + STAGES - 1);
    }
    cp_async_commit();
    compute(g, acc);
    if (g == s1 - 1) {
      // fc1 done: + b1, ReLU, rounded; the tile's 16-byte chunks into every peer's act area (rows
      // past M as zeros), then the cluster barrier: after it every CTA holds the slice's act
      stamp(p, 2);
      stash<MT>(red, acc);
      zero();
      cluster_wait_acquire();  // every peer has started (its act area exists)
      __syncthreads();
      for (int i = threadIdx.x; i < C::kXRows * (kMlpTile / 8); i += kThreads) {
        const int row = i / (kMlpTile / 8);
        uint32_t w[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          float2 v = warp_sum<MT>(red, row, ach * 4 + q);
          v.x += bias[q].x;
          v.y += bias[q].y;
          if (p.relu) {
            v.x = fmaxf(v.x, 0.f);
            v.y = fmaxf(v.y, 0.f);
          }
          if (row >= p.m) v = make_float2(0.f, 0.f);
          const T2 h = Pair<T>::from_float2(v);
          w[q] = *reinterpret_cast<const uint32_t*>(&h);
        }
        const uint32_t local = act_s + (r / 2) * C::kXBytes + swizzle(row, (r % 2) * (kMlpTile / 8) + ach);
        const uint4 chunk = make_uint4(w[0], w[1], w[2], w[3]);
        for (int q = 0; q < cl; ++q) st_cluster16(peer_address(local, static_cast<uint32_t>(q)), chunk);
      }
      stamp(p, 3);
      cluster_arrive_release();
      cluster_wait_acquire();  // the slice's act complete in this CTA's act area
      stamp(p, 4);
      grid_launch_dependents();  // the split-K norm kernel after this may get resident
    } else if (g >= s1 && (g - s1) % sk == sk - 1) {
      // fc2 column tile done: its fp32 partial (no bias). red is read here and next written sk >= 1
      // iterations later, after the loop-top barrier
      stash<MT>(red, acc);
      zero();
      __syncthreads();
      float* part = p.part + static_cast<size_t>(c) * p.m * p.hidden + tile_of(g - s1) * kMlpTile;
      for (int i = threadIdx.x; i < p.m * (kMlpTile / 2); i += kThreads) {
        const int row = i / (kMlpTile / 2), c2 = i % (kMlpTile / 2);
        *reinterpret_cast<float2*>(part + static_cast<size_t>(row) * p.hidden + 2 * c2) = warp_sum<MT>(red, row, c2);
      }
    }
  }
  cp_async_wait<0>();
  stamp(p, 5);
  stamp(p, 7);
}

constexpr int kMaxDevicesHere = 64;

// > 48 KB of dynamic shared memory (the largest any cluster size needs), and cluster sizes past 8
template <typename T, bool kHalf, int MT>
cudaError_t prepare_cluster() {
  static std::atomic<bool> done[kMaxDevicesHere] = {};
  int dev = 0;
  if (const cudaError_t err = cudaGetDevice(&dev); err != cudaSuccess) return err;
  if (dev >= 0 && dev < kMaxDevicesHere && done[dev].load(std::memory_order_acquire)) return cudaSuccess;
  auto kernel = decode_mlp_cluster_kernel<T, kHalf, MT>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxSmem);
  if (err == cudaSuccess) err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  if (err == cudaSuccess && dev >= 0 && dev < kMaxDevicesHere) done[dev].store(true, std::memory_order_release);
  return err;
}

template <typename T, bool kHalf, int MT>
cudaLaunchConfig_t cluster_config(const DecodeMlpParams& p, int cluster, cudaStream_t stream,
                                  cudaLaunchAttribute (&attr)[2]) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(p.ffn / kMlpTile, 1, 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = ClusterCfg<MT>::smem(cluster);
  cfg.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.numAttrs = 1;
  if (p.pdl) {
    attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[1].val.programmaticStreamSerializationAllowed = 1;
    cfg.numAttrs = 2;
  }
  cfg.attrs = attr;
  return cfg;
}

template <typename T, bool kHalf, int MT>
cudaError_t launch_cluster_tiles(const DecodeMlpParams& p, int cluster, cudaStream_t stream) {
  if (ClusterCfg<MT>::smem(cluster) > kMaxSmem) return cudaErrorInvalidValue;
  if (const cudaError_t err = prepare_cluster<T, kHalf, MT>(); err != cudaSuccess) return err;
  cudaLaunchAttribute attr[2];
  const cudaLaunchConfig_t cfg = cluster_config<T, kHalf, MT>(p, cluster, stream, attr);
  return cudaLaunchKernelEx(&cfg, decode_mlp_cluster_kernel<T, kHalf, MT>, p, cluster);
}

template <typename T, bool kHalf, int MT>
cudaError_t active_cluster_tiles(const DecodeMlpParams& p, int cluster, int* clusters) {
  if (ClusterCfg<MT>::smem(cluster) > kMaxSmem) return cudaErrorInvalidValue;
  if (const cudaError_t err = prepare_cluster<T, kHalf, MT>(); err != cudaSuccess) return err;
  cudaLaunchAttribute attr[2];
  DecodeMlpParams q = p;
  q.pdl = false;
  const cudaLaunchConfig_t cfg = cluster_config<T, kHalf, MT>(q, cluster, nullptr, attr);
  return cudaOccupancyMaxActiveClusters(clusters, decode_mlp_cluster_kernel<T, kHalf, MT>, &cfg);
}

}  // namespace

bool decode_mlp_cluster_valid(const DecodeMlpParams& p, int cluster) {
  return (cluster == 2 || cluster == 4 || cluster == 8 || cluster == 16) && p.m >= 1 && p.m <= kMlpClusterMaxM &&
         p.hidden > 0 && p.hidden % (kMlpTile * cluster) == 0 && p.ffn > 0 && p.ffn % (kMlpTile * cluster) == 0 &&
         p.k_splits == p.ffn / (kMlpTile * cluster) && p.part != nullptr &&
         (p.m <= 16 ? ClusterCfg<1>::smem(cluster) : ClusterCfg<2>::smem(cluster)) <= kMaxSmem;
}

cudaError_t launch_decode_mlp_cluster(bool half_precision, const DecodeMlpParams& p, int cluster,
                                      cudaStream_t stream) {
  if (!decode_mlp_cluster_valid(p, cluster)) return cudaErrorInvalidValue;
  auto go = [&](auto mt) {
    constexpr int MT = decltype(mt)::value;
    return half_precision ? launch_cluster_tiles<__half, true, MT>(p, cluster, stream)
                          : launch_cluster_tiles<__nv_bfloat16, false, MT>(p, cluster, stream);
  };
  return p.m <= 16 ? go(std::integral_constant<int, 1>{}) : go(std::integral_constant<int, 2>{});
}

cudaError_t decode_mlp_cluster_active(bool half_precision, const DecodeMlpParams& p, int cluster, int* clusters) {
  if (!decode_mlp_cluster_valid(p, cluster)) return cudaErrorInvalidValue;
  auto go = [&](auto mt) {
    constexpr int MT = decltype(mt)::value;
    return half_precision ? active_cluster_tiles<__half, true, MT>(p, cluster, clusters)
                          : active_cluster_tiles<__nv_bfloat16, false, MT>(p, cluster, clusters);
  };
  return p.m <= 16 ? go(std::integral_constant<int, 1>{}) : go(std::integral_constant<int, 2>{});
}

}  // namespace hybrid
