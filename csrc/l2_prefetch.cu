// l2_prefetch: asks the L2 to fetch the first nbytes of a buffer from DRAM now, so a kernel that
// reads them soon (the next decode GEMM's weight) finds them in L2. Writes nothing: a pure hint,
// results never depend on it. Issued on a side stream it keeps DRAM busy across the launch gaps,
// ramp-ups and tails of the kernels on the main stream (hybrid/ops/l2_prefetch.py).
//
// mode 0: cp.async.bulk.prefetch.L2 (sm_90+), one instruction per 16 KB chunk, few threads.
// mode 1: prefetch.global.L2::evict_last, one instruction per 128-byte line, the lines kept in L2
//         with evict-last priority (sm_80+).
#include <algorithm>
#include <cstdint>

#include "launch.h"

namespace hybrid {
namespace {

constexpr int64_t kBulkChunk = 16384;
constexpr int64_t kLine = 128;
constexpr int kThreads = 128;

__global__ void l2_prefetch_bulk_kernel(const char* __restrict__ base, int64_t nbytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const int64_t chunks = (nbytes + kBulkChunk - 1) / kBulkChunk;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < chunks; i += stride) {
    const int64_t off = i * kBulkChunk;
    const int64_t left = nbytes - off;
    const uint32_t size = static_cast<uint32_t>(left < kBulkChunk ? left : kBulkChunk) & ~15u;
    if (size) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(base + off), "r"(size) : "memory");
  }
#endif
}

__global__ void l2_prefetch_line_kernel(const char* __restrict__ base, int64_t nbytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * kLine;
  for (int64_t off = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kLine; off < nbytes;
       off += stride)
    asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(base + off));
#endif
}

}  // namespace

cudaError_t launch_l2_prefetch(const void* base, int64_t nbytes, int mode, int sm_count, cudaStream_t stream) {
  if (nbytes <= 0) return cudaSuccess;
  const char* p = static_cast<const char*>(base);
  if (mode == 0) {
    const int64_t chunks = (nbytes + kBulkChunk - 1) / kBulkChunk;
    const int blocks = static_cast<int>(std::min<int64_t>((chunks + kThreads - 1) / kThreads, 16));
    l2_prefetch_bulk_kernel<<<blocks, kThreads, 0, stream>>>(p, nbytes);
  } else {
    const int64_t lines = (nbytes + kLine - 1) / kLine;
    const int blocks = static_cast<int>(std::min<int64_t>((lines + kThreads - 1) / kThreads, sm_count));
    l2_prefetch_line_kernel<<<blocks, kThreads, 0, stream>>>(p, nbytes);
  }
  return cudaGetLastError();
}

}  // namespace hybrid
