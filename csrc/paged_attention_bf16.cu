// Paged decode attention kernels for __nv_bfloat16 (one file per dtype so ninja compiles them in parallel).
#include "paged_attention.cuh"

namespace hybrid {
template cudaError_t launch_paged_decode_typed<__nv_bfloat16>(const PagedDecodeParams& p, cudaStream_t stream);
template cudaError_t launch_paged_decode_append_typed<__nv_bfloat16>(const PagedDecodeAppendParams& p, cudaStream_t stream);
template cudaError_t paged_decode_ctas_per_sm_typed<__nv_bfloat16>(int head_size, int heads_per_cta, int* ctas_per_sm);
}  // namespace hybrid
