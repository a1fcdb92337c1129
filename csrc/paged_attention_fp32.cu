// Paged decode attention kernels for float (one file per dtype so ninja compiles them in parallel).
#include "paged_attention.cuh"

namespace hybrid {
template cudaError_t launch_paged_decode_typed<float>(const PagedDecodeParams& p, cudaStream_t stream);
template cudaError_t launch_paged_decode_append_typed<float>(const PagedDecodeAppendParams& p, cudaStream_t stream);
template cudaError_t paged_decode_ctas_per_sm_typed<float>(int head_size, int heads_per_cta, int* ctas_per_sm);
}  // namespace hybrid
