// Torch side of the extension: checks tensors, picks split-K and heads per CTA, fills the launch
// structs (launch.h) and launches on the current stream. Nothing here synchronises with the host
// or allocates besides the output and the split-K workspace, so both ops are CUDA-graph capturable.
#include "ops.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <initializer_list>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "check.h"
#include "decode_mlp.h"
#include "launch.h"
#include "skinny_gemm.h"
#include "skinny_streamk.h"

namespace hybrid {
namespace {

constexpr int kMaxSplits = 64;
constexpr int64_t kMinTokensPerSplit = 64;  // shorter splits spend more on the merge than they gain
constexpr int kMaxDevices = 64;

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    case at::kFloat:
      return DType::kFloat32;
    default:
      break;
  }
  HYBRID_CHECK(false, "hybrid: unsupported dtype ", t, " (bfloat16, float16 or float32)");
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

int sm_count(int device) {
  static std::atomic<int> cache[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) device = 0;
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

int head_size_index(int head_size) {
  int i = 0;
#define HYBRID_DECODE_INDEX(D) \
  if (head_size == D) return i; \
  ++i;
  HYBRID_DECODE_HEAD_SIZES(HYBRID_DECODE_INDEX)
#undef HYBRID_DECODE_INDEX
  return -1;
}

// Resident CTAs per SM of the split kernel (cached: it depends on the kernel only).
int ctas_per_sm(DType dtype, int head_size, int heads_per_cta) {
  static std::atomic<int> cache[3][16][4] = {};
  const int hs = head_size_index(head_size);
  const int gq = heads_per_cta == 8 ? 3 : heads_per_cta == 4 ? 2 : heads_per_cta == 2 ? 1 : 0;
  HYBRID_CHECK(hs >= 0 && hs < 16, "hybrid: no decode kernel for head_size ", head_size);
  std::atomic<int>& slot = cache[static_cast<int>(dtype)][hs][gq];
  int n = slot.load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(paged_decode_ctas_per_sm(dtype, head_size, heads_per_cta, &n));
    n = std::max(n, 1);
    slot.store(n, std::memory_order_relaxed);
  }
  return n;
}

int pick_heads_per_cta(DType dtype, int head_size, int group, int64_t requested) {
  const int vec = dtype_vec(dtype);
  if (requested <= 0) return decode_heads_per_cta(vec, head_size, group);
  HYBRID_CHECK(requested == 1 || requested == 2 || requested == 4 || requested == 8,
              "hybrid: heads_per_cta must be 1, 2, 4 or 8, got ", requested);
  const int gq = static_cast<int>(requested);
  HYBRID_CHECK(group % gq == 0, "hybrid: heads_per_cta ", gq, " does not divide the GQA group ", group);
  HYBRID_CHECK(decode_fits(vec, head_size, gq), "hybrid: heads_per_cta ", gq,
              " needs too many registers at head_size ", head_size);
  return gq;
}

// Flash-decoding split count from host-known shapes only (never seq_lens: no sync, graph-safe).
// The grid runs in waves of `slots` resident CTAs; the last wave of a grid that is not a whole
// number of waves leaves SMs idle, so take the fewest splits whose wave efficiency
// (waves / ceil(waves)) is within 15% of the best (FlashAttention-2's rule), each split still
// covering >= kMinTokensPerSplit tokens of the longest possible row.
int choose_num_splits(int64_t ctas, int64_t slots, int64_t max_len) {
  if (ctas >= 4 * slots) return 1;  // >= 4 waves: the tail costs < 25% at worst, usually far less
  const int64_t by_len = std::max<int64_t>(1, max_len / kMinTokensPerSplit);
  const int max_splits = static_cast<int>(std::min<int64_t>(kMaxSplits, by_len));
  double eff[kMaxSplits + 1] = {};
  double best = 0.0;
  for (int s = 1; s <= max_splits; ++s) {
    const double waves = static_cast<double>(ctas * s) / static_cast<double>(slots);
    eff[s] = waves / std::ceil(waves);
    best = std::max(best, eff[s]);
  }
  for (int s = 1; s <= max_splits; ++s) {
    if (eff[s] >= 0.85 * best) return s;
  }
  return 1;
}

// skinny_gemm: clusters of k_splits CTAs resident at once, per (device, dtype, m16 tiles, split);
// cached (+1, so 0 means "not asked yet") like ctas_per_sm.
int skinny_max_clusters(bool half, int64_t m, int k_splits, int device) {
  static std::atomic<int> cache[kMaxDevices][2][4][kSkinnyMaxKSplits + 1] = {};
  HYBRID_CHECK(device >= 0 && device < kMaxDevices, "hybrid: device index ", device, " out of range");
  std::atomic<int>& slot = cache[device][half ? 1 : 0][(m + 15) / 16 - 1][k_splits];
  int n = slot.load(std::memory_order_relaxed);
  if (n == 0) {
    int clusters = 0;
    C10_CUDA_CHECK(skinny_gemm_max_active_clusters(half, static_cast<int>(m), k_splits, &clusters));
    n = clusters + 1;
    slot.store(n, std::memory_order_relaxed);
  }
  return n - 1;
}

// K split over the CTAs of a cluster: the most splits for which all N/64 column tiles' clusters
// are resident at once (one wave; cudaOccupancyMaxActiveClusters, so GPC packing counts) and each
// split keeps >= kSkinnyMinKPerSplit of K. A second wave would leave most SMs idle at its end, and
// every CTA streams its W tile from the start, so more (smaller) CTAs than slots only queue. With
// 132 SMs x 2 CTAs this gives v1's best fixed splits on the H200: qkv N=6144 -> 2, o N=2048 K=2048
// -> 4, fc1 N=8192 -> 2, fc2 K=8192 -> 8 (if 32 clusters of 8 fit); tiles > slots / 2 -> 1.
int64_t skinny_k_splits_for(int64_t m, int64_t n, int64_t k, bool half, int device) {
  const int64_t tiles = n / kSkinnyTileN;
  int best = 1;
  for (int s = 2; s <= kSkinnyMaxKSplits && k / s >= kSkinnyMinKPerSplit; ++s) {
    if (tiles <= skinny_max_clusters(half, m, s, device)) best = s;
  }
  return best;
}

void check_skinny_shape(int64_t m, int64_t n, int64_t k, at::ScalarType dtype) {
  HYBRID_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, "hybrid: skinny_gemm takes bfloat16 or float16, got ",
              dtype);
  HYBRID_CHECK(m >= 1 && m <= kSkinnyMaxM, "hybrid: skinny_gemm needs 1 <= M <= ", kSkinnyMaxM, ", got ", m);
  HYBRID_CHECK(n > 0 && n % kSkinnyTileN == 0 && n / kSkinnyTileN <= INT32_MAX, "hybrid: skinny_gemm needs N % ",
              kSkinnyTileN, " == 0, got ", n);
  HYBRID_CHECK(k > 0 && k % kSkinnyTileK == 0, "hybrid: skinny_gemm needs K % ", kSkinnyTileK, " == 0, got ", k);
  HYBRID_CHECK(k * kSkinnyMaxM <= INT32_MAX, "hybrid: skinny_gemm K ", k, " too large");
}

// decode_mlp: CTAs resident at once per (device, dtype, m16 tiles), cached (+1: 0 = not asked yet).
int mlp_resident_ctas(bool half, int64_t m, int device) {
  static std::atomic<int> cache[kMaxDevices][2][4] = {};
  HYBRID_CHECK(device >= 0 && device < kMaxDevices, "hybrid: device index ", device, " out of range");
  std::atomic<int>& slot = cache[device][half ? 1 : 0][(m + 15) / 16 - 1];
  int n = slot.load(std::memory_order_relaxed);
  if (n == 0) {
    int ctas = 0;
    C10_CUDA_CHECK(decode_mlp_resident_ctas(half, static_cast<int>(m), &ctas));
    n = ctas + 1;
    slot.store(n, std::memory_order_relaxed);
  }
  return n - 1;
}

void check_mlp_shape(int64_t m, int64_t hidden, int64_t ffn, at::ScalarType dtype) {
  HYBRID_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, "hybrid: decode_mlp takes bfloat16 or float16, got ",
              dtype);
  HYBRID_CHECK(m >= 1 && m <= kMlpMaxM, "hybrid: decode_mlp needs 1 <= M <= ", kMlpMaxM, ", got ", m);
  HYBRID_CHECK(hidden > 0 && hidden % kMlpTile == 0 && ffn > 0 && ffn % kMlpTile == 0,
              "hybrid: decode_mlp needs hidden and ffn multiples of ", kMlpTile, ", got ", hidden, " / ", ffn);
  HYBRID_CHECK(hidden * kMlpMaxM <= INT32_MAX && ffn * kMlpMaxM <= INT32_MAX, "hybrid: decode_mlp sizes too large");
}

// Phase-2 K slices: the most (<= 16) for which all hidden/64 x k_splits units run in one wave of
// the resident CTAs and each slice keeps >= 4 stages of 128 k (shorter ones are mostly prologue);
// at least 1. OPT-1.3B (2048 / 8192) on 132 SMs: 4; OPT-350m (1024 / 4096): 8.
int64_t mlp_k_splits_for(int64_t m, int64_t hidden, int64_t ffn, bool half, int device) {
  const int64_t tiles = hidden / kMlpTile;
  const int64_t slots = mlp_resident_ctas(half, m, device);
  int64_t best = 1;
  for (int64_t s = 2; s <= kMlpMaxKSplits && ffn / s >= 4 * 128; ++s) {
    if (tiles * s <= slots) best = s;
  }
  return best;
}

}  // namespace

int64_t decode_mlp_k_splits(int64_t m, int64_t hidden, int64_t ffn, at::ScalarType dtype, int64_t device_index) {
  check_mlp_shape(m, hidden, ffn, dtype);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index));
  return mlp_k_splits_for(m, hidden, ffn, dtype == at::kHalf, static_cast<int>(device_index));
}

namespace {

// Checks x / w1 / b1 / w2 / barrier / k_splits and fills the GEMM part of the params (phase 3 off);
// allocates the fp32 partials and the activation workspace. accumulate: w2 is transposed ([ffn,
// hidden]) and nothing is allocated (the caller sets p.part to its sum; act stays in shared memory).
DecodeMlpParams mlp_params(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                           const at::Tensor& w2, at::Tensor& barrier, bool relu, int64_t k_splits, bool pdl,
                           const std::optional<at::Tensor>& stamps, int64_t prefetch, bool flow, at::Tensor& part,
                           at::Tensor& act, bool accumulate = false) {
  HYBRID_CHECK(x.is_cuda() && w1.is_cuda() && w2.is_cuda() && barrier.is_cuda(),
              "hybrid: decode_mlp tensors must be CUDA tensors");
  HYBRID_CHECK(x.dim() == 2 && w1.dim() == 2 && w2.dim() == 2, "hybrid: decode_mlp needs 2-d x, w1, w2");
  const int64_t m = x.size(0), hidden = x.size(1), ffn = w1.size(0);
  if (accumulate) {  // w2 is fc2's weight transposed
    HYBRID_CHECK(w1.size(1) == hidden && w2.size(0) == ffn && w2.size(1) == hidden, "hybrid: decode_mlp_accumulate needs ",
                "w1 [ffn, ", hidden, "] and w2t [ffn, ", hidden, "], got ", w1.sizes(), " / ", w2.sizes());
  } else {
    HYBRID_CHECK(w1.size(1) == hidden && w2.size(0) == hidden && w2.size(1) == ffn, "hybrid: decode_mlp needs w1 [ffn, ",
                hidden, "] and w2 [", hidden, ", ffn], got ", w1.sizes(), " / ", w2.sizes());
  }
  HYBRID_CHECK(w1.scalar_type() == x.scalar_type() && w2.scalar_type() == x.scalar_type(),
              "hybrid: decode_mlp x, w1 and w2 must share a dtype");
  HYBRID_CHECK(x.is_contiguous() && w1.is_contiguous() && w2.is_contiguous(), "hybrid: decode_mlp x, w1, w2 must be contiguous");
  HYBRID_CHECK(w1.device() == x.device() && w2.device() == x.device() && barrier.device() == x.device(),
              "hybrid: decode_mlp tensors must be on ", x.device());
  check_mlp_shape(m, hidden, ffn, x.scalar_type());
  HYBRID_CHECK(aligned16(x.data_ptr()) && aligned16(w1.data_ptr()) && aligned16(w2.data_ptr()),
              "hybrid: decode_mlp x, w1 and w2 must be 16-byte aligned");
  const int64_t sync_ints = flow ? kMlpSyncInts : 2;
  HYBRID_CHECK(barrier.scalar_type() == at::kInt && barrier.numel() >= sync_ints && barrier.is_contiguous() &&
                  reinterpret_cast<uintptr_t>(barrier.data_ptr()) % 8 == 0,
              "hybrid: decode_mlp barrier must be a contiguous, 8-byte aligned int32 tensor of >= ", sync_ints,
              " elements");
  const bool has_bias = b1.has_value() && b1->defined();
  if (has_bias) {
    HYBRID_CHECK(b1->dim() == 1 && b1->size(0) == ffn && b1->is_contiguous() && b1->scalar_type() == x.scalar_type() &&
                    b1->device() == x.device(),
                "hybrid: decode_mlp b1 must be [ffn] contiguous, dtype and device of x");
    HYBRID_CHECK(reinterpret_cast<uintptr_t>(b1->data_ptr()) % 4 == 0, "hybrid: decode_mlp b1 must be 4-byte aligned");
  }
  HYBRID_CHECK(k_splits >= 0 && k_splits <= kMlpMaxKSplits && k_splits <= ffn / kMlpTile,
              "hybrid: decode_mlp k_splits must be 0..min(", kMlpMaxKSplits, ", ffn / 64), got ", k_splits);

  const bool half = x.scalar_type() == at::kHalf;
  const int dev = x.get_device();
  // the flow schedule measured best with the same slices (OPT-1.3B batch 16 on an H200, whole decode
  // step: 4 slices 1.492 ms, 8 slices 1.582, 16 slices 1.713)
  const int64_t splits = k_splits > 0 ? k_splits : mlp_k_splits_for(m, hidden, ffn, half, dev);
  const int64_t resident = mlp_resident_ctas(half, m, dev);
  HYBRID_CHECK(resident >= 1, "hybrid: decode_mlp does not fit an SM of this device");
  // CTAs: as many as the larger phase has units (barrier: one unit of each phase per CTA). The flow
  // schedule too: with one CTA per SM (132 on an H200 for OPT-1.3B's 128 + 128 units) the 4 extra
  // CTAs started on fc2 units of slice 0 and took a second fc2 unit each, ending ~6 us after the rest
  const int64_t units = std::max(ffn / kMlpTile, hidden / kMlpTile * splits);
  if (!accumulate) {  // the accumulate schedule adds into the caller's sum and keeps act in shared memory
    part = at::empty({splits, m, hidden}, x.options().dtype(at::kFloat));
    act = at::empty({m, ffn}, x.options());
  }
  DecodeMlpParams p{};
  p.part = accumulate ? nullptr : part.data_ptr<float>();
  p.act = accumulate ? nullptr : act.data_ptr();
  p.x = x.data_ptr();
  p.w1 = w1.data_ptr();
  p.b1 = has_bias ? b1->data_ptr() : nullptr;
  p.w2 = w2.data_ptr();
  p.barrier = reinterpret_cast<unsigned int*>(barrier.data_ptr<int32_t>());
  p.m = static_cast<int>(m);
  p.hidden = static_cast<int>(hidden);
  p.ffn = static_cast<int>(ffn);
  p.k_splits = static_cast<int>(splits);
  p.grid = static_cast<int>(std::min(units, resident));  // all resident: the grid barrier / slice waits need it
  p.flow = flow;
  p.relu = relu;
  p.pdl = pdl;
  p.prefetch2 = static_cast<int>(std::max<int64_t>(-1, std::min<int64_t>(prefetch, 64)));
  if (stamps.has_value() && stamps->defined()) {
    HYBRID_CHECK(stamps->is_cuda() && stamps->device() == x.device() && stamps->scalar_type() == at::kLong &&
                    stamps->is_contiguous() && stamps->numel() >= static_cast<int64_t>(p.grid) * kMlpStamps,
                "hybrid: decode_mlp stamps must be a contiguous int64 CUDA tensor of >= ", p.grid * kMlpStamps,
                " elements (CTAs x ", kMlpStamps, ")");
    p.stamps = reinterpret_cast<unsigned long long*>(stamps->data_ptr<int64_t>());
  }
  return p;
}

void check_vector(const std::optional<at::Tensor>& v, const at::Tensor& x, int64_t n, const char* what) {
  if (!(v.has_value() && v->defined())) return;
  HYBRID_CHECK(v->dim() == 1 && v->size(0) == n && v->is_contiguous() && v->scalar_type() == x.scalar_type() &&
                  v->device() == x.device() && reinterpret_cast<uintptr_t>(v->data_ptr()) % 4 == 0,
              "hybrid: decode_mlp_norm ", what, " must be [", n, "] contiguous, 4-byte aligned, dtype and device of x");
}

}  // namespace

at::Tensor decode_mlp(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                      const at::Tensor& w2, at::Tensor& barrier, bool relu, int64_t k_splits, bool pdl,
                      const std::optional<at::Tensor>& stamps, int64_t prefetch, bool flow) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor part, act;
  const DecodeMlpParams p =
      mlp_params(x, w1, b1, w2, barrier, relu, k_splits, pdl, stamps, prefetch, flow, part, act);
  C10_CUDA_CHECK(launch_decode_mlp(x.scalar_type() == at::kHalf, p, c10::cuda::getCurrentCUDAStream().stream()));
  return part;
}

void decode_mlp_accumulate(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                           const at::Tensor& w2t, at::Tensor& part, at::Tensor& barrier, bool relu, bool pdl,
                           const std::optional<at::Tensor>& stamps) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), hidden = x.dim() == 2 ? x.size(1) : 0;
  HYBRID_CHECK(part.is_cuda() && part.device() == x.device() && part.scalar_type() == at::kFloat &&
                  part.is_contiguous() && part.numel() == m * hidden &&
                  reinterpret_cast<uintptr_t>(part.data_ptr()) % 16 == 0,
              "hybrid: decode_mlp_accumulate part must be a contiguous, 16-byte aligned float32 [M, hidden] tensor "
              "on ", x.device(), " (zero on entry)");
  at::Tensor unused_part, unused_act;
  DecodeMlpParams p =
      mlp_params(x, w1, b1, w2t, barrier, relu, 1, pdl, std::nullopt, -1, false, unused_part, unused_act, true);
  p.accumulate = true;
  p.part = part.data_ptr<float>();
  p.k_splits = 1;
  // every ffn tile a CTA of its own where they fit (OPT-1.3B: 128 of 132 SMs); no CTA waits for
  // another, so the grid need not be resident at once, but more CTAs than that only queue
  p.grid = static_cast<int>(std::min<int64_t>(w1.size(0) / kMlpTile, mlp_resident_ctas(x.scalar_type() == at::kHalf, m, x.get_device())));
  if (stamps.has_value() && stamps->defined()) {
    HYBRID_CHECK(stamps->is_cuda() && stamps->device() == x.device() && stamps->scalar_type() == at::kLong &&
                    stamps->is_contiguous() && stamps->numel() >= static_cast<int64_t>(p.grid) * kMlpStamps,
                "hybrid: decode_mlp_accumulate stamps must be a contiguous int64 CUDA tensor of >= ",
                p.grid * kMlpStamps, " elements (CTAs x ", kMlpStamps, ")");
    p.stamps = reinterpret_cast<unsigned long long*>(stamps->data_ptr<int64_t>());
  }
  C10_CUDA_CHECK(launch_decode_mlp(x.scalar_type() == at::kHalf, p, c10::cuda::getCurrentCUDAStream().stream()));
}

namespace {

// The cluster schedule's params: decode_mlp's checks, k_splits = ffn / (64 * cluster), grid = ffn / 64.
DecodeMlpParams mlp_cluster_params(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                                   const at::Tensor& w2, at::Tensor& barrier, bool relu, int64_t cluster, bool pdl,
                                   at::Tensor& part, at::Tensor& act) {
  HYBRID_CHECK(cluster == 2 || cluster == 4 || cluster == 8 || cluster == 16,
              "hybrid: decode_mlp_cluster needs a cluster of 2, 4, 8 or 16 CTAs, got ", cluster);
  HYBRID_CHECK(x.dim() == 2 && w1.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kMlpClusterMaxM,
              "hybrid: decode_mlp_cluster needs 2-d x with 1 <= M <= ", kMlpClusterMaxM);
  const int64_t hidden = x.size(1), ffn = w1.size(0);
  HYBRID_CHECK(hidden % (kMlpTile * cluster) == 0 && ffn % (kMlpTile * cluster) == 0,
              "hybrid: decode_mlp_cluster needs hidden and ffn multiples of 64 x cluster (", kMlpTile * cluster,
              "), got ", hidden, " / ", ffn);
  const int64_t splits = ffn / (kMlpTile * cluster);
  DecodeMlpParams p = mlp_params(x, w1, b1, w2, barrier, relu, splits, pdl, std::nullopt, -1, false, part, act);
  p.grid = static_cast<int>(ffn / kMlpTile);
  HYBRID_CHECK(decode_mlp_cluster_valid(p, static_cast<int>(cluster)),
              "hybrid: decode_mlp_cluster does not take these shapes (shared memory of M = ", x.size(0),
              " with a cluster of ", cluster, ")");
  return p;
}

}  // namespace

at::Tensor decode_mlp_cluster(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                              const at::Tensor& w2, at::Tensor& barrier, bool relu, int64_t cluster, bool pdl,
                              const std::optional<at::Tensor>& stamps) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor part, act;
  DecodeMlpParams p = mlp_cluster_params(x, w1, b1, w2, barrier, relu, cluster, pdl, part, act);
  if (stamps.has_value() && stamps->defined()) {
    HYBRID_CHECK(stamps->is_cuda() && stamps->device() == x.device() && stamps->scalar_type() == at::kLong &&
                    stamps->is_contiguous() && stamps->numel() >= static_cast<int64_t>(p.grid) * kMlpStamps,
                "hybrid: decode_mlp_cluster stamps must be a contiguous int64 CUDA tensor of >= ", p.grid * kMlpStamps,
                " elements (CTAs x ", kMlpStamps, ")");
    p.stamps = reinterpret_cast<unsigned long long*>(stamps->data_ptr<int64_t>());
  }
  C10_CUDA_CHECK(launch_decode_mlp_cluster(x.scalar_type() == at::kHalf, p, static_cast<int>(cluster),
                                           c10::cuda::getCurrentCUDAStream().stream()));
  return part;
}

int64_t decode_mlp_cluster_active(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                                  const at::Tensor& w2, at::Tensor& barrier, int64_t cluster) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor part, act;
  const DecodeMlpParams p = mlp_cluster_params(x, w1, b1, w2, barrier, true, cluster, false, part, act);
  int clusters = 0;
  C10_CUDA_CHECK(decode_mlp_cluster_active(x.scalar_type() == at::kHalf, p, static_cast<int>(cluster), &clusters));
  return clusters;
}

std::tuple<at::Tensor, at::Tensor> decode_mlp_norm(const at::Tensor& x, const at::Tensor& w1,
                                                   const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                                   const std::optional<at::Tensor>& b2,
                                                   const std::optional<at::Tensor>& residual, const at::Tensor& norm_w,
                                                   const std::optional<at::Tensor>& norm_b, double eps,
                                                   at::Tensor& barrier, bool relu, int64_t k_splits, bool pdl,
                                                   const std::optional<at::Tensor>& stamps, bool flow) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor part, act;
  DecodeMlpParams p = mlp_params(x, w1, b1, w2, barrier, relu, k_splits, pdl, stamps, -1, flow, part, act);
  const int64_t m = x.size(0), hidden = x.size(1);
  HYBRID_CHECK(hidden <= kMlpMaxHidden, "hybrid: decode_mlp_norm needs hidden <= ", kMlpMaxHidden, ", got ", hidden);
  check_vector(b2, x, hidden, "b2");
  check_vector(norm_w, x, hidden, "norm_w");
  check_vector(norm_b, x, hidden, "norm_b");
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) {
    HYBRID_CHECK(residual->dim() == 2 && residual->size(0) == m && residual->size(1) == hidden &&
                    residual->stride(1) == 1 && residual->stride(0) % 2 == 0 &&
                    residual->scalar_type() == x.scalar_type() && residual->device() == x.device() &&
                    reinterpret_cast<uintptr_t>(residual->data_ptr()) % 4 == 0,
                "hybrid: decode_mlp_norm residual must be [M, hidden] rows (unit column stride, even row stride, "
                "4-byte aligned), dtype and device of x");
  }
  at::Tensor out = at::empty({m, hidden}, x.options());
  at::Tensor res_out = at::empty({m, hidden}, x.options());
  p.b2 = b2.has_value() && b2->defined() ? b2->data_ptr() : nullptr;
  p.residual = has_res ? residual->data_ptr() : nullptr;
  p.residual_stride = has_res ? residual->stride(0) : 0;
  p.norm_w = norm_w.data_ptr();
  p.norm_b = norm_b.has_value() && norm_b->defined() ? norm_b->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.res_out = res_out.data_ptr();
  p.eps = static_cast<float>(eps);
  C10_CUDA_CHECK(launch_decode_mlp(x.scalar_type() == at::kHalf, p, c10::cuda::getCurrentCUDAStream().stream()));
  return {out, res_out};
}

int64_t skinny_gemm_k_splits(int64_t m, int64_t n, int64_t k, at::ScalarType dtype, int64_t device_index) {
  check_skinny_shape(m, n, k, dtype);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index));
  return skinny_k_splits_for(m, n, k, dtype == at::kHalf, static_cast<int>(device_index));
}

namespace {

// The checks and parameters skinny_gemm and skinny_gemm_norm share (y left unset).
SkinnyGemmParams skinny_params(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                               bool relu, int64_t k_splits, bool pdl) {
  HYBRID_CHECK(x.is_cuda() && w.is_cuda(), "hybrid: skinny_gemm x and w must be CUDA tensors");
  HYBRID_CHECK(x.dim() == 2 && w.dim() == 2, "hybrid: skinny_gemm needs x [M, K] and w [N, K], got ", x.sizes(),
              " / ", w.sizes());
  HYBRID_CHECK(x.size(1) == w.size(1), "hybrid: skinny_gemm x ", x.sizes(), " and w ", w.sizes(), " differ in K");
  HYBRID_CHECK(x.scalar_type() == w.scalar_type(), "hybrid: skinny_gemm x and w must share a dtype");
  HYBRID_CHECK(x.is_contiguous() && w.is_contiguous(), "hybrid: skinny_gemm x and w must be contiguous");
  HYBRID_CHECK(w.device() == x.device(), "hybrid: skinny_gemm tensors must be on ", x.device());
  const int64_t m = x.size(0), n = w.size(0), k = x.size(1);
  check_skinny_shape(m, n, k, x.scalar_type());
  HYBRID_CHECK(aligned16(x.data_ptr()) && aligned16(w.data_ptr()), "hybrid: skinny_gemm x and w must be 16-byte aligned");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    HYBRID_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
                "hybrid: skinny_gemm bias must be [N] contiguous, dtype and device of x");
    HYBRID_CHECK(reinterpret_cast<uintptr_t>(bias->data_ptr()) % 4 == 0, "hybrid: skinny_gemm bias must be 4-byte aligned");
  }
  HYBRID_CHECK(k_splits >= 0 && k_splits <= kSkinnyMaxKSplits, "hybrid: skinny_gemm k_splits must be 0..",
              kSkinnyMaxKSplits, ", got ", k_splits);
  const bool half = x.scalar_type() == at::kHalf;
  SkinnyGemmParams p{};
  p.x = x.data_ptr();
  p.w = w.data_ptr();
  p.bias = has_bias ? bias->data_ptr() : nullptr;
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.k_splits = static_cast<int>(k_splits > 0 ? k_splits : skinny_k_splits_for(m, n, k, half, x.get_device()));
  p.relu = relu;
  p.pdl = pdl;
  return p;
}

}  // namespace

at::Tensor skinny_gemm(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                       bool relu, int64_t k_splits, bool pdl, const std::optional<at::Tensor>& k_cache,
                       const std::optional<at::Tensor>& v_cache, const std::optional<at::Tensor>& slots,
                       int64_t kv_col0) {
  const c10::cuda::CUDAGuard guard(x.device());
  SkinnyGemmParams p = skinny_params(x, w, bias, relu, k_splits, pdl);
  const int64_t m = x.size(0), n = w.size(0);
  const bool half = x.scalar_type() == at::kHalf;
  at::Tensor y = at::empty({m, n}, x.options());
  p.y = y.data_ptr();
  const bool kv = k_cache.has_value() && k_cache->defined();
  HYBRID_CHECK(kv == (v_cache.has_value() && v_cache->defined()) && kv == (slots.has_value() && slots->defined()),
              "hybrid: skinny_gemm k_cache, v_cache and slots come together");
  if (kv) {
    HYBRID_CHECK(k_cache->dim() == 4 && v_cache->sizes() == k_cache->sizes(),
                "hybrid: skinny_gemm caches must be [num_blocks, block_size, kv_heads, head_size], equal shapes");
    HYBRID_CHECK(k_cache->is_contiguous() && v_cache->is_contiguous() && k_cache->scalar_type() == x.scalar_type() &&
                    v_cache->scalar_type() == x.scalar_type() && k_cache->device() == x.device() &&
                    v_cache->device() == x.device(),
                "hybrid: skinny_gemm caches must be contiguous, dtype and device of x");
    HYBRID_CHECK(slots->dim() == 1 && slots->size(0) == m && slots->scalar_type() == at::kLong && slots->is_contiguous() &&
                    slots->device() == x.device(),
                "hybrid: skinny_gemm slots must be [M] int64 contiguous on the device of x");
    const int64_t width = k_cache->size(2) * k_cache->size(3);
    HYBRID_CHECK(width % 2 == 0 && kv_col0 % 2 == 0 && kv_col0 >= 0 && kv_col0 + 2 * width <= n,
                "hybrid: skinny_gemm kv columns [", kv_col0, ", ", kv_col0 + 2 * width, ") must be even and within N=", n);
    p.k_cache = k_cache->data_ptr();
    p.v_cache = v_cache->data_ptr();
    p.slots = slots->data_ptr<int64_t>();
    p.num_slots = k_cache->size(0) * k_cache->size(1);
    p.kv_col0 = static_cast<int>(kv_col0);
    p.kv_width = static_cast<int>(width);
  }
  C10_CUDA_CHECK(launch_skinny_gemm(half, p, c10::cuda::getCurrentCUDAStream().stream()));
  return y;
}

at::Tensor skinny_gemm_wgmma(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                             bool relu, int64_t k_splits, bool pdl) {
  HYBRID_CHECK(skinny_gemm_wgmma_built(), "hybrid: skinny_gemm_wgmma needs a build for sm_90a (H100 / H200)");
  const c10::cuda::CUDAGuard guard(x.device());
  SkinnyGemmParams p = skinny_params(x, w, bias, relu, k_splits, pdl);
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  p.y = y.data_ptr();
  C10_CUDA_CHECK(launch_skinny_gemm_wgmma(x.scalar_type() == at::kHalf, p, c10::cuda::getCurrentCUDAStream().stream()));
  return y;
}

bool skinny_gemm_wgmma_available() { return skinny_gemm_wgmma_built(); }

at::Tensor skinny_gemm_streamk(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                               bool relu, at::Tensor& counters, int64_t ctas, bool pdl,
                               const std::optional<at::Tensor>& stamps) {
  HYBRID_CHECK(skinny_streamk_built(), "hybrid: skinny_gemm_streamk needs a build for sm_90a (H100 / H200)");
  const c10::cuda::CUDAGuard guard(x.device());
  HYBRID_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "hybrid: skinny_gemm_streamk x ", x.sizes(),
              " and w ", w.sizes(), " must be [M, K] and [N, K]");
  HYBRID_CHECK(x.scalar_type() == w.scalar_type() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf),
              "hybrid: skinny_gemm_streamk x and w must both be bfloat16 or float16");
  HYBRID_CHECK(x.is_contiguous() && w.is_contiguous() && w.device() == x.device() && aligned16(x.data_ptr()) &&
                  aligned16(w.data_ptr()),
              "hybrid: skinny_gemm_streamk x and w must be contiguous, 16-byte aligned, on one device");
  const int64_t m = x.size(0), n = w.size(0), k = x.size(1);
  HYBRID_CHECK(m >= 1 && m <= kStreamKMaxM, "hybrid: skinny_gemm_streamk needs 1 <= M <= ", kStreamKMaxM, ", got ", m);
  HYBRID_CHECK(n > 0 && n % kStreamKTile == 0 && n / kStreamKTile <= kStreamKMaxTiles && k > 0 && k % kStreamKTile == 0,
              "hybrid: skinny_gemm_streamk needs N (<= ", kStreamKMaxTiles * kStreamKTile, ") and K multiples of ",
              kStreamKTile, ", got N=", n, " K=", k);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    HYBRID_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type() && bias->device() == x.device() &&
                    reinterpret_cast<uintptr_t>(bias->data_ptr()) % 4 == 0,
                "hybrid: skinny_gemm_streamk bias must be [N] contiguous, 4-byte aligned, dtype and device of x");
  }
  HYBRID_CHECK(counters.is_cuda() && counters.device() == x.device() && counters.scalar_type() == at::kInt &&
                  counters.is_contiguous() && counters.numel() >= n / kStreamKTile,
              "hybrid: skinny_gemm_streamk counters must be int32 [>= N / 64] on the device of x (zero)");
  const int64_t units = (n / kStreamKTile) * (k / kStreamKTile);
  const int64_t g = ctas > 0 ? ctas : sm_count(x.get_device());
  StreamKParams p{};
  p.ctas = static_cast<int>(std::min(g, units));
  HYBRID_CHECK(streamk_max_tiles_per_cta(static_cast<int>(n), static_cast<int>(k), p.ctas) <= kStreamKMaxTilesPerCta,
              "hybrid: skinny_gemm_streamk: ", p.ctas, " CTAs would give a CTA more than ", kStreamKMaxTilesPerCta,
              " column tiles; use more CTAs");
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.max_contrib = streamk_max_contrib(p.n, p.k, p.ctas);
  p.relu = relu;
  p.pdl = pdl;
  p.x = x.data_ptr();
  p.w = w.data_ptr();
  p.bias = has_bias ? bias->data_ptr() : nullptr;
  at::Tensor y = at::empty({m, n}, x.options());
  at::Tensor ws = at::empty({(n / kStreamKTile) * p.max_contrib * m * kStreamKTile}, x.options().dtype(at::kFloat));
  p.y = y.data_ptr();
  p.workspace = ws.data_ptr<float>();
  p.counters = reinterpret_cast<unsigned int*>(counters.data_ptr<int32_t>());
  if (stamps.has_value() && stamps->defined()) {
    HYBRID_CHECK(stamps->is_cuda() && stamps->device() == x.device() && stamps->scalar_type() == at::kLong &&
                    stamps->is_contiguous() && stamps->numel() >= p.ctas * kStreamKStamps,
                "hybrid: skinny_gemm_streamk stamps must be int64 [>= ctas x ", kStreamKStamps, "] on the device of x");
    p.stamps = reinterpret_cast<unsigned long long*>(stamps->data_ptr<int64_t>());
  }
  C10_CUDA_CHECK(launch_skinny_streamk(x.scalar_type() == at::kHalf, p, c10::cuda::getCurrentCUDAStream().stream()));
  return y;
}

bool skinny_streamk_available() { return skinny_streamk_built(); }

std::tuple<at::Tensor, at::Tensor> skinny_gemm_norm(const at::Tensor& x, const at::Tensor& w,
                                                    const std::optional<at::Tensor>& bias,
                                                    const std::optional<at::Tensor>& residual, const at::Tensor& norm_w,
                                                    const std::optional<at::Tensor>& norm_b, double eps,
                                                    at::Tensor& counter, int64_t k_splits, bool pdl) {
  const c10::cuda::CUDAGuard guard(x.device());
  SkinnyGemmParams p = skinny_params(x, w, bias, false, k_splits, pdl);
  const int64_t m = x.size(0), n = w.size(0);
  HYBRID_CHECK(n <= kSkinnyNormMaxN, "hybrid: skinny_gemm_norm needs N <= ", kSkinnyNormMaxN, ", got ", n);
  auto check_param = [&](const at::Tensor& v, const char* what) {
    HYBRID_CHECK(v.dim() == 1 && v.size(0) == n && v.is_contiguous() && v.scalar_type() == x.scalar_type() &&
                    v.device() == x.device() && aligned16(v.data_ptr()),
                "hybrid: skinny_gemm_norm ", what, " must be [", n, "] contiguous, 16-byte aligned, dtype and device of x");
  };
  check_param(norm_w, "norm_w");
  const bool has_nb = norm_b.has_value() && norm_b->defined();
  if (has_nb) check_param(*norm_b, "norm_b");
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) {
    HYBRID_CHECK(residual->dim() == 2 && residual->size(0) == m && residual->size(1) == n && residual->is_contiguous() &&
                    residual->scalar_type() == x.scalar_type() && residual->device() == x.device() &&
                    reinterpret_cast<uintptr_t>(residual->data_ptr()) % 4 == 0,
                "hybrid: skinny_gemm_norm residual must be [M, N] contiguous, 4-byte aligned, dtype and device of x");
  }
  HYBRID_CHECK(counter.is_cuda() && counter.device() == x.device() && counter.scalar_type() == at::kInt &&
                  counter.numel() >= 1 && counter.is_contiguous(),
              "hybrid: skinny_gemm_norm counter must be an int32 tensor on the device of x (zero)");
  at::Tensor out = at::empty({m, n}, x.options());
  at::Tensor res_out = at::empty({m, n}, x.options());
  SkinnyNormParams q{};
  q.residual = has_res ? residual->data_ptr() : nullptr;
  q.res_out = res_out.data_ptr();
  q.out = out.data_ptr();
  q.norm_w = norm_w.data_ptr();
  q.norm_b = has_nb ? norm_b->data_ptr() : nullptr;
  q.eps = static_cast<float>(eps);
  q.counter = reinterpret_cast<unsigned int*>(counter.data_ptr<int32_t>());
  p.y = out.data_ptr();  // not written (the checks want a pointer)
  C10_CUDA_CHECK(launch_skinny_gemm(x.scalar_type() == at::kHalf, p, c10::cuda::getCurrentCUDAStream().stream(), &q));
  return {out, res_out};
}

void l2_prefetch(const at::Tensor& t, int64_t nbytes, int64_t mode) {
  HYBRID_CHECK(t.is_cuda(), "hybrid: l2_prefetch needs a CUDA tensor");
  HYBRID_CHECK(t.is_contiguous(), "hybrid: l2_prefetch needs a contiguous tensor");
  HYBRID_CHECK(mode == 0 || mode == 1, "hybrid: l2_prefetch mode must be 0 (bulk) or 1 (per line), got ", mode);
  HYBRID_CHECK(aligned16(t.data_ptr()), "hybrid: l2_prefetch needs a 16-byte aligned tensor");
  const int64_t total = t.numel() * static_cast<int64_t>(t.element_size());
  nbytes = nbytes <= 0 ? total : std::min(nbytes, total);
  const c10::cuda::CUDAGuard guard(t.device());
  const int dev = t.get_device();
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  HYBRID_CHECK(mode == 1 || major >= 9, "hybrid: l2_prefetch mode 0 (bulk) needs sm_90+");
  C10_CUDA_CHECK(launch_l2_prefetch(t.data_ptr(), nbytes, static_cast<int>(mode), sm_count(dev),
                                    c10::cuda::getCurrentCUDAStream().stream()));
}

void set_decode_pdl_launch_op(bool on) { set_decode_pdl_launch(on); }

void set_decode_prefetch_op(bool on) { set_decode_prefetch(on); }

int64_t paged_decode_num_splits(int64_t batch, int64_t num_heads, int64_t num_kv_heads,
                                int64_t head_size, int64_t max_len, at::ScalarType dtype,
                                int64_t heads_per_cta, int64_t device_index) {
  HYBRID_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "hybrid: bad head counts");
  HYBRID_CHECK(paged_decode_supported(static_cast<int>(head_size)), "hybrid: unsupported head_size ",
              head_size);
  const DType dt = to_dtype(dtype);
  const int gq = pick_heads_per_cta(dt, static_cast<int>(head_size),
                                    static_cast<int>(num_heads / num_kv_heads), heads_per_cta);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index));
  const int64_t slots = static_cast<int64_t>(sm_count(static_cast<int>(device_index))) *
                        ctas_per_sm(dt, static_cast<int>(head_size), gq);
  return choose_num_splits(batch * (num_heads / gq), slots, max_len);
}

namespace {

// The checks, split choice and params of paged_decode_attention, shared with the append variant.
struct DecodeLaunch {
  at::Tensor q;          // query, or its 16-byte-aligned contiguous copy (kept alive for the launch)
  at::Tensor out;        // [batch, num_heads, head_size]
  at::Tensor workspace;  // split-K partials (num_splits > 1)
  PagedDecodeParams p{};
  DType dtype{};
  bool empty = false;  // batch == 0 or num_heads == 0: nothing to launch
};

// Call under a CUDAGuard of query's device.
DecodeLaunch prepare_decode(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                            int64_t num_splits, int64_t heads_per_cta) {
  HYBRID_CHECK(query.is_cuda(), "hybrid: query must be a CUDA tensor");
  HYBRID_CHECK(query.dim() == 3, "hybrid: query must be [batch, num_heads, head_size], got ", query.sizes());
  HYBRID_CHECK(key_cache.dim() == 4,
              "hybrid: key_cache must be [num_blocks, block_size, num_kv_heads, head_size], got ",
              key_cache.sizes());
  HYBRID_CHECK(value_cache.sizes() == key_cache.sizes(), "hybrid: value_cache ", value_cache.sizes(),
              " != key_cache ", key_cache.sizes());
  HYBRID_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "hybrid: caches must be contiguous");
  HYBRID_CHECK(key_cache.scalar_type() == query.scalar_type() && value_cache.scalar_type() == query.scalar_type(),
              "hybrid: query and caches must share a dtype");
  for (const at::Tensor* t : {&key_cache, &value_cache, &block_tables, &seq_lens}) {
    HYBRID_CHECK(t->device() == query.device(), "hybrid: all tensors must be on ", query.device());
  }
  const DType dtype = to_dtype(query.scalar_type());
  const int64_t batch = query.size(0);
  const int64_t num_heads = query.size(1);
  const int64_t head_size = query.size(2);
  const int64_t block_size = key_cache.size(1);
  const int64_t num_kv_heads = key_cache.size(2);
  HYBRID_CHECK(key_cache.size(3) == head_size, "hybrid: cache head_size ", key_cache.size(3),
              " != query head_size ", head_size);
  HYBRID_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "hybrid: num_heads ", num_heads,
              " is not a multiple of num_kv_heads ", num_kv_heads);
  HYBRID_CHECK(paged_decode_supported(static_cast<int>(head_size)), "hybrid: no decode kernel for head_size ",
              head_size, " (32, 64, 80, 96, 128, 256)");
  HYBRID_CHECK(block_size > 0 && (block_size & (block_size - 1)) == 0, "hybrid: block_size must be a power of two");
  HYBRID_CHECK(block_tables.dim() == 2 && block_tables.size(0) == batch && block_tables.scalar_type() == at::kInt,
              "hybrid: block_tables must be [batch, max_blocks] int32, got ", block_tables.sizes(), " ",
              block_tables.scalar_type());
  HYBRID_CHECK(block_tables.size(1) <= 1 || block_tables.stride(1) == 1, "hybrid: block_tables rows must be contiguous");
  HYBRID_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == batch && seq_lens.scalar_type() == at::kInt &&
                  seq_lens.is_contiguous(),
              "hybrid: seq_lens must be [batch] int32 contiguous");
  HYBRID_CHECK(batch <= 65535, "hybrid: batch ", batch, " > 65535");
  HYBRID_CHECK(aligned16(key_cache.data_ptr()) && aligned16(value_cache.data_ptr()),
              "hybrid: caches must be 16-byte aligned");

  const int vec = dtype_vec(dtype);
  at::Tensor q = query;
  if (q.stride(2) != 1 || q.stride(0) % vec != 0 || q.stride(1) % vec != 0 || !aligned16(q.data_ptr())) {
    q = query.clone(at::MemoryFormat::Contiguous);  // 16-byte loads need aligned rows
  }
  DecodeLaunch L;
  L.dtype = dtype;
  L.q = q;
  L.out = at::empty({batch, num_heads, head_size}, query.options());
  if (batch == 0 || num_heads == 0) {
    L.empty = true;
    return L;
  }

  const int gq = pick_heads_per_cta(dtype, static_cast<int>(head_size),
                                    static_cast<int>(num_heads / num_kv_heads), heads_per_cta);
  const int64_t max_len = block_tables.size(1) * block_size;
  int64_t splits = num_splits;
  if (splits <= 0) {
    const int64_t slots = static_cast<int64_t>(sm_count(query.get_device())) *
                          ctas_per_sm(dtype, static_cast<int>(head_size), gq);
    splits = choose_num_splits(batch * (num_heads / gq), slots, max_len);
  }
  HYBRID_CHECK(splits <= 65535, "hybrid: num_splits ", splits, " > 65535");

  PagedDecodeParams& p = L.p;
  p.out = L.out.data_ptr();
  p.query = q.data_ptr();
  p.key_cache = key_cache.data_ptr();
  p.value_cache = value_cache.data_ptr();
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.q_stride_batch = q.stride(0);
  p.q_stride_head = q.stride(1);
  p.bt_stride_batch = block_tables.stride(0);
  p.batch = static_cast<int>(batch);
  p.num_heads = static_cast<int>(num_heads);
  p.num_kv_heads = static_cast<int>(num_kv_heads);
  p.head_size = static_cast<int>(head_size);
  p.block_size_log2 = static_cast<int>(std::lround(std::log2(static_cast<double>(block_size))));
  p.num_splits = static_cast<int>(splits);
  p.max_blocks_per_seq = static_cast<int>(block_tables.size(1));
  p.num_blocks = static_cast<int>(key_cache.size(0));
  p.prefetch_first_tile = 0;  // paged_decode_attention sets it (the append variant never does)
  p.heads_per_cta = gq;
  if (splits > 1) {
    const int64_t parts = batch * num_heads * splits;
    L.workspace = at::empty({parts * (head_size + 2)}, query.options().dtype(at::kFloat));
    p.part_acc = L.workspace.data_ptr<float>();
    p.part_ml = p.part_acc + parts * head_size;
  }
  return L;
}

}  // namespace

at::Tensor paged_decode_attention(const at::Tensor& query, const at::Tensor& key_cache,
                                  const at::Tensor& value_cache, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, double scale, int64_t num_splits,
                                  int64_t heads_per_cta) {
  HYBRID_CHECK(query.is_cuda(), "hybrid: query must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(query.device());
  DecodeLaunch L = prepare_decode(query, key_cache, value_cache, block_tables, seq_lens, scale, num_splits,
                                  heads_per_cta);
  if (L.empty) return L.out;
  L.p.prefetch_first_tile = decode_pdl_launch() && decode_prefetch() && L.p.num_splits == 1 ? 1 : 0;
  C10_CUDA_CHECK(launch_paged_decode(L.dtype, L.p, c10::cuda::getCurrentCUDAStream().stream()));
  return L.out;
}

at::Tensor paged_decode_attention_append(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                         at::Tensor& key_cache, at::Tensor& value_cache,
                                         const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                                         const at::Tensor& seq_lens, double scale, int64_t num_splits,
                                         int64_t heads_per_cta) {
  HYBRID_CHECK(query.is_cuda() && key.is_cuda(), "hybrid: query and key must be CUDA tensors");
  HYBRID_CHECK(query.dim() == 3 && key.dim() == 3 && key.size(0) == query.size(0),
              "hybrid: key must be [batch, num_kv_heads, head_size], got ", key.sizes());
  HYBRID_CHECK(value.sizes() == key.sizes(), "hybrid: value ", value.sizes(), " != key ", key.sizes());
  HYBRID_CHECK(key_cache.dim() == 4 && key_cache.size(2) == key.size(1) && key_cache.size(3) == key.size(2),
              "hybrid: key_cache ", key_cache.sizes(), " does not hold key rows ", key.sizes());
  HYBRID_CHECK(key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type(),
              "hybrid: query, key and value must share a dtype");
  HYBRID_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0) &&
                  slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(),
              "hybrid: slot_mapping must be [batch] int64 contiguous");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&key, &value, &slot_mapping}) {
    HYBRID_CHECK(t->device() == query.device(), "hybrid: all tensors must be on ", query.device());
  }
  const c10::cuda::CUDAGuard guard(query.device());
  DecodeLaunch L = prepare_decode(query, key_cache, value_cache, block_tables, seq_lens, scale, num_splits,
                                  heads_per_cta);
  if (L.empty) return L.out;
  const int vec = dtype_vec(L.dtype);
  auto rows16 = [vec](const at::Tensor& t) {  // 16-byte loads of every head row
    return t.stride(2) == 1 && t.stride(0) % vec == 0 && t.stride(1) % vec == 0 && aligned16(t.data_ptr());
  };
  const at::Tensor k = rows16(key) ? key : key.clone(at::MemoryFormat::Contiguous);
  const at::Tensor v = rows16(value) ? value : value.clone(at::MemoryFormat::Contiguous);
  PagedDecodeAppendParams p{};
  static_cast<PagedDecodeParams&>(p) = L.p;
  p.key_new = k.data_ptr();
  p.value_new = v.data_ptr();
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.kn_stride_batch = k.stride(0);
  p.kn_stride_head = k.stride(1);
  p.vn_stride_batch = v.stride(0);
  p.vn_stride_head = v.stride(1);
  p.num_slots = key_cache.size(0) * key_cache.size(1);
  C10_CUDA_CHECK(launch_paged_decode_append(L.dtype, p, c10::cuda::getCurrentCUDAStream().stream()));
  return L.out;
}

void write_kv_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                    at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  HYBRID_CHECK(key.is_cuda(), "hybrid: key must be a CUDA tensor");
  HYBRID_CHECK(key.dim() == 3, "hybrid: key must be [num_tokens, num_kv_heads, head_size], got ", key.sizes());
  HYBRID_CHECK(value.sizes() == key.sizes(), "hybrid: value ", value.sizes(), " != key ", key.sizes());
  HYBRID_CHECK(key_cache.dim() == 4 && key_cache.size(2) == key.size(1) && key_cache.size(3) == key.size(2),
              "hybrid: key_cache ", key_cache.sizes(), " does not hold key rows ", key.sizes());
  HYBRID_CHECK(value_cache.sizes() == key_cache.sizes(), "hybrid: value_cache ", value_cache.sizes(),
              " != key_cache ", key_cache.sizes());
  HYBRID_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "hybrid: caches must be contiguous");
  HYBRID_CHECK(key.scalar_type() == key_cache.scalar_type() && value.scalar_type() == key_cache.scalar_type() &&
                  value_cache.scalar_type() == key_cache.scalar_type(),
              "hybrid: key, value and caches must share a dtype");
  HYBRID_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0) &&
                  slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(),
              "hybrid: slot_mapping must be [num_tokens] int64 contiguous");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&value, &key_cache, &value_cache, &slot_mapping}) {
    HYBRID_CHECK(t->device() == key.device(), "hybrid: all tensors must be on ", key.device());
  }
  HYBRID_CHECK(key.size(0) <= INT32_MAX, "hybrid: too many tokens");
  const DType dtype = to_dtype(key.scalar_type());
  const int64_t num_tokens = key.size(0);
  if (num_tokens == 0 || key.size(1) == 0 || key.size(2) == 0) return;

  const c10::cuda::CUDAGuard guard(key.device());
  const at::Tensor k = key.stride(2) == 1 ? key : key.contiguous();
  const at::Tensor v = value.stride(2) == 1 ? value : value.contiguous();
  const int vec = dtype_vec(dtype);
  WriteKVCacheParams p{};
  p.key = k.data_ptr();
  p.value = v.data_ptr();
  p.key_cache = key_cache.data_ptr();
  p.value_cache = value_cache.data_ptr();
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.key_stride_token = k.stride(0);
  p.key_stride_head = k.stride(1);
  p.value_stride_token = v.stride(0);
  p.value_stride_head = v.stride(1);
  p.num_slots = key_cache.size(0) * key_cache.size(1);
  p.num_tokens = static_cast<int>(num_tokens);
  p.num_kv_heads = static_cast<int>(key.size(1));
  p.head_size = static_cast<int>(key.size(2));
  p.vectorized = p.head_size % vec == 0 && aligned16(p.key) && aligned16(p.value) && aligned16(p.key_cache) &&
                 aligned16(p.value_cache) && p.key_stride_token % vec == 0 && p.key_stride_head % vec == 0 &&
                 p.value_stride_token % vec == 0 && p.value_stride_head % vec == 0;
  C10_CUDA_CHECK(launch_write_kv_cache(dtype, p, c10::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace hybrid
