// Tensor-core pipeline pieces shared by the skinny GEMM (skinny_gemm.cu) and the persistent decode
// MLP (decode_mlp.cu): the swizzled 256-byte shared rows of a 128-k stage, 16-byte cp.async with
// zero-fill, ldmatrix.x4, mma.sync m16n8k16 (fp32 accumulation) and the sm_90 programmatic
// dependent launch controls. tests/hybrid/test_skinny_gemm_layout.py transliterates the index math.
#pragma once

#include <atomic>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace hybrid {
namespace tc {

constexpr int kStageK = 128;               // k per pipeline stage
constexpr int kChunks = kStageK * 2 / 16;  // 16-byte chunks per shared row (16)
constexpr int kRowBytes = kChunks * 16;    // 256

// Chunk c of shared row r sits at c ^ (r & 7): the 8 row addresses of every ldmatrix phase hit 8
// different bank quads, and cp.async writes stay whole 16-byte chunks.
__device__ __forceinline__ uint32_t swizzle(int row, int chunk) {
  return static_cast<uint32_t>(row * kRowBytes + ((chunk ^ (row & 7)) << 4));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  // src_bytes 0 zero-fills (x rows past M); L2::256B: the 16 threads of a row cover 256 B.
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}
// Programmatic dependent launch (sm_90): wait for the previous kernel's memory; let the next start.
// Both are no-ops for a kernel launched without the PDL attribute.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

template <bool kHalf>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (kHalf) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
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

// ---- host side: what every kernel built on these pieces needs at launch

// Dynamic shared memory above 48 KB needs the opt-in attribute, set once per kernel and device
// (it belongs to the device's context) before the first launch or occupancy query. Not a stream
// operation, so it is also legal inside a CUDA-graph capture. One flag set per instantiation.
constexpr int kMaxDevices = 64;

template <typename Kernel, Kernel kKernel, int kBytes>
cudaError_t opt_in_shared_memory() {
  static std::atomic<bool> done[kMaxDevices] = {};
  int dev = 0;
  if (const cudaError_t err = cudaGetDevice(&dev); err != cudaSuccess) return err;
  if (dev >= 0 && dev < kMaxDevices && done[dev].load(std::memory_order_acquire)) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
  if (err == cudaSuccess && dev >= 0 && dev < kMaxDevices) done[dev].store(true, std::memory_order_release);
  return err;
}

// f(std::integral_constant<int, MT>{}) for the m16 tiles of m rows (1..4; more rows clamp to 4):
// turns the runtime row count into the kernels' compile-time tile count.
template <typename F>
cudaError_t with_m_tiles(int m, F&& f) {
  switch ((m + 15) / 16) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 3:
      return f(std::integral_constant<int, 3>{});
    default:
      return f(std::integral_constant<int, 4>{});
  }
}

}  // namespace tc
}  // namespace hybrid
