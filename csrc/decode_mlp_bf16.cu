// The persistent decode MLP for bfloat16 (decode_mlp_kernel.cuh; one TU per dtype, compiled in parallel).
#include "decode_mlp_kernel.cuh"

namespace hybrid {

cudaError_t launch_decode_mlp_bf16(const DecodeMlpParams& p, cudaStream_t stream) {
  return launch_typed<__nv_bfloat16, false>(p, stream);
}

cudaError_t decode_mlp_resident_ctas_bf16(int m, int* ctas) { return resident_typed<__nv_bfloat16, false>(m, ctas); }

}  // namespace hybrid
