// wgmma issue rate in isolation (operands resident in shared memory, no loads, no barriers):
// how long one warpgroup MMA m64nNk16 (bf16 -> fp32) takes per SM, for N = 16 / 64 / 128 / 256,
// both operands from shared memory (SS) or A from registers (RS), with each unit of 4 k16 steps
// waited for (wait_group 0) or one unit left in flight (wait_group 1), and 1-3 warpgroups per SM.
// Question it answers (csrc/NOTES.md, "Session 14"): the stream-K / wgmma skinny GEMMs consume one
// 8 KB weight unit per ~0.4 us per SM, half what the copy rate needs, and a build whose consumers
// skip the wgmma streams at the copy rate, so is that the tensor core's rate for this shape?
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a bench/kernels/wgmma_rate.cu -o /tmp/wgmma_rate
//   /tmp/wgmma_rate            # one CTA per SM, prints a table; --json: JSON lines; --iters N
//
// The wgmma wrappers below are generated (one per shape: the accumulator count is part of the
// asm operand list). Operand contents are random bf16 in [-1, 1): zero data could run faster.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "micro_common.cuh"
#include "tc_pipeline.cuh"  // ldmatrix_x4, mma16816 (csrc/, on the include path)
#include "wgmma.cuh"        // the wgmma descriptor, fence, commit, wait

namespace wg = hybrid::wg;


template <int R>
__device__ __forceinline__ void pin(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
__device__ __forceinline__ unsigned long long now_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void wgmma_ss_n16(float (&d)[8], uint64_t a, uint64_t b) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, 0, 0;\n}\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
               : "l"(a), "l"(b));
}

__device__ __forceinline__ void wgmma_ss_n64(float (&d)[32], uint64_t a, uint64_t b) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
               : "l"(a), "l"(b));
}

__device__ __forceinline__ void wgmma_ss_n128(float (&d)[64], uint64_t a, uint64_t b) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
               : "l"(a), "l"(b));
}

__device__ __forceinline__ void wgmma_ss_n256(float (&d)[128], uint64_t a, uint64_t b) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, 0, 0;\n}\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
               : "l"(a), "l"(b));
}

__device__ __forceinline__ void wgmma_rs_n64(float (&d)[32], const uint32_t (&a)[4], uint64_t b) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

__device__ __forceinline__ void wgmma_rs_n256(float (&d)[128], const uint32_t (&a)[4], uint64_t b) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

template <int N, bool RS>
struct Mma;
#define HYBRID_SS(N)                                                                                     \
  template <>                                                                                            \
  struct Mma<N, false> {                                                                                 \
    __device__ static void run(float (&d)[N / 2], const uint32_t (&)[4][4], uint32_t a, uint32_t b, int j) { \
      wgmma_ss_n##N(d, wg::wg_desc(a + 32 * j), wg::wg_desc(b + 32 * j));                                \
    }                                                                                                    \
  };
HYBRID_SS(16)
HYBRID_SS(64)
HYBRID_SS(128)
HYBRID_SS(256)
#define HYBRID_RS(N)                                                                                     \
  template <>                                                                                            \
  struct Mma<N, true> {                                                                                  \
    __device__ static void run(float (&d)[N / 2], const uint32_t (&ar)[4][4], uint32_t, uint32_t b, int j) { \
      wgmma_rs_n##N(d, ar[j], wg::wg_desc(b + 32 * j));                                                  \
    }                                                                                                    \
  };
HYBRID_RS(64)
HYBRID_RS(256)

constexpr int kMaxThreads = 384;
constexpr int kSmem = 1024 + 8192 + 256 * 128;  // A [64 x 64 k], B [N x 64 k], 1024-aligned

template <int N, bool RS, bool PIPE>
__global__ void __launch_bounds__(kMaxThreads, 1) rate(int iters, unsigned long long* out, float* sink) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t a = (raw + 1023u) & ~1023u, b = a + 8192;
  unsigned char* base = smem_raw + (a - raw);
  uint32_t h = 2654435761u * (threadIdx.x + 1);
  for (int i = threadIdx.x; i < (8192 + N * 128) / 2; i += blockDim.x) {
    h = h * 1664525u + 1013904223u;
    reinterpret_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16(static_cast<float>(h >> 8) / 8388608.f - 1.f);
  }
  uint32_t ar[4][4];
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) ar[j][r] = 0x3c003c00u ^ (h + 17 * j + r);  // RS: A fragments in registers
  __syncthreads();
  float d[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) d[i] = 0.f;
  const unsigned long long t0 = now_ns();
  const long long c0 = clock64();
  for (int it = 0; it < iters; ++it) {
    wg::wg_fence();
#pragma unroll
    for (int j = 0; j < 4; ++j) Mma<N, RS>::run(d, ar, a, b, j);
    wg::wg_commit();
    if (PIPE) {
      wg::wg_wait_one();
    } else {
      wg::wg_wait_all();
    }
    pin(d);
  }
  wg::wg_wait_all();
  pin(d);
  const long long c1 = clock64();
  const unsigned long long t1 = now_ns();
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < N / 2; ++i) s += d[i];
  if (s == 12345.f) sink[threadIdx.x] = s;
  if (threadIdx.x % 128 == 0) {
    const int w = blockIdx.x * (kMaxThreads / 128) + threadIdx.x / 128;
    out[2 * w] = t1 - t0;
    out[2 * w + 1] = static_cast<unsigned long long>(c1 - c0);
  }
}

// mma.sync m16n8k16 (bf16 -> fp32) per SM, registers only or with the skinny GEMM's ldmatrix mix
// at 4 m16 tiles (per warp and 128-k stage: 32 mma.sync and 12 ldmatrix.x4 from shared memory).
template <bool LDSM>
__global__ void __launch_bounds__(256, 2) mma_sync_rate(int iters, unsigned long long* out, float* sink) {
  __shared__ __align__(128) uint32_t tile[32 * 256];  // 32 KB of bf16 pairs for the ldmatrix reads
  for (int i = threadIdx.x; i < 32 * 256; i += blockDim.x) tile[i] = 0x3c003c00u ^ (i * 2654435761u);
  __syncthreads();
  uint32_t a[4][4], b[4][2];
#pragma unroll
  for (int t = 0; t < 4; ++t) {
#pragma unroll
    for (int r = 0; r < 4; ++r) a[t][r] = 0x3c003c00u ^ (threadIdx.x * 7 + 3 * t + r);
    b[t][0] = 0x3c003c00u ^ (threadIdx.x + t);
    b[t][1] = 0x3c003c00u ^ (threadIdx.x + 5 * t);
  }
  float d[4][4][4] = {};
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(tile));
  const int lane = threadIdx.x & 31;
  const unsigned long long t0 = now_ns();
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {  // two k16 steps per stage
      if (LDSM) {  // 4 x-fragment loads (one per m16 tile) + 2 W loads (two n8 tiles each) per k16 step
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          const uint32_t addr = base + ((lane + 32 * t + 128 * ks) * 16) % (32 * 256 * 4);
          hybrid::tc::ldmatrix_x4(a[t][0], a[t][1], a[t][2], a[t][3], addr);
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t addr = base + ((lane + 32 * (4 + h) + 256 * ks) * 16) % (32 * 256 * 4);
          hybrid::tc::ldmatrix_x4(b[2 * h][0], b[2 * h][1], b[2 * h + 1][0], b[2 * h + 1][1], addr);
        }
      }
#pragma unroll
      for (int t = 0; t < 4; ++t) {
#pragma unroll
        for (int n = 0; n < 4; ++n) {
          hybrid::tc::mma16816<false>(d[t][n], a[t], b[n][0], b[n][1]);
        }
      }
    }
  }
  const unsigned long long t1 = now_ns();
  float sum = 0.f;
#pragma unroll
  for (int t = 0; t < 4; ++t)
#pragma unroll
    for (int n = 0; n < 4; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) sum += d[t][n][e];
  if (sum == 12345.f) sink[threadIdx.x] = sum;
  if (threadIdx.x == 0) out[blockIdx.x] = t1 - t0;
}

void mma_sync_row(bool ldsm, int sms, int iters, bool json) {
  unsigned long long* out;
  float* sink;
  const int ctas = 2 * sms;  // the skinny GEMM's 2 CTAs of 8 warps per SM
  CHECK(cudaMalloc(&out, sizeof(unsigned long long) * ctas));
  CHECK(cudaMalloc(&sink, sizeof(float) * 256));
  std::vector<unsigned long long> host(ctas);
  std::vector<double> ns;
  for (int rep = 0; rep < 3; ++rep) {
    if (ldsm) {
      mma_sync_rate<true><<<ctas, 256>>>(iters, out, sink);
    } else {
      mma_sync_rate<false><<<ctas, 256>>>(iters, out, sink);
    }
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaMemcpy(host.data(), out, sizeof(unsigned long long) * ctas, cudaMemcpyDeviceToHost));
    for (auto t : host) ns.push_back(static_cast<double>(t));
  }
  std::sort(ns.begin(), ns.end());
  const double per_stage_ns = ns[ns.size() / 2] / iters;  // 16 warps per SM, each 32 mma.sync per stage
  const double flop_sm = 16.0 * 32 * 2 * 16 * 8 * 16;     // per stage per SM
  const double tflops = flop_sm * sms / per_stage_ns / 1e3;
  if (json) {
    std::printf("{\"bench\": \"mma_sync_rate\", \"ldmatrix\": %s, \"ns_per_stage_sm\": %.2f, \"tflops_chip\": %.1f, "
                "\"w_gbs_per_sm_at_m64\": %.1f}\n", ldsm ? "true" : "false", per_stage_ns, tflops,
                2 * 16384.0 / per_stage_ns);
  } else {
    std::printf("mma.sync m16n8k16 x32 per warp-stage%s, 2 CTAs x 8 warps per SM: %7.1f ns per stage pair, %6.1f "
                "TFLOP/s; as a 4-tile (M=64) skinny GEMM: W at %.1f GB/s per SM\n",
                ldsm ? " + 12 ldmatrix.x4" : "", per_stage_ns, tflops, 2 * 16384.0 / per_stage_ns);
  }
  std::fflush(stdout);
  CHECK(cudaFree(out));
  CHECK(cudaFree(sink));
}

struct Result {
  double ns_per_instr_sm, cycles_per_instr_sm;
};

template <int N, bool RS, bool PIPE>
Result measure(int wgs, int sms, int iters) {
  auto k = rate<N, RS, PIPE>;
  CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  unsigned long long* out;
  float* sink;
  CHECK(cudaMalloc(&out, sizeof(unsigned long long) * 2 * sms * (kMaxThreads / 128)));
  CHECK(cudaMalloc(&sink, sizeof(float) * kMaxThreads));
  std::vector<unsigned long long> host(2 * sms * (kMaxThreads / 128));
  std::vector<double> ns, cyc;
  for (int rep = 0; rep < 3; ++rep) {
    k<<<sms, 128 * wgs, kSmem>>>(iters, out, sink);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaMemcpy(host.data(), out, sizeof(unsigned long long) * host.size(), cudaMemcpyDeviceToHost));
    for (int c = 0; c < sms; ++c) {
      unsigned long long tn = 0, tc = 0;
      for (int w = 0; w < wgs; ++w) {
        tn = std::max(tn, host[2 * (c * (kMaxThreads / 128) + w)]);
        tc = std::max(tc, host[2 * (c * (kMaxThreads / 128) + w) + 1]);
      }
      ns.push_back(static_cast<double>(tn) / (4.0 * iters * wgs));  // per instruction, per SM
      cyc.push_back(static_cast<double>(tc) / (4.0 * iters * wgs));
    }
  }
  std::sort(ns.begin(), ns.end());
  std::sort(cyc.begin(), cyc.end());
  CHECK(cudaFree(out));
  CHECK(cudaFree(sink));
  return {ns[ns.size() / 2], cyc[cyc.size() / 2]};
}

template <int N, bool RS, bool PIPE>
void row(int wgs, int sms, int iters, double peak_flop_per_cycle_sm, bool json) {
  const Result r = measure<N, RS, PIPE>(wgs, sms, iters);
  const double flop = 2.0 * 64 * N * 16;
  const double tflops = flop * sms / r.ns_per_instr_sm / 1e3;
  // weight bytes per instruction: W as B (x as A, padded to 64 rows) = N x 16 x 2; W as A = 64 x 16 x 2
  const double wb_as_b = N * 16 * 2.0, wb_as_a = 64 * 16 * 2.0;
  if (json) {
    std::printf("{\"bench\": \"wgmma_rate\", \"n\": %d, \"operands\": \"%s\", \"pipelined\": %s, \"warpgroups\": %d, "
                "\"ns_per_instr_sm\": %.2f, \"cycles_per_instr_sm\": %.1f, \"tflops_chip\": %.1f, "
                "\"pct_peak\": %.1f, \"w_as_b_gbs_per_sm\": %.1f, \"w_as_a_gbs_per_sm\": %.1f}\n",
                N, RS ? "RS" : "SS", PIPE ? "true" : "false", wgs, r.ns_per_instr_sm, r.cycles_per_instr_sm, tflops,
                100.0 * flop / r.cycles_per_instr_sm / peak_flop_per_cycle_sm, wb_as_b / r.ns_per_instr_sm,
                wb_as_a / r.ns_per_instr_sm);
  } else {
    std::printf("m64n%-3dk16 %s %-5s wg %d  %7.2f ns %7.1f cyc /instr/SM  %7.1f TFLOP/s (%5.1f%% of peak)  "
                "W as B %6.1f GB/s/SM, W as A %6.1f GB/s/SM\n",
                N, RS ? "RS" : "SS", PIPE ? "pipe" : "wait0", wgs, r.ns_per_instr_sm, r.cycles_per_instr_sm, tflops,
                100.0 * flop / r.cycles_per_instr_sm / peak_flop_per_cycle_sm, wb_as_b / r.ns_per_instr_sm,
                wb_as_a / r.ns_per_instr_sm);
  }
  std::fflush(stdout);
}

int main(int argc, char** argv) {
  bool json = false;
  int iters = 4000;  // units of 4 k16 steps per warpgroup; a short run (--iters 24) includes any warm-up
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--json") == 0) json = true;
    if (std::strcmp(argv[i], "--iters") == 0 && i + 1 < argc) iters = std::atoi(argv[++i]);
  }
  int dev = 0, sms = 0;
  CHECK(cudaGetDevice(&dev));
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const double peak = 4096.0;  // dense bf16 FLOP per cycle per SM on sm_90 (989 TFLOP/s at 1.83 GHz x 132)
  mma_sync_row(false, sms, iters, json);
  mma_sync_row(true, sms, iters, json);
  for (int wgs = 1; wgs <= 3; ++wgs) {
    row<16, false, false>(wgs, sms, iters, peak, json);
    row<16, false, true>(wgs, sms, iters, peak, json);
    row<64, false, false>(wgs, sms, iters, peak, json);
    row<64, false, true>(wgs, sms, iters, peak, json);
    row<64, true, true>(wgs, sms, iters, peak, json);
    row<128, false, true>(wgs, sms, iters, peak, json);
    if (wgs <= 2) {
      row<256, false, false>(wgs, sms, iters, peak, json);
      row<256, false, true>(wgs, sms, iters, peak, json);
      row<256, true, true>(wgs, sms, iters, peak, json);
    }
  }
  return 0;
}
