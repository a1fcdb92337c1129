// Hopper warpgroup MMA pieces shared by the wgmma kernels (skinny_wgmma.cu, skinny_streamk.cu):
// the K-major 128-byte-swizzle shared-memory descriptor, the wgmma fence / commit / wait, and
// D[64 x 64] += A[64 x 16] * B[16 x 64] with both operands in shared memory, fp32 accumulation.
// Only where wgmma exists (sm_90a) and in the host pass, which sees the kernels that use them.
#pragma once

#include <cstdint>

namespace hybrid {
namespace wg {

// Whether this build targets sm_90a (HYBRID_SM90A, set by cuda_backend.arch_flags / setup.py on
// H100 / H200): the wgmma kernels' launchers refuse to run otherwise.
#if defined(HYBRID_SM90A)
constexpr bool kSm90aBuild = true;
#else
constexpr bool kSm90aBuild = false;
#endif

#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
// wgmma shared-memory descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t wg_desc(uint32_t smem_addr) {
  return static_cast<uint64_t>((smem_addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
// All but the newest committed group complete (one group stays in flight).
__device__ __forceinline__ void wg_wait_one() { asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory"); }
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
// Keeps the compiler from touching an accumulator between a wgmma and the wait that completes it.
__device__ __forceinline__ void pin(float (&d)[32]) {
#pragma unroll
  for (int i = 0; i < 32; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// D[64 x 64] += A[64 x 16] (x, K-major) * B[16 x 64] (W rows, K-major), fp32 accumulation.
template <bool kHalf>
__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[32], uint64_t a, uint64_t b) {
#define HYBRID_WG_OUT                                                                                          \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), \
      "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),  \
      "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), \
      "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define HYBRID_WG_REGS                                                                                         \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31}"
  if constexpr (kHalf) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " HYBRID_WG_REGS ", %32, %33, p, 1, 1, 0, 0;\n}\n"
                 : HYBRID_WG_OUT
                 : "l"(a), "l"(b));
  } else {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " HYBRID_WG_REGS ", %32, %33, p, 1, 1, 0, 0;\n}\n"
                 : HYBRID_WG_OUT
                 : "l"(a), "l"(b));
  }
#undef HYBRID_WG_OUT
#undef HYBRID_WG_REGS
}
#endif  // wgmma targets

}  // namespace wg
}  // namespace hybrid
