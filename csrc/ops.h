// Torch entry points of the extension (registered as torch.ops.hybrid.* in bindings.cpp).
#pragma once

#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace hybrid {

// query [batch, num_heads, head_size]; key/value_cache [num_blocks, block_size, num_kv_heads,
// head_size]; block_tables [batch, max_blocks] int32; seq_lens [batch] int32.
// Returns out [batch, num_heads, head_size]. num_splits / heads_per_cta: 0 = chosen by shapes.
at::Tensor paged_decode_attention(const at::Tensor& query, const at::Tensor& key_cache,
                                  const at::Tensor& value_cache, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, double scale, int64_t num_splits,
                                  int64_t heads_per_cta);

// The decode step's write_kv_cache + paged_decode_attention in one launch (plus the split merge):
// key/value [batch, num_kv_heads, head_size] are written to the caches at slot_mapping [batch]
// int64 (negative slots skipped) and query attends to cache positions 0..seq_len-2 plus key/value
// as position seq_len-1 (seq_lens count the step's token). Same checks and knobs as above.
at::Tensor paged_decode_attention_append(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                         at::Tensor& key_cache, at::Tensor& value_cache,
                                         const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                                         const at::Tensor& seq_lens, double scale, int64_t num_splits,
                                         int64_t heads_per_cta);

// Scatters key/value [num_tokens, num_kv_heads, head_size] into the caches at slot_mapping
// [num_tokens] int64 (negative slots skipped), in place.
void write_kv_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                    at::Tensor& value_cache, const at::Tensor& slot_mapping);

// Split count the op would pick (exposed for tests and the benchmark).
int64_t paged_decode_num_splits(int64_t batch, int64_t num_heads, int64_t num_kv_heads,
                                int64_t head_size, int64_t max_len, at::ScalarType dtype,
                                int64_t heads_per_cta, int64_t device_index);

// Decode GEMM y[M, N] = act(x[M, K] @ w[N, K]^T + bias): x [M, K] contiguous, M <= 64; w the stored
// [N, K] contiguous weight, N % 64 == 0, K % 64 == 0; bias [N] or None; bf16 or fp16, 16-byte
// aligned. k_splits: CTAs of a cluster splitting K (1..8; 0 = chosen from the shapes).
at::Tensor skinny_gemm(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                       bool relu, int64_t k_splits, bool pdl, const std::optional<at::Tensor>& k_cache,
                       const std::optional<at::Tensor>& v_cache, const std::optional<at::Tensor>& slots,
                       int64_t kv_col0);

// skinny_gemm followed by the residual add and LayerNorm (norm_b given) / RMSNorm of the block end,
// in one launch (csrc/skinny_gemm.h SkinnyNormParams): returns (normed, residual_out). counter: an
// int32 word on the device, zero, left zero; launches sharing it must not overlap (one stream).
std::tuple<at::Tensor, at::Tensor> skinny_gemm_norm(const at::Tensor& x, const at::Tensor& w,
                                                    const std::optional<at::Tensor>& bias,
                                                    const std::optional<at::Tensor>& residual, const at::Tensor& norm_w,
                                                    const std::optional<at::Tensor>& norm_b, double eps,
                                                    at::Tensor& counter, int64_t k_splits, bool pdl);

// skinny_gemm (no KV write) on Hopper warpgroup MMA (csrc/skinny_wgmma.cu), for 33-64 rows; needs a
// build for sm_90a (skinny_gemm_wgmma_available).
at::Tensor skinny_gemm_wgmma(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                             bool relu, int64_t k_splits, bool pdl);
bool skinny_gemm_wgmma_available();
// Stream-K skinny GEMM on TMA + warpgroup MMA (csrc/skinny_streamk.cu), M <= 64; needs a build for
// sm_90a (skinny_streamk_available). counters: int32 [>= N / 64], zero (every launch leaves it zero;
// one stream at a time). ctas: 0 = one per SM (at most the N/64 x K/64 units).
at::Tensor skinny_gemm_streamk(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                               bool relu, at::Tensor& counters, int64_t ctas, bool pdl,
                               const std::optional<at::Tensor>& stamps);
bool skinny_streamk_available();
// The k_splits skinny_gemm picks for these shapes (exposed for tests and the benchmark).
int64_t skinny_gemm_k_splits(int64_t m, int64_t n, int64_t k, at::ScalarType dtype, int64_t device_index);

// Persistent decode MLP (decode_mlp.cu): fc1 (+ b1, ReLU if relu) then fc2's split-K partials in one
// launch. x [M, hidden] (M <= 64), w1 [ffn, hidden], b1 [ffn] or None, w2 [hidden, ffn], all contiguous,
// bf16 or fp16, 16-byte aligned, hidden and ffn multiples of 64; barrier [2] int32 on x's device,
// zero before its first use and owned by one stream. Returns part [k_splits, M, hidden] fp32
// (= linear.splitk_partials of the activation over k_splits K slices; 0 = chosen from the shapes).
// stamps: None, or int64 [>= CTAs x 12] for per-CTA phase timestamps (decode_mlp.h); prefetch: phase-2
// weight stages issued before the grid barrier's wait (-1 = the whole ring prologue). flow: the
// dataflow schedule (decode_mlp.h; barrier then needs >= kMlpSyncInts elements, [2..) zero).
at::Tensor decode_mlp(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                      const at::Tensor& w2, at::Tensor& barrier, bool relu, int64_t k_splits, bool pdl,
                      const std::optional<at::Tensor>& stamps, int64_t prefetch, bool flow);

// decode_mlp's ffn-split schedule (decode_mlp.h `accumulate`): part [M, hidden] float32 (ZERO on
// entry) += relu(x @ w1.T + b1) @ w2t, no bias, summed with fp32 atomics in no fixed order; w2t is
// fc2's weight transposed, [ffn, hidden] contiguous. Each CTA streams one fc1 tile and the matching
// 64 rows of w2t and waits for no other CTA. barrier only for the shared checks (untouched);
// stamps as decode_mlp.
void decode_mlp_accumulate(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                           const at::Tensor& w2t, at::Tensor& part, at::Tensor& barrier, bool relu, bool pdl,
                           const std::optional<at::Tensor>& stamps);

// decode_mlp + the block's end in the same launch (a third phase after one more grid barrier):
// (normed, residual_out) = norm(fc2 + b2 + residual) with norm_w, norm_b (LayerNorm) or, norm_b None,
// RMSNorm; the rounding steps of hybrid/ops/linear_norm.py's split-K reduce + add + norm kernel.
// flow: the dataflow schedule, whose third phase needs no grid barrier (the last min(M, CTAs) CTAs
// out of the unit loop take the rows once every fc2 partial is stored; decode_mlp.h).
std::tuple<at::Tensor, at::Tensor> decode_mlp_norm(const at::Tensor& x, const at::Tensor& w1,
                                                   const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                                   const std::optional<at::Tensor>& b2,
                                                   const std::optional<at::Tensor>& residual, const at::Tensor& norm_w,
                                                   const std::optional<at::Tensor>& norm_b, double eps,
                                                   at::Tensor& barrier, bool relu, int64_t k_splits, bool pdl,
                                                   const std::optional<at::Tensor>& stamps, bool flow);

// decode_mlp's cluster schedule (decode_mlp.h, decode_mlp_cluster.cu): one CTA per fc1 tile in
// clusters of `cluster` (2 / 4 / 8 / 16) CTAs, act exchanged through distributed shared memory;
// returns part [ffn / (64 cluster), M, hidden] fp32. M <= 32; hidden and ffn multiples of 64 x
// cluster; barrier only for the shared checks (untouched). stamps as decode_mlp (ffn / 64 CTAs).
at::Tensor decode_mlp_cluster(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                              const at::Tensor& w2, at::Tensor& barrier, bool relu, int64_t cluster, bool pdl,
                              const std::optional<at::Tensor>& stamps);
// How many of those clusters the device holds at once (cudaOccupancyMaxActiveClusters).
int64_t decode_mlp_cluster_active(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                                  const at::Tensor& w2, at::Tensor& barrier, int64_t cluster);

// The k_splits decode_mlp picks for these shapes (exposed for tests and the benchmark).
int64_t decode_mlp_k_splits(int64_t m, int64_t hidden, int64_t ffn, at::ScalarType dtype, int64_t device_index);

// Launch the decode attention split kernel with programmatic dependent launch from now on (it then
// waits for the previous kernel itself); read at launch, so CUDA graphs keep what they captured.
void set_decode_pdl_launch_op(bool on);
void set_decode_prefetch_op(bool on);

// L2 prefetch hint for the first nbytes (<= 0: all) of a contiguous CUDA tensor; mode 0 = bulk
// (cp.async.bulk.prefetch.L2, sm_90+), 1 = per 128-byte line with evict-last priority. Writes nothing.
void l2_prefetch(const at::Tensor& t, int64_t nbytes, int64_t mode);

}  // namespace hybrid
