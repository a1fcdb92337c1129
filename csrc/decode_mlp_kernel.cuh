// The persistent decode MLP's kernel and its launch templates, instantiated once per dtype by
// decode_mlp_bf16.cu / decode_mlp_fp16.cu, two TUs that nvcc builds in parallel. As one TU this was
// the extension build's longest compile: 47 s on a 2-core CPU machine, against 12.5 s for the next
// longest; each half takes 24 s. decode_mlp.cu checks the parameters and dispatches on the dtype.
//
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
#pragma once

#include "decode_mlp_core.cuh"
#include "decode_mlp_norm.cuh"

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace hybrid {
namespace {

constexpr long long kBarrierTimeoutCycles = 1LL << 32;  // ~2 s at H100/H200 clocks

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
  if (const cudaError_t err = opt_in_shared_memory<K, &decode_mlp_kernel<T, kHalf, MT, true>, Config<MT>::kSmemBytes>();
      err != cudaSuccess)
    return err;
  return opt_in_shared_memory<K, &decode_mlp_kernel<T, kHalf, MT, false>, Config<MT>::kSmemBytes>();
}

template <typename T, bool kHalf, int MT>
cudaError_t launch_tiles(const DecodeMlpParams& p, cudaStream_t stream) {
  if (const cudaError_t err = prepare<T, kHalf, MT>(); err != cudaSuccess) return err;
  if (p.norm_w != nullptr) return launch_mlp_kernel<MT>(decode_mlp_kernel<T, kHalf, MT, true>, p, stream);
  return launch_mlp_kernel<MT>(decode_mlp_kernel<T, kHalf, MT, false>, p, stream);
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
}  // namespace hybrid
