// How fast W streams through the skinny GEMM's cp.async ring when its consumer does what the real
// kernel does (csrc/skinny_gemm.cu: ldmatrix + mma.sync on MT m16 tiles of x), less, or nothing.
//
// Question it answers (csrc/NOTES.md, "Session 14"): the mma.sync skinny GEMM streams W at about the
// copy rate at <= 32 rows but at ~2 TB/s at 49-64 rows (4 m16 tiles, 2 x 4 warps, 3 stages). Alone,
// mma.sync has 2.3x the rate 64 rows need (wgmma_rate.cu). So what costs the rate: the x rows
// streamed through the ring (half of every stage at 64 rows), the bytes in flight (3 stages), or the
// ldmatrix / mma work next to the copies, or the 64-column tile (x read once per 64 columns)? Each
// configuration below streams the same ~512 MB of W (from HBM: 10x the L2), one 64- or 128-row
// column tile per CTA, as many CTAs as fit at once, and reports W's GB/s against the card's copy
// bandwidth. Nothing is checked for correctness: the accumulators
// are only kept alive.
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Icsrc bench/kernels/stream_consume.cu -o /tmp/sc
//   /tmp/sc [--json]          # or: python -m bench.kernels.stream_consume
//
// Uses the real kernel's pieces (csrc/tc_pipeline.cuh: swizzle, cp.async, ldmatrix.x4, mma.sync).
#include "tc_pipeline.cuh"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "micro_common.cuh"


using namespace hybrid::tc;  // NOLINT

constexpr int kThreads = 256;  // 8 warps, as the skinny GEMM

// MT: m16 tiles the consumer multiplies (0: no consumer); XT: x tiles streamed in every stage (0 with
// MT > 0: x loaded once and kept); WN: warps along N (1: 1 x 8, each warp one k16 step and all the
// n8 tiles; 2: 2 x 4 as the skinny GEMM above 32 rows; 4: 4 x 2); STAGES: ring depth; TN: W rows
// (output columns) per CTA, 64 as the skinny GEMM or 128 (x reused twice per stage).
template <int MT, int XT, int WN, int STAGES, int TN = 64>
struct Config {
  static constexpr int kTileN = TN;
  static constexpr int kWBytes = TN * kRowBytes;  // 16 / 32 KB per 128-k stage
  static constexpr int kXBytes = XT * 16 * kRowBytes;
  static constexpr int kStageBytes = kWBytes + kXBytes;
  static constexpr int kResidentX = (MT > 0 && XT == 0) ? MT * 16 * kRowBytes : 0;
  static constexpr int kSmem = STAGES * kStageBytes + kResidentX;
  static constexpr int WK = 8 / WN, NT = TN / 8 / WN;
};

template <int MT, int XT, int WN, int STAGES, int TN>
__global__ void __launch_bounds__(kThreads) stream_consume(const char* w, const char* x, int k, float* sink) {
  using C = Config<MT, XT, WN, STAGES, TN>;
  constexpr int kTileN = C::kTileN, kWBytes = C::kWBytes;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t ring = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t xres = ring + STAGES * C::kStageBytes;
  const size_t g_row = static_cast<size_t>(k) * 2;
  const char* wg = w + static_cast<size_t>(blockIdx.x) * kTileN * g_row;
  const int nstages = k / kStageK;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wn = warp / C::WK, wk = warp % C::WK;

  auto load_stage = [&](int st) {
    const uint32_t ws = ring + (st % STAGES) * C::kStageBytes;
#pragma unroll
    for (int i = 0; i < kTileN * kChunks / kThreads; ++i) {
      const int id = threadIdx.x + i * kThreads, row = id / kChunks, ch = id % kChunks;
      cp_async16(ws + swizzle(row, ch), wg + row * g_row + static_cast<size_t>(st) * kRowBytes + ch * 16, 16);
    }
#pragma unroll
    for (int i = 0; i < XT * 16 * kChunks / kThreads; ++i) {
      const int id = threadIdx.x + i * kThreads, row = id / kChunks, ch = id % kChunks;
      cp_async16(ws + kWBytes + swizzle(row, ch), x + row * g_row + static_cast<size_t>(st) * kRowBytes + ch * 16, 16);
    }
  };
  if (C::kResidentX > 0) {  // x kept: one 128-k slice, read by every stage
    for (int id = threadIdx.x; id < MT * 16 * kChunks; id += kThreads) {
      const int row = id / kChunks, ch = id % kChunks;
      cp_async16(xres + swizzle(row, ch), x + row * g_row + ch * 16, 16);
    }
  }

  float acc[MT > 0 ? MT : 1][C::NT][4] = {};
  const int mat = lane >> 3, mrow = lane & 7;
  auto compute = [&](int st) {
    const uint32_t ws = ring + (st % STAGES) * C::kStageBytes;
    const uint32_t xs = C::kResidentX > 0 ? xres : ws + kWBytes;
#pragma unroll
    for (int j = 0; j < kStageK / 16 / C::WK; ++j) {
      const int kk = wk + j * C::WK;
      uint32_t a[MT > 0 ? MT : 1][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        ldmatrix_x4(a[mt][0], a[mt][1], a[mt][2], a[mt][3], xs + swizzle(mt * 16 + (mat & 1) * 8 + mrow, kk * 2 + (mat >> 1)));
      }
      uint32_t b[C::NT][2];
#pragma unroll
      for (int np = 0; np < C::NT / 2; ++np) {
        ldmatrix_x4(b[2 * np][0], b[2 * np][1], b[2 * np + 1][0], b[2 * np + 1][1],
                    ws + swizzle((wn * C::NT + 2 * np + (mat >> 1)) * 8 + mrow, kk * 2 + (mat & 1)));
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < C::NT; ++nt) mma16816<false>(acc[mt][nt], a[mt], b[nt][0], b[nt][1]);
    }
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nstages) load_stage(s);
    cp_async_commit();
  }
  for (int st = 0; st < nstages; ++st) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // stage st landed for every thread; the slot of st - 1 is free
    if (st + STAGES - 1 < nstages) load_stage(st + STAGES - 1);
    cp_async_commit();
    if (MT > 0) compute(st);
  }
  cp_async_wait<0>();
  float s = 0.f;
#pragma unroll
  for (int mt = 0; mt < (MT > 0 ? MT : 1); ++mt)
#pragma unroll
    for (int nt = 0; nt < C::NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s += acc[mt][nt][e];
  if (s == 12345.f) sink[threadIdx.x] = s;  // keeps the consumer's work alive
}

struct Bench {
  int sms = 0;
  double copy_gbs = 0;
  bool json = false;
};

double copy_bandwidth_gbs() {  // device-to-device copy of 1 GiB: (read + write) bytes / time
  const size_t n = size_t(1) << 30;
  char *a, *b;
  CHECK(cudaMalloc(&a, n));
  CHECK(cudaMalloc(&b, n));
  const float ms = median_event_ms([&] { CHECK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice)); });
  CHECK(cudaFree(a));
  CHECK(cudaFree(b));
  return 2.0 * n / (ms * 1e-3) / 1e9;
}

template <int MT, int XT, int WN, int STAGES, int TN = 64>
void run(const Bench& bench, const char* what) {
  using C = Config<MT, XT, WN, STAGES, TN>;
  constexpr int kTileN = C::kTileN;
  auto kern = stream_consume<MT, XT, WN, STAGES, TN>;
  CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem));
  int per_sm = 0;
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, kThreads, C::kSmem));
  const int ctas = per_sm * bench.sms;
  const size_t target = size_t(512) << 20;  // W bytes streamed per launch
  const int k = std::max(kStageK, static_cast<int>(target / (size_t(ctas) * kTileN * 2) / kStageK * kStageK));
  const size_t wbytes = size_t(ctas) * kTileN * k * 2;
  char *w, *x;
  float* sink;
  CHECK(cudaMalloc(&w, wbytes));
  CHECK(cudaMalloc(&x, size_t(64) * k * 2));
  CHECK(cudaMalloc(&sink, kThreads * sizeof(float)));
  CHECK(cudaMemset(w, 0x3c, wbytes));
  CHECK(cudaMemset(x, 0x3c, size_t(64) * k * 2));
  const float ms = median_event_ms([&] { kern<<<ctas, kThreads, C::kSmem>>>(w, x, k, sink); });
  const double gbs = wbytes / (ms * 1e-3) / 1e9;
  const int in_flight_kb = per_sm * (STAGES - 1) * C::kWBytes / 1024;
  if (bench.json) {
    std::printf("{\"bench\": \"stream_consume\", \"config\": \"%s\", \"mt\": %d, \"xt\": %d, \"warps_n\": %d, "
                "\"stages\": %d, \"tile_n\": %d, \"ctas_per_sm\": %d, \"w_in_flight_kb_per_sm\": %d, "
                "\"smem_per_cta\": %d, \"w_gbs\": %.1f, \"copy_gbs\": %.1f, \"pct_copy\": %.1f}\n",
                what, MT, XT, WN, STAGES, TN, per_sm, in_flight_kb, C::kSmem, gbs, bench.copy_gbs,
                100.0 * gbs / bench.copy_gbs);
  } else {
    std::printf("%-44s MT %d XT %d %dx%d S %d N %3d  %d CTA/SM  W in flight %3d KB/SM  W %7.1f GB/s (%5.1f%% of copy)\n",
                what, MT, XT, WN, 8 / WN, STAGES, TN, per_sm, in_flight_kb, gbs, 100.0 * gbs / bench.copy_gbs);
  }
  std::fflush(stdout);
  CHECK(cudaFree(w));
  CHECK(cudaFree(x));
  CHECK(cudaFree(sink));
}

int main(int argc, char** argv) {
  Bench b;
  for (int i = 1; i < argc; ++i) b.json = b.json || std::strcmp(argv[i], "--json") == 0;
  CHECK(cudaDeviceGetAttribute(&b.sms, cudaDevAttrMultiProcessorCount, 0));
  b.copy_gbs = copy_bandwidth_gbs();
  run<0, 0, 1, 4>(b, "W only, no consumer");
  run<0, 4, 1, 3>(b, "W + 64 x rows, no consumer (M=64's ring)");
  run<1, 1, 1, 4>(b, "skinny M<=16 (1 tile, 1x8, 4 stages)");
  run<2, 2, 1, 4>(b, "skinny M<=32 (2 tiles, 1x8, 4 stages)");
  run<3, 3, 2, 3>(b, "skinny M<=48 (3 tiles, 2x4, 3 stages)");
  run<4, 4, 2, 3>(b, "skinny M<=64 (4 tiles, 2x4, 3 stages)");
  run<4, 0, 2, 3>(b, "M=64 compute, x kept (3 stages)");
  run<4, 0, 2, 4>(b, "M=64 compute, x kept (4 stages)");
  run<4, 0, 2, 6>(b, "M=64 compute, x kept (6 stages)");
  run<4, 4, 2, 6>(b, "M=64 as now, 6 stages");
  run<4, 4, 1, 3>(b, "M=64, 1x8 warps (x read once)");
  run<0, 0, 1, 7>(b, "W only, 7 stages");
  run<4, 4, 4, 3, 128>(b, "M=64, 128-column tiles, 4x2 warps, 3 stages");
  run<4, 4, 4, 4, 128>(b, "M=64, 128-column tiles, 4x2 warps, 4 stages");
  run<4, 0, 4, 4, 128>(b, "M=64, 128-column tiles, x kept, 4 stages");
  return 0;
}
