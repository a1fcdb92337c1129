// Registers the CUDA kernels as torch ops: torch.ops.hybrid.paged_decode_attention,
// torch.ops.hybrid.paged_decode_attention_append, torch.ops.hybrid.write_kv_cache,
// torch.ops.hybrid.paged_decode_num_splits and torch.ops.hybrid.skinny_gemm / skinny_gemm_norm / skinny_gemm_k_splits /
// skinny_gemm_wgmma / skinny_gemm_streamk,
// torch.ops.hybrid.decode_mlp / decode_mlp_accumulate / decode_mlp_cluster(_active) / decode_mlp_k_splits,
// torch.ops.hybrid.l2_prefetch.
//
// The same sources build as `hybrid._C` (setup.py) or JIT as `hybrid_C` (hybrid/ops/cuda_backend.py);
// only one of them may be loaded in a process, since both register the "hybrid" namespace.
#include <torch/extension.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(hybrid, m) {
  m.def(
      "paged_decode_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor seq_lens, float scale, int num_splits=0, int heads_per_cta=0) -> Tensor");
  m.def(
      "paged_decode_attention_append(Tensor query, Tensor key, Tensor value, Tensor(a!) key_cache, "
      "Tensor(b!) value_cache, Tensor slot_mapping, Tensor block_tables, Tensor seq_lens, float scale, "
      "int num_splits=0, int heads_per_cta=0) -> Tensor");
  m.def(
      "write_kv_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
      "Tensor slot_mapping) -> ()");
  m.def(
      "paged_decode_num_splits(int batch, int num_heads, int num_kv_heads, int head_size, int max_len, "
      "ScalarType dtype, int heads_per_cta=0, int device_index=0) -> int",
      &hybrid::paged_decode_num_splits);
  m.def("skinny_gemm(Tensor x, Tensor w, Tensor? bias=None, bool relu=False, int k_splits=0, bool pdl=False, "
        "Tensor? k_cache=None, Tensor? v_cache=None, Tensor? slots=None, int kv_col0=0) -> Tensor");
  m.def(
      "skinny_gemm_norm(Tensor x, Tensor w, Tensor? bias, Tensor? residual, Tensor norm_w, Tensor? norm_b, float eps, "
      "Tensor(a!) counter, int k_splits=0, bool pdl=False) -> (Tensor, Tensor)");
  m.def("skinny_gemm_wgmma(Tensor x, Tensor w, Tensor? bias=None, bool relu=False, int k_splits=0, bool pdl=False) "
        "-> Tensor");
  m.def("skinny_gemm_wgmma_available() -> bool", &hybrid::skinny_gemm_wgmma_available);
  m.def("skinny_gemm_streamk(Tensor x, Tensor w, Tensor? bias, bool relu, Tensor(a!) counters, int ctas=0, "
        "bool pdl=False, Tensor(b!)? stamps=None) -> Tensor");
  m.def("skinny_streamk_available() -> bool", &hybrid::skinny_streamk_available);
  m.def("skinny_gemm_k_splits(int m, int n, int k, ScalarType dtype, int device_index=0) -> int",
        &hybrid::skinny_gemm_k_splits);
  m.def(
      "decode_mlp(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor(a!) barrier, bool relu=True, int k_splits=0, "
      "bool pdl=False, Tensor(b!)? stamps=None, int prefetch=-1, bool flow=False) -> Tensor");
  m.def(
      "decode_mlp_accumulate(Tensor x, Tensor w1, Tensor? b1, Tensor w2t, Tensor(a!) part, Tensor(b!) barrier, "
      "bool relu=True, bool pdl=False, Tensor(c!)? stamps=None) -> ()");
  m.def(
      "decode_mlp_norm(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor? residual, Tensor norm_w, "
      "Tensor? norm_b, float eps, Tensor(a!) barrier, bool relu=True, int k_splits=0, bool pdl=False, "
      "Tensor(b!)? stamps=None, bool flow=False) -> (Tensor, Tensor)");
  m.def(
      "decode_mlp_cluster(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor(a!) barrier, bool relu=True, "
      "int cluster=8, bool pdl=False, Tensor(b!)? stamps=None) -> Tensor");
  m.def("decode_mlp_cluster_active(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor(a!) barrier, int cluster) -> int");
  m.def("decode_mlp_k_splits(int m, int hidden, int ffn, ScalarType dtype, int device_index=0) -> int",
        &hybrid::decode_mlp_k_splits);
  m.def("l2_prefetch(Tensor t, int nbytes=0, int mode=0) -> ()");
  m.def("set_decode_pdl_launch(bool on) -> ()", &hybrid::set_decode_pdl_launch_op);
  m.def("set_decode_prefetch(bool on) -> ()", &hybrid::set_decode_prefetch_op);
}

TORCH_LIBRARY_IMPL(hybrid, CUDA, m) {
  m.impl("paged_decode_attention", &hybrid::paged_decode_attention);
  m.impl("paged_decode_attention_append", &hybrid::paged_decode_attention_append);
  m.impl("write_kv_cache", &hybrid::write_kv_cache);
  m.impl("skinny_gemm", &hybrid::skinny_gemm);
  m.impl("skinny_gemm_wgmma", &hybrid::skinny_gemm_wgmma);
  m.impl("skinny_gemm_streamk", &hybrid::skinny_gemm_streamk);
  m.impl("skinny_gemm_norm", &hybrid::skinny_gemm_norm);
  m.impl("l2_prefetch", &hybrid::l2_prefetch);
  m.impl("decode_mlp", &hybrid::decode_mlp);
  m.impl("decode_mlp_norm", &hybrid::decode_mlp_norm);
  m.impl("decode_mlp_accumulate", &hybrid::decode_mlp_accumulate);
  m.impl("decode_mlp_cluster", &hybrid::decode_mlp_cluster);
  m.impl("decode_mlp_cluster_active", &hybrid::decode_mlp_cluster_active);
}

// A Python module so `import hybrid._C` (setup.py build) works; the ops live in torch.ops.hybrid.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hybrid-rlhf CUDA kernels; use torch.ops.hybrid.* (see hybrid/ops/cuda_backend.py)";
}
