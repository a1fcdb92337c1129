// The persistent decode MLP's ffn-split schedule (DecodeMlpParams.accumulate, decode_mlp.h): CTA
// c streams fc1 tile c, then through the same ring the matching 64 rows of fc2's TRANSPOSED weight,
// and adds its fp32 products into one sum with vector atomics; no CTA waits for another.
// csrc/NOTES.md "Session 8": correct, measured slower in the decode step than the flow schedule,
// so the autotune does not offer it. A TU of its own: decode_mlp.cu's launch_decode_mlp calls
// launch_decode_mlp_accumulate for p.accumulate.
#include "decode_mlp_core.cuh"

namespace hybrid {
namespace {

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

template <typename T, bool kHalf, int MT>
cudaError_t launch_tiles(const DecodeMlpParams& p, cudaStream_t stream) {
  using K = decltype(&decode_mlp_accumulate_kernel<T, kHalf, MT>);  // > 48 KB of dynamic shared memory
  if (const cudaError_t err =
          opt_in_shared_memory<K, &decode_mlp_accumulate_kernel<T, kHalf, MT>, Config<MT>::kSmemBytes>();
      err != cudaSuccess)
    return err;
  return launch_mlp_kernel<MT>(decode_mlp_accumulate_kernel<T, kHalf, MT>, p, stream);
}

template <typename T, bool kHalf>
cudaError_t launch_typed(const DecodeMlpParams& p, cudaStream_t stream) {
  return with_m_tiles(p.m, [&](auto mt) { return launch_tiles<T, kHalf, decltype(mt)::value>(p, stream); });
}

}  // namespace

cudaError_t launch_decode_mlp_accumulate(bool half_precision, const DecodeMlpParams& p, cudaStream_t stream) {
  return half_precision ? launch_typed<__half, true>(p, stream) : launch_typed<__nv_bfloat16, false>(p, stream);
}

}  // namespace hybrid
