// The persistent decode MLP for float16 (decode_mlp_kernel.cuh; one TU per dtype, compiled in parallel).
#include "decode_mlp_kernel.cuh"

namespace hybrid {

cudaError_t launch_decode_mlp_fp16(const DecodeMlpParams& p, cudaStream_t stream) {
  return launch_typed<__half, true>(p, stream);
}

cudaError_t decode_mlp_resident_ctas_fp16(int m, int* ctas) { return resident_typed<__half, true>(m, ctas); }

}  // namespace hybrid
