// Persistent decode MLP (OPT's fc1 -> ReLU -> fc2 up to the split-K partials), one launch:
//
//   phase 1: act[:, 64u..64u+63] = relu(x @ w1[64u..]^T + b1)      one 64-column tile per unit
//   grid barrier (every CTA resident: grid <= decode_mlp_resident_ctas)
//   phase 2: part[s][:, 64t..] = act[:, K_s] @ w2[64t.., K_s]^T     (column tile t, K slice s) per unit
//
// or, with p.flow, the same units in one queue with no grid barrier: an fc2 unit waits only for the
// fc1 tiles of its K slice (decode_mlp.h; measured faster in the decode step, csrc/NOTES.md
// "Session 7").
//
// Why (csrc/NOTES.md "decode_mlp"): at decode sizes (M <= 64) a GEMM launch is 55-70% of the copy
// bandwidth because each pays its own ramp (launch, first DRAM round trip, pipeline fill) and tail
// (last CTAs, epilogue, drain); fc1 and fc2 back to back pay both twice. Here the CTAs stay resident
// and, before they wait at the barrier for the rest of phase 1, issue the first ring stages of
// their phase-2 weight slice (the stored weight, which nothing in this launch writes), so DRAM keeps
// streaming across the phase boundary. Launched with PDL, w1's first stages likewise stream before
// griddepcontrol.wait while the previous kernel drains.
//
// The GEMM core is the skinny GEMM's (skinny_gemm.cu, tc_pipeline.cuh): 8 warps on a 64-column W
// tile, stages of 128 k through a swizzled cp.async ring (W 16 KB + x 16*MT rows), ldmatrix.x4 +
// mma.sync m16n8k16 with fp32 accumulators, warps split over K (and over N for M > 32); a CTA here
// owns one SM (1 CTA/SM, a deeper ring: 4-8 stages) and keeps its warp-partial tiles in a shared
// area of its own, so the next phase's prefetch can fill the ring while they are summed.
// Phase 2 writes fp32 partials without bias (= linear.splitk_partials), which the split-K reduce +
// bias + residual + norm kernel (hybrid/ops/linear_norm.py) sums in split order.
//
// The grid barrier is a 64-bit arrival counter in a caller-owned buffer (zero once, see
// barrier_arrive): one release atomic per CTA, relaxed polls by thread 0, one acquire fence.
// Launches on one stream never overlap in it (with PDL nothing is touched before
// griddepcontrol.wait, i.e. before the previous kernels completed). A wait longer than ~2 s traps
// instead of hanging the GPU. Between arriving and waiting after phase 1, each CTA issues its
// phase-2 weight prologue, so DRAM streams through the barrier. Co-residency assumes no kernel on
// another stream holds SMs for long (e.g. an NCCL collective spinning on a peer): the engine
// decodes on one stream with nothing else in flight; where that does not hold, the trap turns the
// stall into a launch error (EngineConfig.fuse_mlp=False avoids the kernel).
#include "decode_mlp.h"
#include "tc_pipeline.cuh"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace hybrid {
namespace {

using namespace tc;  // NOLINT: the pipeline pieces (tc_pipeline.cuh)

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRedLd = kMlpTile + 8;  // padded fp32 row of a warp-partial tile (as skinny_gemm.cu)
constexpr long long kBarrierTimeoutCycles = 1LL << 32;  // ~2 s at H100/H200 clocks
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

// One acquire load of a synchronisation word already seen at its target by relaxed polls: orders
// the CTA's later reads (after the __syncthreads that follows) after the producers' releases. Not
// a fence: a fence.acq_rel also waited for the weight prefetch this thread had just issued
// (cp.async into the ring), which put a whole prologue's DRAM time into every wait.
__device__ __forceinline__ unsigned int acquire_load(const unsigned int* c) {
  unsigned int v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(c) : "memory");
  return v;
}
__device__ __forceinline__ unsigned long long acquire_load(const unsigned long long* c) {
  unsigned long long v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(c) : "memory");
  return v;
}

// Grid barrier on a caller-owned 64-bit counter (zero once, never reset): every barrier instance
// adds exactly 2^32 (CTA 0 adds 2^32 - (ctas - 1), every other CTA 1), so an arrival's old value
// has the instance number in its high word and the instance ends when the counter reaches the next
// multiple of 2^32, whatever the grid size of this or earlier launches. Split in two so a CTA can
// stream its next weights between arriving and waiting. Thread 0 only, after a __syncthreads
// (whose CTA-scope ordering the release extends to the GPU); release / relaxed polls + one
// acquire fence: no sequentially consistent fences, no L1 invalidation per poll.
__device__ __forceinline__ unsigned long long barrier_arrive(unsigned long long* bar, unsigned int ctas) {
  const unsigned long long add = blockIdx.x == 0 ? (1ull << 32) - (ctas - 1) : 1ull;
  unsigned long long old;
  asm volatile("atom.add.release.gpu.global.u64 %0, [%1], %2;" : "=l"(old) : "l"(bar), "l"(add) : "memory");
  return ((old >> 32) + 1) << 32;
}

__device__ __forceinline__ void barrier_wait(const unsigned long long* bar, unsigned long long target) {
  const long long t0 = clock64();
  for (;;) {
    unsigned long long v;
    asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(bar) : "memory");
    if (static_cast<long long>(v - target) >= 0) break;
    if (clock64() - t0 > kBarrierTimeoutCycles) __trap();  // a CTA never came: fail, don't hang
  }
  (void)acquire_load(bar);
}

// accumulate schedule: w2 comes transposed, [ffn, hidden] (the model keeps that copy), so a
// tile's fc2 weights are 64 whole rows, contiguous like its fc1 rows. A ring stage of fc2 holds
// those 64 rows x 128 output columns (256-byte shared rows, the W stages' swizzle); the act tile is
// [16 MT rows, 64 k] in 128-byte rows: chunk c of row r at c ^ (r & 7).
constexpr int kW2Cols = 128;  // output columns per fc2 stage
static_assert(kW2Cols * 2 == kRowBytes, "an fc2 stage row is a W stage row");
__device__ __forceinline__ uint32_t swizzle64(int row, int chunk) {
  return static_cast<uint32_t>(row * (kMlpTile * 2) + ((chunk ^ (row & 7)) << 4));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                                  uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
__device__ __forceinline__ void add_f32x4(float* dst, float a, float b, float c, float d) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(dst), make_float4(a, b, c, d));  // one vector RED
#else
  atomicAdd(dst, a);
  atomicAdd(dst + 1, b);
  atomicAdd(dst + 2, c);
  atomicAdd(dst + 3, d);
#endif
}

// Dataflow counters (flow schedule; thread 0 only, after a __syncthreads for the release):
// count_release publishes the CTA's stores before it (issued with no cp.async in flight: a release
// waits for the thread's outstanding memory operations); count_wait polls relaxed until the
// counter reaches n, then one acquire load (as barrier_wait, with the same trap instead of a hang);
// count_leave returns the old value of the exit count.
__device__ __forceinline__ void count_release(unsigned int* c) {
  asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(c) : "memory");
}
__device__ __forceinline__ void count_wait(const unsigned int* c, unsigned int n) {
  const long long t0 = clock64();
  for (;;) {
    unsigned int v;
    asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(c) : "memory");
    if (v >= n) break;
    if (clock64() - t0 > kBarrierTimeoutCycles) __trap();  // a tile never came: fail, don't hang
  }
  (void)acquire_load(c);
}
__device__ __forceinline__ void count_release(unsigned int* c, unsigned int n) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(c), "r"(n) : "memory");
}
__device__ __forceinline__ unsigned int count_leave(unsigned int* c) {
  unsigned int old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(c) : "memory");
  return old;
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
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wn = warp % WN, wk = warp / WN;
    const int mat = lane >> 3, mrow = lane & 7;
    const uint32_t ws = ring + (st % STAGES) * C::kStageBytes;
    const uint32_t xs = ws + C::kWBytes;
    const int k16 = min(kStageK / 16, (nblk - 2 * st) * (kMlpTile / 16));
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

// Sum over the CTA's threads (every thread gets it); scratch: >= kWarps floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  __syncthreads();  // scratch free (a previous block_sum may still be reading it)
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  float t = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) t += scratch[w];
  return t;
}

// Phase 3 for one row (see DecodeMlpParams): the rounding steps of linear_norm's
// _splitk_add_norm_kernel. The row lives in registers (<= kPairs column pairs per thread; the
// splits' loads unrolled by 4, so a few L2 round trips, not one per split); scratch: kWarps floats
// of shared memory for the block sums. The row's other inputs (b2, the residual row, the norm's
// weight and bias) come either from global memory as they are needed, or (RowInputs) from
// registers loaded earlier, off the critical path: the flow schedule's row CTAs load them before
// they wait for the last fc2 partials.
constexpr int kNormPairs = kMlpMaxHidden / 2 / kThreads;
constexpr int kNormPairsPreloaded = 8;  // hidden <= 4096: inputs preloaded (4 x 8 float2 registers)

template <int kPairs>
struct RowInputs {
  float2 bias[kPairs], res[kPairs], w[kPairs], nb[kPairs];
};

template <typename T, int kPairs>
__device__ __forceinline__ void load_row_inputs(const DecodeMlpParams& p, int row, RowInputs<kPairs>& in) {
  using T2 = typename Pair<T>::T2;
  const int pairs = p.hidden / 2;
  const T2* bias = static_cast<const T2*>(p.b2);
  const T2* res = p.residual != nullptr
                      ? reinterpret_cast<const T2*>(static_cast<const T*>(p.residual) + row * p.residual_stride)
                      : nullptr;
  const T2* w = static_cast<const T2*>(p.norm_w);
  const T2* nb = static_cast<const T2*>(p.norm_b);
  const float2 zero = make_float2(0.f, 0.f);
#pragma unroll
  for (int j = 0; j < kPairs; ++j) {
    const int c2 = threadIdx.x + j * kThreads;
    const bool in_row = c2 < pairs;
    in.bias[j] = in_row && bias != nullptr ? Pair<T>::to_float2(bias[c2]) : zero;
    in.res[j] = in_row && res != nullptr ? Pair<T>::to_float2(res[c2]) : zero;
    in.w[j] = in_row ? Pair<T>::to_float2(w[c2]) : zero;
    in.nb[j] = in_row && nb != nullptr ? Pair<T>::to_float2(nb[c2]) : zero;
  }
}

// kPre: `pre` holds the row's inputs (load_row_inputs); otherwise they are loaded here.
template <typename T, int kPairs, bool kPre>
__device__ void norm_row(const DecodeMlpParams& p, int row, float* scratch, bool first_row,
                         const RowInputs<kPre ? kPairs : 1>* pre) {
  using T2 = typename Pair<T>::T2;
  const int pairs = p.hidden / 2;
  const float2* part = reinterpret_cast<const float2*>(p.part) + static_cast<size_t>(row) * pairs;
  const size_t split_stride = static_cast<size_t>(p.m) * pairs;
  float2 h[kPairs];
#pragma unroll
  for (int j = 0; j < kPairs; ++j) h[j] = make_float2(0.f, 0.f);
#pragma unroll 4
  for (int s = 0; s < p.k_splits; ++s) {  // split order, as the reduce kernel
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      const int c2 = threadIdx.x + j * kThreads;
      if (c2 < pairs) {
        const float2 t = __ldcg(part + s * split_stride + c2);
        h[j].x += t.x;
        h[j].y += t.y;
      }
    }
  }
  const T2* bias = static_cast<const T2*>(p.b2);
  const T2* res = p.residual != nullptr
                      ? reinterpret_cast<const T2*>(static_cast<const T*>(p.residual) + row * p.residual_stride)
                      : nullptr;
  auto bias_at = [&](int j, int c2) { if constexpr (kPre) return pre->bias[j]; else return Pair<T>::to_float2(bias[c2]); };
  auto res_at = [&](int j, int c2) { if constexpr (kPre) return pre->res[j]; else return Pair<T>::to_float2(res[c2]); };
  const T2* w = static_cast<const T2*>(p.norm_w);
  const T2* nb = static_cast<const T2*>(p.norm_b);
  auto w_at = [&](int j, int c2) { if constexpr (kPre) return pre->w[j]; else return Pair<T>::to_float2(w[c2]); };
  auto nb_at = [&](int j, int c2) { if constexpr (kPre) return pre->nb[j]; else return Pair<T>::to_float2(nb[c2]); };
  T2* res_out = static_cast<T2*>(p.res_out) + static_cast<size_t>(row) * pairs;
  T2* out = static_cast<T2*>(p.out) + static_cast<size_t>(row) * pairs;
  const bool rms = p.norm_b == nullptr;
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < kPairs; ++j) {
    const int c2 = threadIdx.x + j * kThreads;
    if (c2 < pairs) {
      float2 acc = h[j];
      if (bias != nullptr) {
        const float2 b = bias_at(j, c2);
        acc.x += b.x;
        acc.y += b.y;
      }
      float2 v = Pair<T>::to_float2(Pair<T>::from_float2(acc));  // the projection's output, rounded
      if (res != nullptr) {
        const float2 r = res_at(j, c2);
        v.x += r.x;
        v.y += r.y;
      }
      const T2 vr = Pair<T>::from_float2(v);
      res_out[c2] = vr;
      h[j] = Pair<T>::to_float2(vr);
      sum += rms ? h[j].x * h[j].x + h[j].y * h[j].y : h[j].x + h[j].y;
    }
  }
  if (first_row) stamp(p, 8);
  sum = block_sum(sum, scratch);
  if (first_row) stamp(p, 9);
  if (rms) {  // as rmsnorm.py: normalised value rounded, times the weight, rounded once
    const float rstd = 1.f / sqrtf(sum / p.hidden + p.eps);
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      const int c2 = threadIdx.x + j * kThreads;
      if (c2 < pairs) {
        const float2 wf = w_at(j, c2);
        const float2 nv = Pair<T>::to_float2(Pair<T>::from_float2(make_float2(h[j].x * rstd, h[j].y * rstd)));
        out[c2] = Pair<T>::from_float2(make_float2(nv.x * wf.x, nv.y * wf.y));
      }
    }
    return;
  }
  const float mean = sum / p.hidden;  // as layernorm.py: two passes over the row
  float var = 0.f;
#pragma unroll
  for (int j = 0; j < kPairs; ++j) {
    const int c2 = threadIdx.x + j * kThreads;
    if (c2 < pairs) {
      const float dx = h[j].x - mean, dy = h[j].y - mean;
      var += dx * dx + dy * dy;
    }
  }
  var = block_sum(var, scratch);
  if (first_row) stamp(p, 10);
  const float rstd = 1.f / sqrtf(var / p.hidden + p.eps);
#pragma unroll
  for (int j = 0; j < kPairs; ++j) {
    const int c2 = threadIdx.x + j * kThreads;
    if (c2 < pairs) {
      const float2 wf = w_at(j, c2);
      const float2 bf = nb_at(j, c2);
      out[c2] = Pair<T>::from_float2(
          make_float2((h[j].x - mean) * rstd * wf.x + bf.x, (h[j].y - mean) * rstd * wf.y + bf.y));
    }
  }
}

// The ffn-split schedule (DecodeMlpParams.accumulate): its own kernel, so its registers do not
// count against the barrier / flow schedules' (decode_mlp_kernel).
template <typename T, bool kHalf, int MT>
__global__ void __launch_bounds__(kThreads, 1) decode_mlp_accumulate_kernel(const DecodeMlpParams p) {
  using C = Config<MT>;
  using U = Unit<T, kHalf, MT>;
  using T2 = typename Pair<T>::T2;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t ring = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  float* red = reinterpret_cast<float*>(smem + C::kRingBytes);
  const int units1 = p.ffn / kMlpTile;
  const size_t row1 = static_cast<size_t>(p.hidden) * sizeof(T);  // bytes per row of w2t
  const char* w2 = static_cast<const char*>(p.w2);
  auto unit1 = [&](int u) { return U::fc1(ring, p, u); };
  float acc[MT][C::kNT][4];
  unsigned char* act_sh = smem + C::kRingBytes + C::kRedBytes;
  const uint32_t act_s = ring + C::kRingBytes + C::kRedBytes;
  const int ns2 = (p.hidden + kW2Cols - 1) / kW2Cols;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int mat = lane >> 3, mrow = lane & 7, g = lane >> 2, t = lane & 3;
  // fc2 stage j of ffn tile u into ring slot `slot`: w2t rows 64 u..64 u + 63, columns 128 j..
  auto load2 = [&](int u, int slot, int j) {
    const uint32_t ws = ring + (slot % C::kStages) * C::kStageBytes;
    const int v = min(kChunks, (p.hidden - j * kW2Cols) / 8);  // 16-byte chunks of the stage's rows
    const char* src = w2 + static_cast<size_t>(u) * kMlpTile * row1 + static_cast<size_t>(j) * kRowBytes;
#pragma unroll
    for (int i = 0; i < kMlpTile * kChunks / kThreads; ++i) {
      const int id = threadIdx.x + i * kThreads;
      const int row = id / kChunks, ch = id % kChunks;
      if (ch < v) cp_async16(ws + swizzle(row, ch), src + static_cast<size_t>(row) * row1 + ch * 16, 16);
    }
  };
  // fc1 epilogue of tile u: + b1, ReLU, rounded into the shared act tile (every row: rows past M
  // are zero x rows, their products are never added)
  auto act_tile = [&](int u) {
    const T2* bias = static_cast<const T2*>(p.b1);
    for (int i = threadIdx.x; i < C::kXRows * (kMlpTile / 2); i += kThreads) {
      const int row = i / (kMlpTile / 2), c2 = i % (kMlpTile / 2);
      float2 v = warp_sum<MT>(red, row, c2);
      if (bias != nullptr) {
        const float2 b = Pair<T>::to_float2(bias[(u * kMlpTile) / 2 + c2]);
        v.x += b.x;
        v.y += b.y;
      }
      if (p.relu) {
        v.x = fmaxf(v.x, 0.f);
        v.y = fmaxf(v.y, 0.f);
      }
      *reinterpret_cast<T2*>(act_sh + swizzle64(row, c2 >> 2) + (c2 & 3) * 4) = Pair<T>::from_float2(v);
    }
  };
  // fc2 stage j from ring slot `slot`: warp w takes output columns 16 w..16 w + 15 of the stage
  // (two n8 tiles, all 64 k; the [k, n] rows read with ldmatrix.trans), then adds [rows, 4
  // columns] per lane into part with one vector RED (lane pairs swap halves so each lane holds 4
  // consecutive columns of one row)
  auto fc2_stage = [&](int slot, int j) {
    const int n0 = warp * 16;
    if (n0 >= p.hidden - j * kW2Cols) return;  // warp-uniform: the last stage of hidden % 128 == 64
    const uint32_t ws = ring + (slot % C::kStages) * C::kStageBytes;
    float c[MT][2][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) c[mt][nt][i] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kMlpTile / 16; ++kk) {
      uint32_t b0, b1, b2, b3;  // matrices: (k 0-7, n tile 0), (k 8-15, n tile 0), (k 0-7, tile 1), (k 8-15, tile 1)
      ldmatrix_x4_trans(b0, b1, b2, b3, ws + swizzle(kk * 16 + (mat & 1) * 8 + mrow, n0 / 8 + (mat >> 1)));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        uint32_t a[4];
        ldmatrix_x4(a[0], a[1], a[2], a[3], act_s + swizzle64(mt * 16 + (mat & 1) * 8 + mrow, kk * 2 + (mat >> 1)));
        mma16816<kHalf>(c[mt][0], a, b0, b1);
        mma16816<kHalf>(c[mt][1], a, b2, b3);
      }
    }
    const bool odd = t & 1;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        // even lane: row g, columns 2t..2t+3 (its c0 c1 + the odd partner's); odd lane: row g + 8,
        // columns 2t-2..2t+1 (the even partner's c2 c3 + its own)
        const float r0 = __shfl_xor_sync(0xffffffffu, odd ? c[mt][nt][0] : c[mt][nt][2], 1);
        const float r1 = __shfl_xor_sync(0xffffffffu, odd ? c[mt][nt][1] : c[mt][nt][3], 1);
        const int row = mt * 16 + g + (odd ? 8 : 0);
        const int col = j * kW2Cols + n0 + nt * 8 + 2 * (t & ~1);
        if (row < p.m) {
          float* dst = p.part + static_cast<size_t>(row) * p.hidden + col;
          if (odd)
            add_f32x4(dst, r0, r1, c[mt][nt][2], c[mt][nt][3]);
          else
            add_f32x4(dst, c[mt][nt][0], c[mt][nt][1], r0, r1);
        }
      }
  };

  stamp(p, 0);
  bool waited = false;
  for (int u = blockIdx.x; u < units1; u += gridDim.x) {
    const U g1 = unit1(u);
    const int ns1 = g1.stages(), total = ns1 + ns2;
    // one stream of stages through the ring: fc1 (W1 tile + x) 0..ns1-1, then fc2 (w2t rows).
    // fc2 stages in a rotated order, one start per group of 8 neighbouring tiles, so the atomics
    // spread over the whole sum instead of all CTAs adding into the same 128 columns at once
    const int rot = (u >> 3) % ns2;
    auto stage2 = [&](int i) { return (i - ns1 + rot) % ns2; };
    auto load = [&](int i) {
      if (i < ns1) {
        g1.load_w(i);
        g1.load_x(i);
      } else {
        load2(u, i, stage2(i));
      }
    };
#pragma unroll
    for (int s = 0; s < C::kStages - 1; ++s) {  // the stored weights: before the PDL wait is fine
      if (s < ns1)
        g1.load_w(s);
      else if (s < total)
        load2(u, s, stage2(s));
      cp_async_commit();
    }
    if (!waited) {
      grid_dependency_wait();  // x (and everything else) only after it
      stamp(p, 1);
      waited = true;
    }
    g1.prologue_x();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < C::kNT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;
    for (int i = 0; i < total; ++i) {
      cp_async_wait<C::kStages - 2>();
      __syncthreads();  // stage i visible to all; every warp is done with stage i-1's slot
      if (i + C::kStages - 1 < total) load(i + C::kStages - 1);
      cp_async_commit();
      if (i < ns1) {
        g1.compute(i, acc);
        continue;
      }
      if (i == ns1) {  // fc1 done: its act tile into shared memory while fc2's stages stream
        stash<MT>(red, acc);
        __syncthreads();
        act_tile(u);
        __syncthreads();
        if (u == static_cast<int>(blockIdx.x)) {
          stamp(p, 2);
          grid_launch_dependents();  // the norm kernel after this may get resident
        }
      }
      fc2_stage(i, stage2(i));
    }
    cp_async_wait<0>();
    __syncthreads();  // ring, red and act free for the next tile
  }
  stamp(p, 5);
  stamp(p, 7);
  return;
}

// kNorm: phase 3 compiled in (p.norm_w set). Its own instantiation, so the row code's registers
// (the flow schedule's preloaded row inputs) do not count against the plain kernel's (144 -> 219
// registers at MT 1 when they shared one).
template <typename T, bool kHalf, int MT, bool kNorm>
__global__ void __launch_bounds__(kThreads, 1) decode_mlp_kernel(const DecodeMlpParams p) {
  using C = Config<MT>;
  using U = Unit<T, kHalf, MT>;
  using T2 = typename Pair<T>::T2;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t ring = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  float* red = reinterpret_cast<float*>(smem + C::kRingBytes);

  const int units1 = p.ffn / kMlpTile;
  const int tiles2 = p.hidden / kMlpTile;
  const int units2 = tiles2 * p.k_splits;
  const int blocks2 = p.ffn / kMlpTile;
  const size_t row2 = static_cast<size_t>(p.ffn) * sizeof(T);     // bytes per row of act and w2
  const char* w2 = static_cast<const char*>(p.w2);
  const char* act_in = static_cast<const char*>(p.act);

  auto unit1 = [&](int u) { return U::fc1(ring, p, u); };
  // tile-major: the k_splits CTAs of a column tile are neighbours, so CTAs running together read
  // whole w2 rows (contiguous memory) rather than one K slice of many rows
  auto split_of = [&](int u) { return u % p.k_splits; };
  auto tile_of = [&](int u) { return u / p.k_splits; };
  auto kb0_of = [&](int s) { return static_cast<int>(static_cast<long long>(blocks2) * s / p.k_splits); };
  auto unit2 = [&](int u) {
    const int tile = tile_of(u), s = split_of(u);
    const int kb0 = kb0_of(s), kb1 = kb0_of(s + 1);
    const size_t k0 = static_cast<size_t>(kb0) * kMlpTile * sizeof(T);
    return U{ring, w2 + static_cast<size_t>(tile) * kMlpTile * row2 + k0, act_in + k0, row2, row2, kb1 - kb0, p.m};
  };

  float acc[MT][C::kNT][4];
  const int pairs = p.m * (kMlpTile / 2);

  // fc1 tile u's bias pair for this thread: its epilogue pairs i all have i % 32 == threadIdx.x % 32
  // (256 threads, 32 pairs per row), so one pair per thread, loaded when the unit starts (a
  // parameter) instead of as a cold round trip between the GEMM and the act tile's release
  static_assert(kThreads % (kMlpTile / 2) == 0, "one b1 pair per thread");
  auto bias1 = [&](int u) {
    const T2* bias = static_cast<const T2*>(p.b1);
    return bias != nullptr && u < units1 ? Pair<T>::to_float2(bias[u * (kMlpTile / 2) + threadIdx.x % (kMlpTile / 2)])
                                         : make_float2(0.f, 0.f);
  };
  // fc1 epilogue of tile u: + b1 (bias1(u), zero without one), ReLU, rounded into act (the warp
  // partials are stashed in red)
  auto store_act = [&](int u, float2 b) {
    T2* act = static_cast<T2*>(p.act);
    for (int i = threadIdx.x; i < pairs; i += kThreads) {
      const int row = i / (kMlpTile / 2), c2 = i % (kMlpTile / 2);  // c2 == threadIdx.x % 32
      float2 v = warp_sum<MT>(red, row, c2);
      const int col = u * kMlpTile + 2 * c2;
      v.x += b.x;
      v.y += b.y;
      if (p.relu) {
        v.x = fmaxf(v.x, 0.f);
        v.y = fmaxf(v.y, 0.f);
      }
      act[(static_cast<size_t>(row) * p.ffn + col) / 2] = Pair<T>::from_float2(v);
    }
  };
  // fc2 epilogue of (column tile, K slice s): the fp32 partial, no bias
  auto store_part = [&](int tile, int s) {
    float* part = p.part + static_cast<size_t>(s) * p.m * p.hidden + tile * kMlpTile;
    for (int i = threadIdx.x; i < pairs; i += kThreads) {
      const int row = i / (kMlpTile / 2), c2 = i % (kMlpTile / 2);
      *reinterpret_cast<float2*>(part + static_cast<size_t>(row) * p.hidden + 2 * c2) = warp_sum<MT>(red, row, c2);
    }
  };

  if (p.flow) {  // ---- dataflow schedule (decode_mlp.h): no grid barrier
    unsigned int* queue = p.barrier + 2;
    unsigned int* left = p.barrier + 3;
    unsigned int* ready = p.barrier + 4;
    unsigned int* stored2 = p.barrier + 4 + kMlpMaxKSplits;  // phase 3: fc2 partials stored
    unsigned int* tickets = stored2 + 1;                      // phase 3: CTAs out of the unit loop
    __shared__ int next_unit;
    int fc2_units = 0;  // fc2 partials this CTA stored
    const int total = units1 + units2;
    // queue order: fc1 tiles 0..units1-1, then fc2 units slice-major (all column tiles of slice 0, ...)
    auto make = [&](int u) {
      if (u < units1) return unit1(u);
      const int s = (u - units1) / tiles2, tile = (u - units1) % tiles2;
      const int kb0 = kb0_of(s), kb1 = kb0_of(s + 1);
      const size_t k0 = static_cast<size_t>(kb0) * kMlpTile * sizeof(T);
      return U{ring, w2 + static_cast<size_t>(tile) * kMlpTile * row2 + k0, act_in + k0, row2, row2, kb1 - kb0, p.m};
    };
    auto slice_of_block = [&](int j) {  // the K slice holding 64-wide block j of ffn
      int s = 0;
      while (s + 1 < p.k_splits && j >= kb0_of(s + 1)) ++s;
      return s;
    };
    const int pre = p.prefetch2 < 0 ? C::kStages - 1 : min(p.prefetch2, C::kStages - 1);
    stamp(p, 0);
    int u = blockIdx.x;
    if (u < total) make(u).prologue_w();  // the stored weight: before the wait is fine (all of it)
    grid_dependency_wait();
    stamp(p, 1);
    bool phase2 = false;
    while (u < total) {
      // claim the unit after this one now, so its weights can stream behind this one's epilogue.
      // The atomic's round trip (long while DRAM queues are full) is not waited for here: thread 0
      // first uses the value after run(), and publishes it through shared memory then
      unsigned int claimed = 0;
      if (threadIdx.x == 0) claimed = atomicAdd(queue, 1u);
      if (u >= units1) {
        if (!phase2) {
          phase2 = true;
          grid_launch_dependents();  // this CTA is done with phase 1: the norm kernel may get resident
        }
        const int s = (u - units1) / tiles2;
        if (threadIdx.x == 0) count_wait(ready + s, static_cast<unsigned int>(kb0_of(s + 1) - kb0_of(s)));
        __syncthreads();  // the slice's act tiles complete and visible (read through L2)
        if (u != static_cast<int>(blockIdx.x)) make(u).prologue_w(pre, C::kStages - 1);  // the rest
        stamp(p, 4);
      }
      const U g = make(u);
      const float2 b1 = bias1(u);
      g.prologue_x();
      g.run(acc);
      if (threadIdx.x == 0) next_unit = static_cast<int>(gridDim.x + claimed);
      __syncthreads();  // (the previous value was read before the last unit's epilogue barriers)
      const int next = next_unit;
      // an fc2 unit's first `pre` stages stream before its slice wait, the rest after it: every
      // load in flight on this SM delays the wait's polls (they queue behind the prefetch)
      auto prefetch_next = [&]() {
        if (next < total) make(next).prologue_w(0, next >= units1 ? pre : C::kStages - 1);
      };
      if (u < units1) {
        // an fc1 tile others wait for: publish it before the next unit's weights are in flight
        // (the release would wait for them), so the tile's slice completes as early as it can
        stash<MT>(red, acc);
        __syncthreads();
        store_act(u, b1);
        __syncthreads();  // the tile's act stores before thread 0's release
        if (threadIdx.x == 0) count_release(ready + slice_of_block(u));
        stamp(p, 3);
        prefetch_next();
      } else {  // nobody waits for an fc2 partial inside the launch: stream the next unit first
        prefetch_next();
        stash<MT>(red, acc);
        __syncthreads();
        store_part((u - units1) % tiles2, (u - units1) / tiles2);
        __syncthreads();  // the shared partials are read before the next unit overwrites them
        ++fc2_units;
      }
      u = next;
    }
    if (!phase2) grid_launch_dependents();
    stamp(p, 5);
    if constexpr (kNorm) {
      // Phase 3 without a grid barrier. Out of the loop, every CTA publishes its fc2 partials
      // (release: after the __syncthreads that ended its last unit; no cp.async is in flight, the
      // last unit's successor prefetch was empty) and takes a ticket. The last min(M, grid) CTAs
      // out each take rows: they wait until every fc2 partial is stored (the CTAs still in their
      // loops wait for nothing a worker holds), then reduce + add + norm as phase 3 does.
      if (threadIdx.x == 0) {
        if (fc2_units > 0) count_release(stored2, static_cast<unsigned int>(fc2_units));
        next_unit = static_cast<int>(count_leave(tickets));
      }
      __syncthreads();
      const int workers = min(p.m, static_cast<int>(gridDim.x));
      const int w = next_unit - (static_cast<int>(gridDim.x) - workers);
      if (w >= 0) {
        // the first row's other inputs (parameters, and the residual: this launch's input) are
        // loaded before the wait, so after it only the partials' L2 round trips remain
        auto rows = [&](auto pairs_c) {
          constexpr int kP = decltype(pairs_c)::value;
          RowInputs<kP> in;
          load_row_inputs<T, kP>(p, w, in);
          if (threadIdx.x == 0) count_wait(stored2, static_cast<unsigned int>(units2));
          __syncthreads();  // every partial complete and visible (norm_row reads them through L2)
          stamp(p, 6);
          norm_row<T, kP, true>(p, w, red, true, &in);
          for (int row = w + workers; row < p.m; row += workers) {
            load_row_inputs<T, kP>(p, row, in);
            norm_row<T, kP, true>(p, row, red, false, &in);
          }
        };
        if (p.hidden <= 2 * kThreads * 4) {
          rows(std::integral_constant<int, 4>{});
        } else if (p.hidden <= 2 * kThreads * kNormPairsPreloaded) {
          rows(std::integral_constant<int, kNormPairsPreloaded>{});
        } else {
          if (threadIdx.x == 0) count_wait(stored2, static_cast<unsigned int>(units2));
          __syncthreads();
          stamp(p, 6);
          for (int row = w; row < p.m; row += workers) norm_row<T, kNormPairs, false>(p, row, red, row == w, nullptr);
        }
      }
    }
    // the last CTA out zeroes the counters: every other CTA is past its last claim and wait
    if (threadIdx.x == 0 && count_leave(left) == gridDim.x - 1) {
      *queue = 0;
      for (int s = 0; s < p.k_splits; ++s) ready[s] = 0;
      *stored2 = 0;
      *tickets = 0;
      *left = 0;
    }
    stamp(p, 7);
    return;
  }

  // ---- phase 1: fc1 (+ bias, ReLU) into act. A next phase-1 unit has its W prologue issued as
  // soon as the ring is free, before the epilogue; this CTA's first phase-2 unit right after its
  // barrier arrival (below), so DRAM keeps streaming for this CTA.
  stamp(p, 0);
  const int first = blockIdx.x;
  if (first < units1) unit1(first).prologue_w();  // the stored weight: before the wait is fine
  grid_dependency_wait();  // x (and everything else) only after it
  stamp(p, 1);
  for (int u = first; u < units1; u += gridDim.x) {
    const U g = unit1(u);
    const float2 b1 = bias1(u);
    g.prologue_x();
    g.run(acc);
    stamp(p, 2);
    const int next = u + gridDim.x;
    if (next < units1) unit1(next).prologue_w();  // the last unit's successor: after the arrival
    stash<MT>(red, acc);
    __syncthreads();
    store_act(u, b1);
    __syncthreads();  // the shared partials are read before the next unit overwrites them
  }

  stamp(p, 3);
  unsigned long long* bar = reinterpret_cast<unsigned long long*>(p.barrier);
  __syncthreads();  // act stores of the CTA before thread 0's release
  unsigned long long target = 0;
  if (threadIdx.x == 0) target = barrier_arrive(bar, gridDim.x);
  // the first `pre` of phase 2's W prologue stages stream while the other CTAs finish phase 1;
  // the rest (if any) are issued once the barrier is passed, still in stage (= commit group) order
  const int pre = p.prefetch2 < 0 ? C::kStages - 1 : min(p.prefetch2, C::kStages - 1);
  if (first < units2) unit2(first).prologue_w(0, pre);
  if (threadIdx.x == 0) barrier_wait(bar, target);
  __syncthreads();  // act complete and visible (cp.async.cg / ld.cg read the L2)
  if (first < units2) unit2(first).prologue_w(pre, C::kStages - 1);
  stamp(p, 4);
  grid_launch_dependents();  // the next PDL kernel (the split-K norm) may get resident

  // ---- phase 2: fc2 partials over K slices
  for (int u = first; u < units2; u += gridDim.x) {
    const U g = unit2(u);
    g.prologue_x();
    g.run(acc);
    if (u + static_cast<int>(gridDim.x) < units2) unit2(u + gridDim.x).prologue_w();
    stash<MT>(red, acc);
    __syncthreads();
    store_part(tile_of(u), split_of(u));
    __syncthreads();
  }

  stamp(p, 5);
  // ---- phase 3 (optional): reduce + bias + residual + norm, one row per CTA; the others only
  // arrive (every partial of theirs is written) and leave
  if constexpr (kNorm) {
    __syncthreads();
    if (first >= p.m) {
      if (threadIdx.x == 0) barrier_arrive(bar, gridDim.x);
    } else {
      if (threadIdx.x == 0) barrier_wait(bar, barrier_arrive(bar, gridDim.x));
      __syncthreads();
      stamp(p, 6);
      for (int row = first; row < p.m; row += gridDim.x)
        norm_row<T, kNormPairs, false>(p, row, red, row == first, nullptr);
    }
  }
  stamp(p, 7);
}

template <typename T, bool kHalf, int MT>
cudaError_t prepare() {  // > 48 KB of dynamic shared memory (tc_pipeline.cuh)
  using K = decltype(&decode_mlp_kernel<T, kHalf, MT, false>);
  if (const cudaError_t err = opt_in_shared_memory<K, &decode_mlp_accumulate_kernel<T, kHalf, MT>,
                                                   Config<MT>::kSmemBytes>();
      err != cudaSuccess)
    return err;
  if (const cudaError_t err = opt_in_shared_memory<K, &decode_mlp_kernel<T, kHalf, MT, true>, Config<MT>::kSmemBytes>();
      err != cudaSuccess)
    return err;
  return opt_in_shared_memory<K, &decode_mlp_kernel<T, kHalf, MT, false>, Config<MT>::kSmemBytes>();
}

template <typename T, bool kHalf, int MT>
cudaError_t launch_tiles(const DecodeMlpParams& p, cudaStream_t stream) {
  if (const cudaError_t err = prepare<T, kHalf, MT>(); err != cudaSuccess) return err;
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
  if (p.accumulate) return cudaLaunchKernelEx(&cfg, decode_mlp_accumulate_kernel<T, kHalf, MT>, p);
  if (p.norm_w != nullptr) return cudaLaunchKernelEx(&cfg, decode_mlp_kernel<T, kHalf, MT, true>, p);
  return cudaLaunchKernelEx(&cfg, decode_mlp_kernel<T, kHalf, MT, false>, p);
}

template <typename T, bool kHalf, int MT>
cudaError_t resident_tiles(int* ctas) {
  if (const cudaError_t err = prepare<T, kHalf, MT>(); err != cudaSuccess) return err;
  int dev = 0, sms = 0, per_sm = 0;
  if (cudaError_t err = cudaGetDevice(&dev); err != cudaSuccess) return err;
  if (cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev); err != cudaSuccess)
    return err;
  if (cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, decode_mlp_kernel<T, kHalf, MT, false>,
                                                                      kThreads, Config<MT>::kSmemBytes);
      err != cudaSuccess)
    return err;
  int per_sm_norm = 0;  // the phase-3 build has more registers: the grid must fit either
  if (cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &per_sm_norm, decode_mlp_kernel<T, kHalf, MT, true>, kThreads, Config<MT>::kSmemBytes);
      err != cudaSuccess)
    return err;
  *ctas = sms * std::min(per_sm, per_sm_norm);
  return cudaSuccess;
}

template <typename T, bool kHalf>
cudaError_t launch_typed(const DecodeMlpParams& p, cudaStream_t stream) {
  return with_m_tiles(p.m, [&](auto mt) { return launch_tiles<T, kHalf, decltype(mt)::value>(p, stream); });
}

template <typename T, bool kHalf>
cudaError_t resident_typed(int m, int* ctas) {
  return with_m_tiles(m, [&](auto mt) { return resident_tiles<T, kHalf, decltype(mt)::value>(ctas); });
}

}  // namespace

cudaError_t decode_mlp_resident_ctas(bool half_precision, int m, int* ctas) {
  if (m < 1 || m > kMlpMaxM) return cudaErrorInvalidValue;
  return half_precision ? resident_typed<__half, true>(m, ctas) : resident_typed<__nv_bfloat16, false>(m, ctas);
}

cudaError_t launch_decode_mlp(bool half_precision, const DecodeMlpParams& p, cudaStream_t stream) {
  if (p.m < 1 || p.m > kMlpMaxM || p.hidden <= 0 || p.hidden % kMlpTile != 0 || p.ffn <= 0 ||
      p.ffn % kMlpTile != 0 || p.k_splits < 1 || p.k_splits > kMlpMaxKSplits || p.k_splits > p.ffn / kMlpTile ||
      p.grid < 1 || p.barrier == nullptr ||
      (p.accumulate && (p.flow || p.norm_w != nullptr || p.k_splits != 1)) ||
      (p.norm_w != nullptr && (p.out == nullptr || p.res_out == nullptr ||
                                                                        p.hidden > kMlpMaxHidden))) {
    return cudaErrorInvalidValue;
  }
  return half_precision ? launch_typed<__half, true>(p, stream) : launch_typed<__nv_bfloat16, false>(p, stream);
}

}  // namespace hybrid
