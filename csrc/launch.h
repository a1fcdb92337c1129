// Torch-free launch interface of the CUDA kernels: plain parameter structs and launchers.
//
// The kernels (*.cu) see only this header and cuda_runtime.h, so they compile with a bare
// `nvcc -c` (the CPU tests do exactly that); the torch side (ops.cpp) checks tensors, fills the
// structs and picks the stream. Strides are in elements; the cache layout is
// [num_blocks, block_size, num_kv_heads, head_size] contiguous, so slot s of a layer starts at
// element s * num_kv_heads * head_size.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace hybrid {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct PagedDecodeParams {
  void* out;              // [batch, num_heads, head_size] contiguous, dtype of query
  float* part_acc;        // [batch, num_heads, num_splits, head_size] fp32 (num_splits > 1 only)
  float* part_ml;         // [batch, num_heads, num_splits, 2] fp32 running max (log2) and sum
  const void* query;      // [batch, num_heads, head_size], head_size stride 1
  const void* key_cache;  // [num_blocks, block_size, num_kv_heads, head_size] contiguous
  const void* value_cache;
  const int32_t* block_tables;  // [batch, max_blocks_per_seq], stride 1 along blocks
  const int32_t* seq_lens;      // [batch]
  float scale_log2;             // softmax scale * log2(e): scores live in the log2 domain
  int64_t q_stride_batch;
  int64_t q_stride_head;
  int64_t bt_stride_batch;
  int batch;
  int num_heads;
  int num_kv_heads;
  int head_size;
  int block_size_log2;  // block_size is a power of two
  int num_splits;       // >= 1; 1 writes `out` directly, more write partials + a merge kernel
  int heads_per_cta;    // 1, 2, 4 or 8: divides the GQA group and decode_fits() (host checks)
  int max_blocks_per_seq;   // block_tables width
  int num_blocks;           // blocks in each cache
  int prefetch_first_tile;  // 1: load each warp's first tile before griddepcontrol.wait (plain
                            // kernel, num_splits == 1, PDL launch inside a decode step; see the kernel)
};

// The append variant (hybrid::paged_decode_attention_append): seq_lens count the step's token, the
// cache is read for positions 0..seq_len-2, the token's key/value rows come from key_new/value_new,
// and the CTA owning position seq_len-1 (the split holding it; the first query-head chunk of its
// kv head) writes them to the caches at slot_mapping[b]. A separate struct, so the plain kernel's
// parameter block (and its code) stay exactly as they were.
struct PagedDecodeAppendParams : PagedDecodeParams {
  const void* key_new;    // [batch, num_kv_heads, head_size], head_size stride 1, 16-byte rows
  const void* value_new;  // [batch, num_kv_heads, head_size], head_size stride 1, 16-byte rows
  const int64_t* slot_mapping;  // [batch]; < 0 (or >= num_slots) skips the write
  int64_t kn_stride_batch;
  int64_t kn_stride_head;
  int64_t vn_stride_batch;
  int64_t vn_stride_head;
  int64_t num_slots;  // num_blocks * block_size
};

#ifdef __CUDACC__
#define HYBRID_HD __host__ __device__
#else
#define HYBRID_HD
#endif

// Head sizes with a compiled decode kernel (every dtype).
#define HYBRID_DECODE_HEAD_SIZES(X) X(32) X(64) X(80) X(96) X(128) X(256)

inline bool paged_decode_supported(int head_size) {
#define HYBRID_DECODE_IS(D) \
  if (head_size == D) return true;
  HYBRID_DECODE_HEAD_SIZES(HYBRID_DECODE_IS)
#undef HYBRID_DECODE_IS
  return false;
}

// Elements of the dtype in one 16-byte access.
inline int dtype_vec(DType dtype) { return dtype == DType::kFloat32 ? 4 : 8; }

// Lanes per token: next power of two >= the token's 16-byte chunks, at most 16.
HYBRID_HD constexpr int decode_tpt(int chunks) {
  return chunks > 8 ? 16 : chunks > 4 ? 8 : chunks > 2 ? 4 : chunks > 1 ? 2 : 1;
}

// fp32 registers per thread for q (and as many for the accumulator) with gq heads per CTA.
HYBRID_HD constexpr int decode_qregs(int vec, int head_size, int gq) {
  return gq * ((head_size / vec + decode_tpt(head_size / vec) - 1) / decode_tpt(head_size / vec)) * vec;
}

HYBRID_HD constexpr bool decode_fits(int vec, int head_size, int gq) {
  return decode_qregs(vec, head_size, gq) <= 64;
}

// Query heads one CTA serves: the largest of 8/4/2/1 that divides the GQA group and keeps the
// per-thread query and accumulator registers at <= 64 floats each. The CTA reads its kv head's
// rows once for all of them (a group larger than this is served by group/gq CTAs).
HYBRID_HD constexpr int decode_heads_per_cta(int vec, int head_size, int group) {
  for (int gq = 8; gq > 1; gq /= 2) {
    if (group % gq == 0 && decode_fits(vec, head_size, gq)) return gq;
  }
  return 1;
}

// Programmatic dependent launch of the decode split kernel (hybrid::set_decode_pdl_launch; off by
// default): the kernel waits for the previous one (griddepcontrol.wait) before touching memory.
void set_decode_pdl_launch(bool on);
bool decode_pdl_launch();
// With PDL launch, the plain decode kernel loads each warp's first KV tile before waiting for the
// previous kernel (hybrid::set_decode_prefetch; off by default). Only valid while the kernels that
// may still run write nothing the attention reads except position seq_len - 1 of each row and the
// seq_lens buffer: the runner turns it on around its decode step and off after.
void set_decode_prefetch(bool on);
bool decode_prefetch();

// Launches the split kernel (and the merge kernel when num_splits > 1). Returns the launch error.
cudaError_t launch_paged_decode(DType dtype, const PagedDecodeParams& p, cudaStream_t stream);

template <typename T>
cudaError_t launch_paged_decode_typed(const PagedDecodeParams& p, cudaStream_t stream);

// The same with the step's KV write fused in (PagedDecodeAppendParams).
cudaError_t launch_paged_decode_append(DType dtype, const PagedDecodeAppendParams& p, cudaStream_t stream);

template <typename T>
cudaError_t launch_paged_decode_append_typed(const PagedDecodeAppendParams& p, cudaStream_t stream);

// Resident split-kernel CTAs per multiprocessor (register-limited), for the split heuristic.
cudaError_t paged_decode_ctas_per_sm(DType dtype, int head_size, int heads_per_cta, int* ctas_per_sm);

template <typename T>
cudaError_t paged_decode_ctas_per_sm_typed(int head_size, int heads_per_cta, int* ctas_per_sm);

struct WriteKVCacheParams {
  const void* key;    // [num_tokens, num_kv_heads, head_size], head_size stride 1
  const void* value;  // [num_tokens, num_kv_heads, head_size], head_size stride 1
  void* key_cache;    // [num_blocks, block_size, num_kv_heads, head_size] contiguous
  void* value_cache;
  const int64_t* slot_mapping;  // [num_tokens]; < 0 (or >= num_slots) skips the token
  int64_t key_stride_token;
  int64_t key_stride_head;
  int64_t value_stride_token;
  int64_t value_stride_head;
  int64_t num_slots;  // num_blocks * block_size
  int num_tokens;
  int num_kv_heads;
  int head_size;
  bool vectorized;  // every pointer and stride allows 16-byte accesses
};

cudaError_t launch_write_kv_cache(DType dtype, const WriteKVCacheParams& p, cudaStream_t stream);

// L2 prefetch hint over [base, base + nbytes) (l2_prefetch.cu): mode 0 bulk (sm_90+), 1 per line.
cudaError_t launch_l2_prefetch(const void* base, int64_t nbytes, int mode, int sm_count, cudaStream_t stream);

}  // namespace hybrid
