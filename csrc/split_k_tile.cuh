// The end of a split-K column tile, shared by the skinny GEMMs (skinny_gemm.cu, skinny_wgmma.cu):
// the device-side sum of the k_splits CTAs of one cluster, and the host-side launch of such a grid.
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

namespace hybrid {
namespace tc {

// own(i): this CTA's fp32 pair i (i < pairs) of the tile; offset(i): where pair i sits in the
// CTA's shared partial tile `red`. With k_splits > 1 every CTA first writes its own pairs in place,
// then (after a cluster barrier) rank r sums every k_splits-th run of kThreads pairs over the
// cluster's shared memory (distributed shared memory) and hands each sum to store(i, v); a second
// barrier keeps every CTA's tile alive until its peers have read it. Without a split the CTA stores
// its own pairs.
template <int kThreads, typename Own, typename Offset, typename Store>
__device__ __forceinline__ void split_k_store(float* red, int pairs, int k_splits, Own own, Offset offset,
                                              Store store) {
  namespace cg = cooperative_groups;
  if (k_splits > 1) {
    for (int i = threadIdx.x; i < pairs; i += kThreads) {  // each thread owns its pairs: in place
      *reinterpret_cast<float2*>(red + offset(i)) = own(i);
    }
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every CTA's summed tile is complete
    const int rank = static_cast<int>(cluster.block_rank());
    for (int i = rank * kThreads + threadIdx.x; i < pairs; i += k_splits * kThreads) {
      float2 v = make_float2(0.f, 0.f);
      for (int c = 0; c < k_splits; ++c) {
        const float2 t = *reinterpret_cast<const float2*>(cluster.map_shared_rank(red, c) + offset(i));
        v.x += t.x;
        v.y += t.y;
      }
      store(i, v);
    }
    cluster.sync();  // peers read this CTA's shared memory: it must outlive their reads
  } else {
    for (int i = threadIdx.x; i < pairs; i += kThreads) store(i, own(i));
  }
}

// Launches kernel(args...) on a (tiles, k_splits) grid of `threads`-thread CTAs with `smem` bytes of
// dynamic shared memory: the k_splits CTAs of a column tile as one (1, k_splits, 1) cluster, and
// with programmatic dependent launch where pdl (the kernel waits for the previous one itself).
template <typename... Params, typename... Args>
cudaError_t launch_split_k_grid(void (*kernel)(Params...), int tiles, int k_splits, int threads, int smem, bool pdl,
                                cudaStream_t stream, const Args&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(tiles, k_splits, 1);
  cfg.blockDim = dim3(threads, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  unsigned n = 0;
  if (k_splits > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = 1;
    attr[n].val.clusterDim.y = k_splits;
    attr[n].val.clusterDim.z = 1;
    ++n;
  }
  if (pdl) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  cfg.attrs = attr;
  cfg.numAttrs = n;
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

}  // namespace tc
}  // namespace hybrid
