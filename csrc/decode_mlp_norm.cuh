// Phase 3 of the persistent decode MLP (decode_mlp.cu): one row's split-K reduce + bias + residual +
// LayerNorm / RMSNorm, by one CTA, with linear_norm's _splitk_add_norm_kernel rounding steps.
#pragma once

#include "decode_mlp_core.cuh"

namespace hybrid {
namespace {

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

}  // namespace
}  // namespace hybrid
