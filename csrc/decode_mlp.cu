// The persistent decode MLP's entry points: parameter checks and the dtype dispatch. The kernel
// (decode_mlp_kernel.cuh) is instantiated per dtype in decode_mlp_bf16.cu / decode_mlp_fp16.cu, the
// ffn-split schedule in decode_mlp_accumulate.cu.
#include "decode_mlp.h"

namespace hybrid {

cudaError_t decode_mlp_resident_ctas(bool half_precision, int m, int* ctas) {
  if (m < 1 || m > kMlpMaxM) return cudaErrorInvalidValue;
  return half_precision ? decode_mlp_resident_ctas_fp16(m, ctas) : decode_mlp_resident_ctas_bf16(m, ctas);
}

cudaError_t launch_decode_mlp(bool half_precision, const DecodeMlpParams& p, cudaStream_t stream) {
  if (p.m < 1 || p.m > kMlpMaxM || p.hidden <= 0 || p.hidden % kMlpTile != 0 || p.ffn <= 0 ||
      p.ffn % kMlpTile != 0 || p.k_splits < 1 || p.k_splits > kMlpMaxKSplits || p.k_splits > p.ffn / kMlpTile ||
      p.grid < 1 || p.barrier == nullptr ||
      (p.accumulate && (p.flow || p.norm_w != nullptr || p.k_splits != 1)) ||
      (p.norm_w != nullptr && (p.out == nullptr || p.res_out == nullptr ||
                                                                        p.hidden > kMlpMaxHidden))) {
    return cudaErrorInvalidValue;
  }
  if (p.accumulate) return launch_decode_mlp_accumulate(half_precision, p, stream);  // decode_mlp_accumulate.cu
  return half_precision ? launch_decode_mlp_fp16(p, stream) : launch_decode_mlp_bf16(p, stream);
}

}  // namespace hybrid
