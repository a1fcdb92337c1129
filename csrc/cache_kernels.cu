// KV-cache write by slot mapping: scatter this step's keys and values into the paged pool.
//
// One CTA per token copies the token's [num_kv_heads, head_size] key and value rows to slot
// `slot_mapping[t]`; in the contiguous [num_blocks, block_size, num_kv_heads, head_size] layout a
// slot's rows are one contiguous run starting at slot * num_kv_heads * head_size. Negative slots
// (batch padding of CUDA-graph buckets) and slots past the pool are skipped. 16-byte accesses when
// every pointer and stride allows them, element by element otherwise.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launch.h"

namespace hybrid {

template <typename T, typename V>
__global__ void write_kv_cache_kernel(const WriteKVCacheParams p) {
  constexpr int kN = sizeof(V) / sizeof(T);  // elements per access
  const int64_t t = blockIdx.x;
  const int64_t slot = p.slot_mapping[t];
  if (slot < 0 || slot >= p.num_slots) return;
  const int vec_per_head = p.head_size / kN;
  const int n = p.num_kv_heads * vec_per_head;
  const int64_t dst = slot * p.num_kv_heads * p.head_size;  // elements
  V* k_dst = reinterpret_cast<V*>(static_cast<T*>(p.key_cache) + dst);
  V* v_dst = reinterpret_cast<V*>(static_cast<T*>(p.value_cache) + dst);
  const T* k_src = static_cast<const T*>(p.key) + t * p.key_stride_token;
  const T* v_src = static_cast<const T*>(p.value) + t * p.value_stride_token;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int h = i / vec_per_head;
    const int c = i - h * vec_per_head;
    k_dst[i] = *reinterpret_cast<const V*>(k_src + h * p.key_stride_head + c * kN);
    v_dst[i] = *reinterpret_cast<const V*>(v_src + h * p.value_stride_head + c * kN);
  }
}

template <typename T>
cudaError_t launch_write_kv_cache_typed(const WriteKVCacheParams& p, cudaStream_t stream) {
  const int per_access = p.vectorized ? static_cast<int>(16 / sizeof(T)) : 1;
  const int n = p.num_kv_heads * p.head_size / per_access;
  const int threads = n >= 256 ? 256 : (n + 31) / 32 * 32;
  if (p.vectorized) {
    write_kv_cache_kernel<T, uint4><<<p.num_tokens, threads, 0, stream>>>(p);
  } else {
    write_kv_cache_kernel<T, T><<<p.num_tokens, threads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t launch_write_kv_cache(DType dtype, const WriteKVCacheParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kBFloat16:
      return launch_write_kv_cache_typed<__nv_bfloat16>(p, stream);
    case DType::kFloat16:
      return launch_write_kv_cache_typed<__half>(p, stream);
    case DType::kFloat32:
      return launch_write_kv_cache_typed<float>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace hybrid
