// Stream-K skinny (decode) GEMM on TMA + Hopper warpgroup MMA (sm_90a), M <= 64:
// y[M, N] = act(x[M, K] @ w[N, K]^T + b). The interface and the unit partition are in skinny_streamk.h.
//
// Status (csrc/NOTES.md, "Session 13" and "Session 14"): correct on an H200 (fp64 reference, every
// grid, PDL graph replays bit-identical), but 1.7-2x slower than cuBLAS (OPT qkv at 16 rows: 16.7 us
// vs 10.0), so the linear variants cuda_streamk(_pdl) are forced-only. What limits it (Session 14,
// per-unit traces of the HYBRID_STREAMK_TRACE build): the same TMA stream arrives at the copy rate
// (~0.24 us per 8 KB unit per SM) when the consumers free each slot unread, and at ~0.37 us per unit
// once they run the unit's 4 wgmma.m64n64k16. One wgmma per unit already costs most of that. The
// tensor core alone does the 4 in ~74 ns (bench/kernels/wgmma_rate.cu: 32 cycles each, its peak), so
// the wgmma work is serialised with the copy stream rather than overlapped. cuBLAS's TMA + wgmma
// kernels for these shapes reach the same ~2.9 TB/s; mma.sync + cp.async kernels stream at the copy
// rate. Build knobs for experiments: HYBRID_STREAMK_STAGES, _PIPE, _ARRIVE_WARP, and the timing-only
// _NO_MMA, _MMAS, _MMA_FIXED_SLOT, _RS_ZERO_A, plus the _TRACE diagnostics.
//
// Why: at 33-64 rows every projection kernel here (cuBLAS, the mma.sync and wgmma skinny GEMMs)
// streams its weight at 53-60% of the copy bandwidth. cuBLAS runs 96 CTAs of 64 columns for a
// 6144-column qkv (36 of 132 SMs idle); ours run whole column tiles per CTA with a 3-deep cp.async
// ring. Here every SM streams the same share of W through a deep TMA ring:
// - CTA = 1 producer warp + 2 consumer warpgroups taking alternate units (288 threads), one CTA per
//   SM (~213 KB of shared memory). A 9-warp CTA is given registers as 12 warps: <= 168 each.
// - Ring of kStages slots, each one unit: W box [64 rows x 64 k] (8 KB) and x box [m_box x 64 k],
//   both fetched by `cp.async.bulk.tensor` with the 128-byte swizzle wgmma reads (the same layout
//   skinny_wgmma.cu builds with cp.async), completion counted on the slot's "full" mbarrier; the
//   consumers free a slot on its "empty" mbarrier once their wgmma has read it. With PDL the
//   producer issues the first kStages W boxes before griddepcontrol.wait (weights are parameters),
//   x boxes after it.
// - x rows past M: the box has m_box = M rounded up to 8 rows (rows past M zero-filled by the TMA);
//   the shared rows past m_box hold whatever the ring held, so D rows past m_box are garbage and
//   never stored (a wgmma row of D depends only on the same row of A).
// - Per unit its warpgroup issues 4 wgmma.m64n64k16 (x as A, W as B, both K-major from shared
//   memory). At a tile's last unit, or the CTA's last, warpgroup 1 hands its sum to warpgroup 0
//   through shared memory, which flushes: stores (bias, ReLU, rounding as the other skinny GEMMs)
//   when the CTA holds the whole tile; else writes an fp32 partial, then a counter per tile
//   (atom.acq_rel.gpu after the warpgroup's barrier) picks the last arriver, which sums the tile's
//   partials in contributor order (its own from registers) and stores. Nobody waits on another CTA.
#include "skinny_streamk.h"
#include "tc_pipeline.cuh"
#include "wgmma.cuh"

#include <algorithm>
#include <cstdint>

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace hybrid {
namespace {

using namespace tc;  // NOLINT: grid_dependency_wait / grid_launch_dependents, Pair
using namespace wg;  // NOLINT: the warpgroup MMA pieces (wgmma.cuh)

constexpr int kWarpgroup = 128;
constexpr int kConsumers = 2 * kWarpgroup;       // two warpgroups, taking alternate units
constexpr int kThreads = kConsumers + 32;        // + the producer warp
#ifndef HYBRID_STREAMK_STAGES
#define HYBRID_STREAMK_STAGES 12  // a build experiment may set fewer (6 leaves room for 2 CTAs per SM)
#endif
constexpr int kStages = HYBRID_STREAMK_STAGES;
// Build experiments on the consumer side (csrc/NOTES.md, "Session 14"):
// HYBRID_STREAMK_PIPE=1 keeps one wgmma group in flight per warpgroup (wait_group 1; a unit's slot
// is freed once the warpgroup's next unit has been issued); HYBRID_STREAMK_ARRIVE_WARP=1 frees a slot
// with one arrival per warp (lane 0, after the warp's wait) instead of one per thread;
// HYBRID_STREAMK_NO_MMA=1 is timing-only (wrong results): the consumers free each slot without
// reading it, which leaves the TMA ring alone to set the pace.
#ifndef HYBRID_STREAMK_PIPE
#define HYBRID_STREAMK_PIPE 0
#endif
#ifndef HYBRID_STREAMK_ARRIVE_WARP
#define HYBRID_STREAMK_ARRIVE_WARP 0
#endif
#ifndef HYBRID_STREAMK_NO_MMA
#define HYBRID_STREAMK_NO_MMA 0
#endif
// HYBRID_STREAMK_TRACE=1 (diagnostics build): CTA 0 records, per unit (first 64), when the producer
// issued its copies, when its data was seen ready, when its wgmma group was issued and done
// (%globaltimer, shared memory), and at exit writes them to the stamps buffer (>= 257 entries)
// instead of the per-CTA stamps: 4 x 64 values (issued, ready, mma issued, mma done) and its start.
// Timing-only diagnostics (wrong results): HYBRID_STREAMK_MMA_FIXED_SLOT=1 points every wgmma at ring
// slot 0 instead of the unit's slot; HYBRID_STREAMK_MMAS=n issues n (1-4) of the unit's 4 wgmmas.
#ifndef HYBRID_STREAMK_MMA_FIXED_SLOT
#define HYBRID_STREAMK_MMA_FIXED_SLOT 0
#endif
#ifndef HYBRID_STREAMK_MMAS
#define HYBRID_STREAMK_MMAS 4
#endif
// HYBRID_STREAMK_RS_ZERO_A=1 (timing-only, wrong results): the wgmmas take A (x) from registers
// holding zeros (wgmma RS), so only W is read from shared memory by the tensor cores.
#ifndef HYBRID_STREAMK_RS_ZERO_A
#define HYBRID_STREAMK_RS_ZERO_A 0
#endif
#ifndef HYBRID_STREAMK_TRACE
#define HYBRID_STREAMK_TRACE 0
#endif
[[maybe_unused]] constexpr int kTraceUnits = 64;
[[maybe_unused]] constexpr int kEmptyArrivals = HYBRID_STREAMK_ARRIVE_WARP ? kWarpgroup / 32 : kWarpgroup;
constexpr int kBoxBytes = kStreamKTile * 128;    // 64 rows x 64 k of 2-byte elements: 8 KB
constexpr int kStageBytes = 2 * kBoxBytes;       // W box, then x box (up to 64 rows)
constexpr int kRingBytes = kStages * kStageBytes;
constexpr int kBarBytes = 2 * kStages * 8;       // full[kStages], empty[kStages]
constexpr int kBiasBytes = kStreamKMaxTilesPerCta * kStreamKTile * 4;
constexpr int kXchBytes = 32 * kWarpgroup * 4;   // warpgroup 1's accumulators, handed to warpgroup 0
constexpr int kSmemBytes = 1024 + kRingBytes + kBarBytes + kBiasBytes + kXchBytes + 16;  // + alignment, flag
static_assert(kSmemBytes <= 227 * 1024, "one CTA per SM");

#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
// CTA holding unit u: the largest c with c * U / G <= u.
__device__ __forceinline__ int cta_of(int64_t u, int64_t units, int ctas) {
  return static_cast<int>(((u + 1) * ctas - 1) / units);
}
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
// Polls the barrier's phase `parity` (test_wait: never suspends the thread; try_wait's suspension
// was a candidate for the ~0.5 us per unit measured with it); ~4 G cycles without it -> trap.
// `warp` = the lanes of the calling warp that wait together (the consumers: all; the producer: lane 0).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity, unsigned int warp = 0xffffffffu) {
  uint32_t done = 0;
  const long long t0 = clock64();
  while (true) {
    asm volatile("{\n.reg .pred p;\nmbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done)
                 : "r"(bar), "r"(parity)
                 : "memory");
    if (__all_sync(warp, done)) return;  // a vote: a warp-uniform exit (no divergent path for ptxas)
    if (clock64() - t0 > (4ll << 30)) __trap();
  }
}
__device__ __forceinline__ uint64_t l2_policy_evict_first() {
  uint64_t pol;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  return pol;
}
__device__ __forceinline__ uint64_t l2_policy_evict_last() {
  uint64_t pol;
  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(pol));
  return pol;
}
// 2-D tensor box (c0 = k element, c1 = row) into shared memory, completing on `bar`.
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar,
                                         uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%2, %3}], [%4], %5;" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar), "l"(policy)
      : "memory");
}
__device__ __forceinline__ unsigned int ticket(unsigned int* c) {
  unsigned int old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(c) : "memory");
  return old;
}
// D[64 x 64] += A (registers: this thread's 4 x bf16x2 fragment) * B[16 x 64] (shared, K-major).
__device__ __forceinline__ void wgmma_rs_m64n64k16_bf16(float (&d)[32], const uint32_t (&a)[4], uint64_t b) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "
               "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                 "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}
__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ void stamp(const StreamKParams& p, int i) {
  if (!HYBRID_STREAMK_TRACE && p.stamps != nullptr && threadIdx.x == 0) {  // the trace build uses the buffer
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    p.stamps[blockIdx.x * kStreamKStamps + i] = t;
  }
}
// Warpgroup 0 alone (the flush); both warpgroups (the accumulator hand-over, two phases).
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(kWarpgroup) : "memory"); }
__device__ __forceinline__ void handover_sync(int id) { asm volatile("bar.sync %0, %1;" ::"r"(id), "n"(kConsumers) : "memory"); }
#endif  // wgmma targets

template <typename T, bool kHalf>
__global__ void __launch_bounds__(kThreads, 1)
    skinny_streamk_kernel(const __grid_constant__ CUtensorMap tw, const __grid_constant__ CUtensorMap tx,
                          const StreamKParams p) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // built for a target without wgmma (not sm_90a): the launcher refuses before this
#else
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t ring = (raw + 1023u) & ~1023u;
  unsigned char* base = smem_raw + (ring - raw);
  const uint32_t full = ring + kRingBytes;
  const uint32_t empty = full + kStages * 8;
  float* bias_s = reinterpret_cast<float*>(base + kRingBytes + kBarBytes);
  float* xch = reinterpret_cast<float*>(base + kRingBytes + kBarBytes + kBiasBytes);
  int* flag = reinterpret_cast<int*>(base + kRingBytes + kBarBytes + kBiasBytes + kXchBytes);

  __shared__ unsigned long long trace[HYBRID_STREAMK_TRACE ? 4 * kTraceUnits + 1 : 1];
  const bool tracing = HYBRID_STREAMK_TRACE && blockIdx.x == 0;
  if (tracing && threadIdx.x == 0) trace[4 * kTraceUnits] = global_ns();
  const int kb_count = p.k / kStreamKTile;
  const int64_t units = static_cast<int64_t>(p.n / kStreamKTile) * kb_count;
  const int c = blockIdx.x, G = gridDim.x;
  const int64_t u0 = c * units / G, u1 = (c + 1) * units / G;
  const int count = static_cast<int>(u1 - u0);
  const int t_lo = static_cast<int>(u0 / kb_count);
  const int m_box = min(kStreamKMaxM, (p.m + 7) & ~7);
  const uint32_t stage_tx = kBoxBytes + m_box * 128;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full + 8 * s, 1);
      mbar_init(empty + 8 * s, kEmptyArrivals);  // a unit is read by one warpgroup
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  if (threadIdx.x < kConsumers && count > 0) {  // the bias of this CTA's tiles (a parameter: before the wait)
    using T2 = typename Pair<T>::T2;
    const int tiles = static_cast<int>((u1 - 1) / kb_count) - t_lo + 1;
    const T2* b2 = static_cast<const T2*>(p.bias);
    for (int i = threadIdx.x; i < tiles * kStreamKTile / 2; i += kConsumers) {
      const float2 v = b2 != nullptr ? Pair<T>::to_float2(b2[t_lo * kStreamKTile / 2 + i]) : make_float2(0.f, 0.f);
      bias_s[2 * i] = v.x;
      bias_s[2 * i + 1] = v.y;
    }
  }
  __syncthreads();

  if (threadIdx.x >= kConsumers) {  // the producer warp: one lane issues every copy
    if (threadIdx.x == kConsumers) {
      const uint64_t w_pol = l2_policy_evict_first(), x_pol = l2_policy_evict_last();
      auto w_box = [&](int i) {
        const int64_t u = u0 + i;
        const uint32_t slot = ring + (i % kStages) * kStageBytes;
        tma_load(slot, &tw, static_cast<int>(u % kb_count) * kStreamKTile, static_cast<int>(u / kb_count) * kStreamKTile,
                 full + 8 * (i % kStages), w_pol);
      };
      auto x_box = [&](int i) {
        const int64_t u = u0 + i;
        const uint32_t slot = ring + (i % kStages) * kStageBytes + kBoxBytes;
        tma_load(slot, &tx, static_cast<int>(u % kb_count) * kStreamKTile, 0, full + 8 * (i % kStages), x_pol);
      };
      const int pre = min(count, kStages);
      for (int i = 0; i < pre; ++i) {
        if (tracing && i < kTraceUnits) trace[i] = global_ns();
        mbar_expect_tx(full + 8 * i, stage_tx);
        w_box(i);
      }
      grid_dependency_wait();  // x is the previous kernel's output
      for (int i = 0; i < pre; ++i) x_box(i);
      grid_launch_dependents();
      for (int i = pre; i < count; ++i) {
        const int s = i % kStages;
        mbar_wait(empty + 8 * s, ((i / kStages) - 1) & 1, 1u);  // the consumers have read unit i - kStages
        if (tracing && i < kTraceUnits) trace[i] = global_ns();
        mbar_expect_tx(full + 8 * s, stage_tx);
        w_box(i);
        x_box(i);
      }
    }
    return;
  }

  // The consumer warpgroups: unit i is computed by warpgroup i % 2 (two wgmma streams per SM; one
  // warpgroup's 4 wgmma.m64n64k16 per 8 KB unit measured ~0.5 us per unit, half the copy rate, with
  // 1 or 4 accumulator sets alike; the copy stream slowed by the wgmma work, not the tensor core
  // itself: see the header). At a flush warpgroup 1 hands its sum to warpgroup 0, which flushes.
  grid_dependency_wait();  // before any global write (y, the workspace and the counters may still be in use)
  stamp(p, 0);
  using T2 = typename Pair<T>::T2;
  T2* y = static_cast<T2*>(p.y);
  // warp-uniform as the compiler sees it (a shuffle of lane 0), so a wgmma group may stay in flight
  // across the branches on it without ptxas serializing the wgmmas (C7518)
  const int wgi = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x / kWarpgroup), 0);
  const int ltid = threadIdx.x % kWarpgroup;
  const int lane = threadIdx.x & 31, warp = ltid >> 5;
  const int r0 = 16 * warp + (lane >> 2);  // m64nN D fragment: register 4j + e at row r0 (+8 for e >= 2),
  const int c0 = 2 * (lane & 3);           // column 8j + c0 + (e & 1)
  float acc[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) acc[i] = 0.f;

  auto store = [&](int t) {
    const float* bt = bias_s + (t - t_lo) * kStreamKTile;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = r0 + 8 * h, col = 8 * j + c0;
        if (row < p.m) {
          float2 v = make_float2(acc[4 * j + 2 * h] + bt[col], acc[4 * j + 2 * h + 1] + bt[col + 1]);
          if (p.relu) {
            v.x = fmaxf(v.x, 0.f);
            v.y = fmaxf(v.y, 0.f);
          }
          y[(static_cast<size_t>(row) * p.n + static_cast<size_t>(t) * kStreamKTile + col) / 2] = Pair<T>::from_float2(v);
        }
      }
    }
  };
  auto flush = [&](int t, bool final_one) {
    const int64_t first = static_cast<int64_t>(t) * kb_count, last = first + kb_count - 1;
    if (first < u0 || last >= u1) {  // shared with other CTAs: partial, ticket, the last one sums
      const int c_first = cta_of(first, units, G);
      const int nc = cta_of(last, units, G) - c_first + 1, slot = c - c_first;
      const size_t slab = static_cast<size_t>(p.m) * kStreamKTile;
      float* part = p.workspace + static_cast<size_t>(t) * p.max_contrib * slab;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = r0 + 8 * h, col = 8 * j + c0;
          if (row < p.m) {
            *reinterpret_cast<float2*>(part + slot * slab + row * kStreamKTile + col) =
                make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
          }
        }
      }
      consumers_sync();  // every consumer's partial stored before the release below
      if (final_one) stamp(p, 4);
      if (threadIdx.x == 0) {
        const bool last_one = ticket(p.counters + t) == static_cast<unsigned int>(nc - 1);
        if (last_one) p.counters[t] = 0u;  // every other contributor has arrived: nobody reads it again
        *flag = last_one;
      }
      consumers_sync();
      if (final_one) stamp(p, 5);
      if (!*flag) return;
      // The last arriver: each other slot's 16 pairs loaded together (one L2 round trip per slot),
      // summed in contributor order: the same bits whoever is last.
      float2 sum[16];
#pragma unroll
      for (int q = 0; q < 16; ++q) sum[q] = make_float2(0.f, 0.f);
      auto at = [&](int s, int q) {  // pair q = (j, h) of slot s
        return reinterpret_cast<const float2*>(part + s * slab + (r0 + 8 * (q & 1)) * kStreamKTile + 8 * (q >> 1) + c0);
      };
      for (int s = 0; s < nc; ++s) {
        const bool other = s != slot;
        float2 v[16];
#pragma unroll
        for (int q = 0; q < 16; ++q) {
          v[q] = other && r0 + 8 * (q & 1) < p.m ? __ldcg(at(s, q)) : make_float2(0.f, 0.f);
        }
#pragma unroll
        for (int q = 0; q < 16; ++q) {
          const float2 a = other ? v[q] : make_float2(acc[4 * (q >> 1) + 2 * (q & 1)], acc[4 * (q >> 1) + 2 * (q & 1) + 1]);
          sum[q].x += a.x;
          sum[q].y += a.y;
        }
      }
#pragma unroll
      for (int q = 0; q < 16; ++q) {
        acc[4 * (q >> 1) + 2 * (q & 1)] = sum[q].x;
        acc[4 * (q >> 1) + 2 * (q & 1) + 1] = sum[q].y;
      }
      if (final_one) stamp(p, 6);
    }
    store(t);
  };

  // Frees ring slot s once this thread's (warp's) wgmma reads of it are complete.
  auto release = [&](int s) {
    if (HYBRID_STREAMK_ARRIVE_WARP) {
      __syncwarp();
      if (lane == 0) mbar_arrive(empty + 8 * s);
    } else {
      mbar_arrive(empty + 8 * s);
    }
  };
  uint32_t a_zero[4] = {0u, 0u, 0u, 0u};  // HYBRID_STREAMK_RS_ZERO_A
  asm volatile("" : "+r"(a_zero[0]), "+r"(a_zero[1]), "+r"(a_zero[2]), "+r"(a_zero[3]));
  int pending = -1;  // HYBRID_STREAMK_PIPE: this warpgroup's slot whose wgmma group may be in flight
  for (int i = 0; i < count; ++i) {
    if ((i & 1) == wgi) {
      const int s = i % kStages;
      mbar_wait(full + 8 * s, (i / kStages) & 1);
      if (i == 0) stamp(p, 1);
      if (tracing && ltid == 0 && i < kTraceUnits) trace[kTraceUnits + i] = global_ns();
      const uint32_t ws = ring + (HYBRID_STREAMK_MMA_FIXED_SLOT ? 0 : s) * kStageBytes, xs = ws + kBoxBytes;
      if (HYBRID_STREAMK_NO_MMA) {
        release(s);
      } else {
        pin(acc);
        wg_fence();
#pragma unroll
        for (int j = 0; j < HYBRID_STREAMK_MMAS; ++j) {
          if (HYBRID_STREAMK_RS_ZERO_A) {
            wgmma_rs_m64n64k16_bf16(acc, a_zero, wg_desc(ws + 32 * j));
          } else {
            wgmma_m64n64k16<kHalf>(acc, wg_desc(xs + 32 * j), wg_desc(ws + 32 * j));
          }
        }
        wg_commit();
        if (tracing && ltid == 0 && i < kTraceUnits) trace[2 * kTraceUnits + i] = global_ns();
        if (HYBRID_STREAMK_PIPE) {
          wg_wait_one();  // this warpgroup's previous unit is read: free its slot
          pin(acc);
          if (pending >= 0) release(pending);
          pending = s;
        } else {
          wg_wait_all();
          pin(acc);
          if (tracing && ltid == 0 && i < kTraceUnits) trace[3 * kTraceUnits + i] = global_ns();
          release(s);
        }
      }
    }
    const int64_t u = u0 + i;
    if (u % kb_count == kb_count - 1 || i == count - 1) {  // the tile's last unit here: both hand over
      if (HYBRID_STREAMK_PIPE) {  // unconditional wait: ptxas sees no path with a group in flight below
        wg_wait_all();
        pin(acc);
        if (pending >= 0) release(pending);
        pending = -1;
      }
      if (wgi == 1) {
#pragma unroll
        for (int e = 0; e < 32; ++e) xch[e * kWarpgroup + ltid] = acc[e];
      }
      handover_sync(2);
      if (wgi == 0) {
#pragma unroll
        for (int e = 0; e < 32; ++e) acc[e] += xch[e * kWarpgroup + ltid];  // fixed order: 0 then 1
      }
      handover_sync(3);  // warpgroup 1 may overwrite xch only after warpgroup 0 has read it
      if (i == count - 1) stamp(p, 2);
      if (wgi == 0) flush(static_cast<int>(u / kb_count), i == count - 1);
#pragma unroll
      for (int e = 0; e < 32; ++e) acc[e] = 0.f;
    }
  }
  if (HYBRID_STREAMK_PIPE) {
    wg_wait_all();  // nothing is in flight here (the last unit flushed), but ptxas cannot tell
    pin(acc);
  }
  stamp(p, 7);
  if (HYBRID_STREAMK_TRACE) {
    asm volatile("bar.sync 4, %0;" ::"n"(kConsumers) : "memory");  // both consumer warpgroups' records
    if (tracing && threadIdx.x == 0 && p.stamps != nullptr) {  // read back by bench.kernels.streamk_phases --trace
      for (int i = 0; i <= 4 * kTraceUnits; ++i) p.stamps[i] = trace[i];
    }
  }
#endif
}

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled from the driver (the runtime has no wrapper); nullptr where it is missing.
EncodeTiled encode_tiled() {
  static const EncodeTiled fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      return static_cast<EncodeTiled>(nullptr);
    }
    return reinterpret_cast<EncodeTiled>(f);
  }();
  return fn;
}

// [rows, k] row-major 2-byte matrix in boxes of box_rows x 64 k, 128-byte swizzle.
bool encode(CUtensorMap* map, bool half, const void* ptr, int rows, int k, int box_rows, bool weight) {
  const EncodeTiled fn = encode_tiled();
  if (fn == nullptr) return false;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(k) * 2};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(kStreamKTile), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem[2] = {1, 1};
  return fn(map, half ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(ptr),
            dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
            weight ? CU_TENSOR_MAP_L2_PROMOTION_L2_256B : CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <typename T, bool kHalf>
cudaError_t launch_typed(const StreamKParams& p, cudaStream_t stream) {
  using Kern = decltype(&skinny_streamk_kernel<T, kHalf>);
  if (const cudaError_t err = opt_in_shared_memory<Kern, &skinny_streamk_kernel<T, kHalf>, kSmemBytes>();
      err != cudaSuccess) {
    return err;
  }
  CUtensorMap tw, tx;
  const int m_box = std::min(kStreamKMaxM, (p.m + 7) & ~7);
  if (!encode(&tw, kHalf, p.w, p.n, p.k, kStreamKTile, true) || !encode(&tx, kHalf, p.x, p.m, p.k, m_box, false)) {
    return cudaErrorNotSupported;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(p.ctas, 1, 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = kSmemBytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = p.pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, skinny_streamk_kernel<T, kHalf>, tw, tx, p);
}

}  // namespace

bool skinny_streamk_built() { return wg::kSm90aBuild; }

cudaError_t launch_skinny_streamk(bool half_precision, const StreamKParams& p, cudaStream_t stream) {
  if (!skinny_streamk_built()) return cudaErrorNotSupported;
  if (p.m < 1 || p.m > kStreamKMaxM || p.n <= 0 || p.n % kStreamKTile != 0 || p.k <= 0 || p.k % kStreamKTile != 0 ||
      p.n / kStreamKTile > kStreamKMaxTiles || p.ctas < 1 ||
      static_cast<int64_t>(p.ctas) > static_cast<int64_t>(p.n / kStreamKTile) * (p.k / kStreamKTile) ||
      p.max_contrib < streamk_max_contrib(p.n, p.k, p.ctas) ||
      streamk_max_tiles_per_cta(p.n, p.k, p.ctas) > kStreamKMaxTilesPerCta || p.counters == nullptr ||
      p.workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  return half_precision ? launch_typed<__half, true>(p, stream) : launch_typed<__nv_bfloat16, false>(p, stream);
}

}  // namespace hybrid
