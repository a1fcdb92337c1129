// 16-byte vector helpers shared by the kernels: unpack bf16 / fp16 / fp32 to fp32 registers.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace hybrid {

// Elements of T in one 16-byte access.
template <typename T>
struct VecTraits;
template <>
struct VecTraits<float> {
  static constexpr int kVec = 4;
};
template <>
struct VecTraits<__half> {
  static constexpr int kVec = 8;
};
template <>
struct VecTraits<__nv_bfloat16> {
  static constexpr int kVec = 8;
};

__device__ __forceinline__ uint4 load_vec16(const void* ptr) {
  return __ldg(reinterpret_cast<const uint4*>(ptr));  // read-only path, 16 bytes per thread
}

__device__ __forceinline__ uint4 zero_vec16() { return make_uint4(0u, 0u, 0u, 0u); }

template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float (&out)[VecTraits<T>::kVec]);

template <>
__device__ __forceinline__ void unpack<float>(const uint4& raw, float (&out)[4]) {
  out[0] = __uint_as_float(raw.x);
  out[1] = __uint_as_float(raw.y);
  out[2] = __uint_as_float(raw.z);
  out[3] = __uint_as_float(raw.w);
}

// bf16 is the upper half of an fp32: shifting / masking converts with no cvt instruction.
__device__ __forceinline__ void unpack_bf16x2(uint32_t w, float& lo, float& hi) {
  lo = __uint_as_float(w << 16);
  hi = __uint_as_float(w & 0xffff0000u);
}

template <>
__device__ __forceinline__ void unpack<__nv_bfloat16>(const uint4& raw, float (&out)[8]) {
  unpack_bf16x2(raw.x, out[0], out[1]);
  unpack_bf16x2(raw.y, out[2], out[3]);
  unpack_bf16x2(raw.z, out[4], out[5]);
  unpack_bf16x2(raw.w, out[6], out[7]);
}

__device__ __forceinline__ void unpack_halfx2(uint32_t w, float& lo, float& hi) {
  __half2 h;
  *reinterpret_cast<uint32_t*>(&h) = w;
  const float2 f = __half22float2(h);
  lo = f.x;
  hi = f.y;
}

template <>
__device__ __forceinline__ void unpack<__half>(const uint4& raw, float (&out)[8]) {
  unpack_halfx2(raw.x, out[0], out[1]);
  unpack_halfx2(raw.y, out[2], out[3]);
  unpack_halfx2(raw.z, out[4], out[5]);
  unpack_halfx2(raw.w, out[6], out[7]);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

}  // namespace hybrid
