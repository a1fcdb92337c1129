// Paged decode attention (and its append variant): dtype dispatch to the per-dtype launchers
// (paged_attention_*.cu).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launch.h"

namespace hybrid {

namespace {
bool g_decode_pdl_launch = false;
bool g_decode_prefetch = false;
}  // namespace

void set_decode_pdl_launch(bool on) { g_decode_pdl_launch = on; }
bool decode_pdl_launch() { return g_decode_pdl_launch; }
void set_decode_prefetch(bool on) { g_decode_prefetch = on; }
bool decode_prefetch() { return g_decode_prefetch; }

cudaError_t launch_paged_decode(DType dtype, const PagedDecodeParams& p, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kBFloat16:
      return launch_paged_decode_typed<__nv_bfloat16>(p, stream);
    case DType::kFloat16:
      return launch_paged_decode_typed<__half>(p, stream);
    case DType::kFloat32:
      return launch_paged_decode_typed<float>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_paged_decode_append(DType dtype, const PagedDecodeAppendParams& p, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kBFloat16:
      return launch_paged_decode_append_typed<__nv_bfloat16>(p, stream);
    case DType::kFloat16:
      return launch_paged_decode_append_typed<__half>(p, stream);
    case DType::kFloat32:
      return launch_paged_decode_append_typed<float>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t paged_decode_ctas_per_sm(DType dtype, int head_size, int heads_per_cta, int* ctas_per_sm) {
  switch (dtype) {
    case DType::kBFloat16:
      return paged_decode_ctas_per_sm_typed<__nv_bfloat16>(head_size, heads_per_cta, ctas_per_sm);
    case DType::kFloat16:
      return paged_decode_ctas_per_sm_typed<__half>(head_size, heads_per_cta, ctas_per_sm);
    case DType::kFloat32:
      return paged_decode_ctas_per_sm_typed<float>(head_size, heads_per_cta, ctas_per_sm);
  }
  return cudaErrorInvalidValue;
}

}  // namespace hybrid
