// Paged decode attention: kernels and the per-dtype launcher (instantiated in paged_attention_*.cu).
//
// One CTA of 4 warps owns (query-head chunk, row, split). A chunk is GQ query heads of ONE kv head
// (the whole GQA group when the registers allow), so each KV row is read from memory once and used
// for all GQ heads. Inside a warp, TPT lanes share one token: each lane loads 16-byte pieces of the
// token's key and value (chunk c*TPT + lane%TPT of head_size), so a token's row is one coalesced
// run; a warp covers TPI = 32/TPT tokens per step and UNROLL steps per tile, all loads of a tile in
// flight before the first use. Scores: per-lane partial dot products over the lane's pieces,
// summed across the TPT lanes by xor shuffles, then an online softmax in the log2 domain (scale *
// log2(e) folded into q, exp2) with a warp-uniform running max; each lane accumulates fp32 output
// for its pieces. Warps then merge through shared memory, and with num_splits > 1 (flash-decoding
// for small batch x long context) a second kernel merges the splits' partials.
//
// APPEND (hybrid::paged_decode_attention_append): the decode step's KV-cache write fused in. The
// splits are cut from seq_len (which counts the step's token) exactly as without it, but the cache
// is read for positions < seq_len - 1 only; the split holding position seq_len - 1 (split 0 for an
// empty row) owns the token: its CTA that serves the first query-head chunk of the kv head copies
// key_new / value_new to the caches at slot_mapping[b] (once per row and kv head), and all its
// CTAs fold the token in as one more partial at the warp merge (score from q and key_new in
// registers of warp 0, value_new read per output element). No CTA reads what another writes.
#pragma once

#include <cstdint>
#include <type_traits>

#include "launch.h"
#include "vec_utils.cuh"

namespace hybrid {

constexpr int kDecodeWarps = 4;
constexpr int kSplitTokenAlign = 16;  // a split's token range starts at a multiple of this

template <typename T, int D, int GQ>
struct DecodeConfig {
  static constexpr int kVec = VecTraits<T>::kVec;
  static constexpr int kChunks = D / kVec;                    // 16-byte pieces of one head row
  static constexpr int kTPT = decode_tpt(kChunks);            // lanes per token
  static constexpr int kCPL = (kChunks + kTPT - 1) / kTPT;    // pieces per lane
  static constexpr bool kFull = kChunks % kTPT == 0;          // no idle lanes
  static constexpr int kTPI = 32 / kTPT;                      // tokens per warp step
  static constexpr int kQRegs = GQ * kCPL * kVec;
  // More tokens in flight where registers allow (they hide the DRAM latency): the K and V
  // registers of a tile (8 * kUnroll * kCPL) stay <= 64 and shrink as q / acc grow.
  static constexpr int kUnrollQ = kQRegs <= 16 ? 8 : (kQRegs <= 32 ? 4 : 2);
  static constexpr int kUnrollKV = kCPL >= 8 ? 1 : 8 / kCPL;
  static constexpr int kUnroll = kUnrollQ < kUnrollKV ? kUnrollQ : kUnrollKV;
  static constexpr int kTile = kTPI * kUnroll;                // tokens per warp per tile
  static_assert(D % kVec == 0, "head_size must be a multiple of 16 bytes");
  static_assert(kQRegs <= 64, "too many query heads per CTA for this head size");
};

__device__ __forceinline__ float elem_to_float(float x) { return x; }
__device__ __forceinline__ float elem_to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float elem_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Programmatic dependent launch: a PDL-launched kernel after this one (the out_proj GEMM,
// csrc/skinny_gemm.cu with pdl) may start streaming its weights once every CTA here has started;
// it waits for this kernel's output itself. No effect on a next kernel launched without PDL.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// The counterpart for a kernel launched with programmatic dependent launch (decode_pdl_launch()):
// it may be resident before the previous kernel in the stream ends, so it reads and writes nothing
// before this returns (the previous kernel's writes are visible after it). A no-op otherwise.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

template <bool APPEND>
using DecodeParamsT = std::conditional_t<APPEND, PagedDecodeAppendParams, PagedDecodeParams>;

// Resident CTAs asked of ptxas: one query head (or 16-bit GQ4 at D 32 / 64 / 128) fits 128 registers (4 CTAs of
// 4 warps per SM). Without the hint, unrelated edits (e.g. the params struct's layout) moved GQ4 /
// D64-D128 from 128 to 161-167 registers.
template <typename T, int D, int GQ>
constexpr int decode_min_ctas() {
  return (GQ == 1 || (GQ == 4 && sizeof(T) == 2 && (D == 32 || D == 64 || D == 128))) ? 4 : 1;
}

template <typename T, int D, int GQ, int NW, bool APPEND>
__global__ void __launch_bounds__(NW * 32, (decode_min_ctas<T, D, GQ>())) paged_decode_split_kernel(const DecodeParamsT<APPEND> p) {
  using Cfg = DecodeConfig<T, D, GQ>;
  constexpr int VEC = Cfg::kVec;
  constexpr int TPT = Cfg::kTPT;
  constexpr int CPL = Cfg::kCPL;
  constexpr int TPI = Cfg::kTPI;
  constexpr int U = Cfg::kUnroll;
  constexpr int TILE = Cfg::kTile;
  constexpr unsigned kFullMask = 0xffffffffu;

  __shared__ float sm_acc[NW][GQ][D];
  __shared__ float sm_m[NW][GQ];
  __shared__ float sm_l[NW][GQ];
  __shared__ float sm_cur[GQ];  // APPEND: the step token's score per head (log2 domain)
  allow_dependent_launch();
  constexpr bool kPrefetch = !APPEND && GQ == 1;  // see "Pre-wait prefetch" below
  if constexpr (!kPrefetch) wait_for_previous_kernel();

  const int head0 = blockIdx.x * GQ;
  const int b = blockIdx.y;
  const int split = blockIdx.z;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int g = lane / TPT;  // token slot of this lane within a warp step
  const int r = lane % TPT;  // lane within the token
  const int group = p.num_heads / p.num_kv_heads;
  const int kv_head = head0 / group;
  // Pre-wait prefetch (p.prefetch_first_tile: PDL launch inside the engine's decode step, one split,
  // plain variant). The warp's first tile is loaded BEFORE waiting for the previous kernel, so its
  // DRAM round trip overlaps that kernel's tail. Safe because in a decode step the kernels still
  // running may only write the cache at position seq_len - 1 of each row (write_kv_cache) and the
  // seq_lens buffer (decode_prepare: the old or the new length, either read here), while block
  // tables only change between graph replays. Bounds come from the possibly stale length, clamped
  // to the table width and the pool, so every load is in bounds; after the wait the tile is used
  // only if all its tokens are cached positions (< seq_len - 1) under the final length.
  // Compiled for one query head per CTA only (MHA and the GQA fallback): with GQ > 1 the tile held
  // across the wait cost registers (D128 GQ4: 128 -> 151, one CTA less per SM).
  uint4 kr0[U][CPL];
  uint4 vr0[U][CPL];
  bool prefetched = false;  // warp-uniform
  if constexpr (kPrefetch) {
    if (p.prefetch_first_tile && p.num_splits == 1) {
      const int bsl = p.block_size_log2;
      if (warp * TILE + TILE <= (p.max_blocks_per_seq << bsl)) {
        // The length and the tile's block ids are independent loads, issued together, and the
        // K / V loads are not behind a branch on the length (the compiler would sink the block-id
        // loads into it): a row whose first tile is not all cached loads block 0, token 0 instead
        // (one L1 line), and the tile is marked unused. Start-up chain: (seq_len | block ids) ->
        // K / V, two round trips instead of three.
        const int32_t* bt0 = p.block_tables + static_cast<int64_t>(b) * p.bt_stride_batch;
        const int len_pre = p.seq_lens[b];
        int blk0[U];
#pragma unroll
        for (int u = 0; u < U; ++u) blk0[u] = bt0[(warp * TILE + u * TPI + g) >> bsl];
        const bool ok = warp * TILE + TILE <= len_pre - 1;
        const int64_t stride = static_cast<int64_t>(p.num_kv_heads) * D;
        const T* kb = static_cast<const T*>(p.key_cache) + static_cast<int64_t>(kv_head) * D;
        const T* vb = static_cast<const T*>(p.value_cache) + static_cast<int64_t>(kv_head) * D;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int t = warp * TILE + u * TPI + g;
          const int blk = ok ? min(max(blk0[u], 0), p.num_blocks - 1) : 0;
          const int64_t off = ((static_cast<int64_t>(blk) << bsl) + (ok ? (t & ((1 << bsl) - 1)) : 0)) * stride;
#pragma unroll
          for (int c = 0; c < CPL; ++c) {
            const int chunk = c * TPT + r;
            if (Cfg::kFull || chunk < Cfg::kChunks) {
              kr0[u][c] = load_vec16(kb + off + chunk * VEC);
              vr0[u][c] = load_vec16(vb + off + chunk * VEC);
            } else {
              kr0[u][c] = zero_vec16();
              vr0[u][c] = zero_vec16();
            }
          }
        }
        prefetched = ok;
      }
    }
    wait_for_previous_kernel();
  }

  // This split's tokens: the row's length divided evenly (read on device: no host sync).
  const int seq_len = p.seq_lens[b];
  int per_split = (seq_len + p.num_splits - 1) / p.num_splits;
  per_split = (per_split + kSplitTokenAlign - 1) / kSplitTokenAlign * kSplitTokenAlign;
  const int start = split * per_split;
  const int end = min(APPEND ? seq_len - 1 : seq_len, start + per_split);  // cached tokens
  // APPEND: does this split own position seq_len - 1 (and seq_len > 0: has_cur)?
  const bool owner = APPEND && (per_split > 0 ? (max(seq_len - 1, 0) / per_split == split) : split == 0);
  const bool has_cur = owner && seq_len > 0;
  if constexpr (APPEND) {
    if (owner && head0 % group == 0) {  // one CTA per (row, kv head) writes
      const int64_t slot = p.slot_mapping[b];
      if (slot >= 0 && slot < p.num_slots) {
        const int64_t dst = (slot * p.num_kv_heads + kv_head) * D;  // contiguous cache
        const T* kn = static_cast<const T*>(p.key_new) + b * p.kn_stride_batch + kv_head * p.kn_stride_head;
        const T* vn = static_cast<const T*>(p.value_new) + b * p.vn_stride_batch + kv_head * p.vn_stride_head;
        // the cache pointers are const for the read path; these rows are never read in this launch
        T* kc = const_cast<T*>(static_cast<const T*>(p.key_cache)) + dst;
        T* vc = const_cast<T*>(static_cast<const T*>(p.value_cache)) + dst;
        for (int i = threadIdx.x; i < Cfg::kChunks; i += NW * 32) {
          *reinterpret_cast<uint4*>(kc + i * VEC) = load_vec16(kn + i * VEC);
          *reinterpret_cast<uint4*>(vc + i * VEC) = load_vec16(vn + i * VEC);
        }
      }
    }
  }

  float q[GQ][CPL][VEC];  // this lane's pieces of the GQ query heads, pre-scaled
  const T* q_row = static_cast<const T*>(p.query) + static_cast<int64_t>(b) * p.q_stride_batch;
#pragma unroll
  for (int h = 0; h < GQ; ++h) {
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
      const int chunk = c * TPT + r;
      if (Cfg::kFull || chunk < Cfg::kChunks) {
        unpack<T>(load_vec16(q_row + static_cast<int64_t>(head0 + h) * p.q_stride_head + chunk * VEC), q[h][c]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) q[h][c][j] *= p.scale_log2;
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) q[h][c][j] = 0.f;
      }
    }
  }

  float m[GQ];              // running max of scores (log2 domain), identical in all lanes
  float l[GQ];              // running sum of exp2, per lane over its token slot
  float acc[GQ][CPL][VEC];  // running sum of p * v over this lane's token slot and pieces
#pragma unroll
  for (int h = 0; h < GQ; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.f;
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[h][c][j] = 0.f;
    }
  }

  const int32_t* bt = p.block_tables + static_cast<int64_t>(b) * p.bt_stride_batch;
  const int64_t token_stride = static_cast<int64_t>(p.num_kv_heads) * D;  // elements per slot
  const T* k_base = static_cast<const T*>(p.key_cache) + static_cast<int64_t>(kv_head) * D;
  const T* v_base = static_cast<const T*>(p.value_cache) + static_cast<int64_t>(kv_head) * D;
  const int bs_log2 = p.block_size_log2;
  const int bs_mask = (1 << bs_log2) - 1;

  // K / V of a tile of U token steps at tokens t(u) = t0 + u * TPI + g, from block ids blk[u].
  auto load_tile = [&](uint4 (&kr)[U][CPL], uint4 (&vr)[U][CPL], const int (&blk)[U], int t0, int last) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int tc = min(t0 + u * TPI + g, last);
      const int64_t off = ((static_cast<int64_t>(blk[u]) << bs_log2) + (tc & bs_mask)) * token_stride;
#pragma unroll
      for (int c = 0; c < CPL; ++c) {
        const int chunk = c * TPT + r;
        if (Cfg::kFull || chunk < Cfg::kChunks) {
          kr[u][c] = load_vec16(k_base + off + chunk * VEC);
          vr[u][c] = load_vec16(v_base + off + chunk * VEC);
        } else {
          kr[u][c] = zero_vec16();
          vr[u][c] = zero_vec16();
        }
      }
    }
  };

  // Block numbers of a tile's tokens, fetched one tile ahead so the dependent KV loads don't wait
  // on them. Tokens past `end` are clamped to end - 1 (a live token): their loads read real cache
  // rows and the scores are masked, so the loads need no predicate and no branch.
  int blk[U];
  auto fetch_blocks = [&](int tile0) {
#pragma unroll
    for (int u = 0; u < U; ++u) blk[u] = bt[min(tile0 + u * TPI + g, end - 1) >> bs_log2];
  };
  // One tile's scores, online-softmax update and p * v (all lanes of the warp take part).
  auto process_tile = [&](const uint4 (&kr)[U][CPL], const uint4 (&vr)[U][CPL], const bool (&valid)[U]) {
    float s[U][GQ];  // scores, then probabilities
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int h = 0; h < GQ; ++h) s[u][h] = 0.f;
#pragma unroll
      for (int c = 0; c < CPL; ++c) {
        float kf[VEC];
        unpack<T>(kr[u][c], kf);
#pragma unroll
        for (int h = 0; h < GQ; ++h) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) s[u][h] = fmaf(q[h][c][j], kf[j], s[u][h]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int h = 0; h < GQ; ++h) {
#pragma unroll
        for (int off = TPT / 2; off > 0; off >>= 1) s[u][h] += __shfl_xor_sync(kFullMask, s[u][h], off);
        if (!valid[u]) s[u][h] = -INFINITY;
      }
    }

    // Online softmax: the tile's max over all token slots of the warp (finite: token t0 is live).
#pragma unroll
    for (int h = 0; h < GQ; ++h) {
      float mt = s[0][h];
#pragma unroll
      for (int u = 1; u < U; ++u) mt = fmaxf(mt, s[u][h]);
#pragma unroll
      for (int off = TPT; off < 32; off <<= 1) mt = fmaxf(mt, __shfl_xor_sync(kFullMask, mt, off));
      const float m_new = fmaxf(m[h], mt);
      if (m_new > m[h]) {  // warp-uniform; after the first tiles the max rarely moves
        const float alpha = exp2f(m[h] - m_new);  // 0 on the first tile (m = -inf)
        m[h] = m_new;
        l[h] *= alpha;
#pragma unroll
        for (int c = 0; c < CPL; ++c) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[h][c][j] *= alpha;
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        s[u][h] = exp2f(s[u][h] - m_new);  // masked tokens: exp2(-inf) = 0
        l[h] += s[u][h];
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int c = 0; c < CPL; ++c) {
        float vf[VEC];
        unpack<T>(vr[u][c], vf);
#pragma unroll
        for (int h = 0; h < GQ; ++h) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[h][c][j] = fmaf(s[u][h], vf[j], acc[h][c][j]);
        }
      }
    }
  };

  int t0 = start + warp * TILE;
  bool blocks_ready = false;
  if constexpr (kPrefetch) {
    // The prefetched tile counts only if every token of it is a cached position under the final
    // length (num_splits == 1, so the warp's first tile starts at warp * TILE as assumed above).
    if (prefetched && t0 + TILE <= seq_len - 1) {
      bool all_valid[U];
#pragma unroll
      for (int u = 0; u < U; ++u) all_valid[u] = true;
      if (t0 + NW * TILE < end) fetch_blocks(t0 + NW * TILE);
      process_tile(kr0, vr0, all_valid);
      t0 += NW * TILE;
      blocks_ready = true;
    }
  }
  if (!blocks_ready && t0 < end) fetch_blocks(t0);
  // The loop bound depends only on the warp index, so shuffles below see all 32 lanes.
  for (; t0 < end; t0 += NW * TILE) {
    uint4 kr[U][CPL];
    uint4 vr[U][CPL];
    bool valid[U];
#pragma unroll
    for (int u = 0; u < U; ++u) valid[u] = t0 + u * TPI + g < end;
    load_tile(kr, vr, blk, t0, end - 1);
    if (t0 + NW * TILE < end) fetch_blocks(t0 + NW * TILE);
    process_tile(kr, vr, valid);
  }

  if constexpr (APPEND) {
    // The step's token: q . key_new over the lanes of one token slot (CTA-uniform branch, and
    // warp 0 whole, so the shuffles see all 32 lanes); its value is added at the merge below.
    if (has_cur && warp == 0) {
      const T* kn = static_cast<const T*>(p.key_new) + b * p.kn_stride_batch + kv_head * p.kn_stride_head;
      float sc[GQ];
#pragma unroll
      for (int h = 0; h < GQ; ++h) sc[h] = 0.f;
#pragma unroll
      for (int c = 0; c < CPL; ++c) {
        const int chunk = c * TPT + r;
        if (Cfg::kFull || chunk < Cfg::kChunks) {
          float kf[VEC];
          unpack<T>(load_vec16(kn + chunk * VEC), kf);
#pragma unroll
          for (int h = 0; h < GQ; ++h) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) sc[h] = fmaf(q[h][c][j], kf[j], sc[h]);
          }
        }
      }
#pragma unroll
      for (int h = 0; h < GQ; ++h) {
#pragma unroll
        for (int off = TPT / 2; off > 0; off >>= 1) sc[h] += __shfl_xor_sync(kFullMask, sc[h], off);
        if (lane == 0) sm_cur[h] = sc[h];
      }
    }
  }

  // Sum the warp's token slots (same running max everywhere, so plain sums).
#pragma unroll
  for (int off = TPT; off < 32; off <<= 1) {
#pragma unroll
    for (int h = 0; h < GQ; ++h) {
      l[h] += __shfl_xor_sync(kFullMask, l[h], off);
#pragma unroll
      for (int c = 0; c < CPL; ++c) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[h][c][j] += __shfl_xor_sync(kFullMask, acc[h][c][j], off);
      }
    }
  }
  if (g == 0) {
#pragma unroll
    for (int h = 0; h < GQ; ++h) {
#pragma unroll
      for (int c = 0; c < CPL; ++c) {
        const int chunk = c * TPT + r;
        if (Cfg::kFull || chunk < Cfg::kChunks) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) sm_acc[warp][h][chunk * VEC + j] = acc[h][c][j];
        }
      }
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int h = 0; h < GQ; ++h) {
      sm_m[warp][h] = m[h];
      sm_l[warp][h] = l[h];
    }
  }
  __syncthreads();

  // Merge the warps; warps that saw no token have m = -inf and are skipped.
  for (int i = threadIdx.x; i < GQ * D; i += NW * 32) {
    const int h = i / D;
    const int d = i % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < NW; ++w) mx = fmaxf(mx, sm_m[w][h]);
    if (APPEND && has_cur) mx = fmaxf(mx, sm_cur[h]);
    float a = 0.f;
    float lsum = 0.f;
    if (mx > -INFINITY) {
#pragma unroll
      for (int w = 0; w < NW; ++w) {
        const float mw = sm_m[w][h];
        if (mw > -INFINITY) {
          const float e = exp2f(mw - mx);
          a = fmaf(e, sm_acc[w][h][d], a);
          lsum = fmaf(e, sm_l[w][h], lsum);
        }
      }
    }
    if constexpr (APPEND) {
      if (has_cur) {  // the step's token as one more partial: m = its score, l = 1, acc = value_new
        const T* vn = static_cast<const T*>(p.value_new) + b * p.vn_stride_batch + kv_head * p.vn_stride_head;
        const float e = exp2f(sm_cur[h] - mx);
        a = fmaf(e, elem_to_float(vn[d]), a);
        lsum += e;
      }
    }
    const int64_t row_head = static_cast<int64_t>(b) * p.num_heads + head0 + h;
    if (p.num_splits == 1) {
      static_cast<T*>(p.out)[row_head * D + d] = from_float<T>(lsum > 0.f ? a / lsum : 0.f);
    } else {
      const int64_t part = row_head * p.num_splits + split;
      p.part_acc[part * D + d] = a;
      if (d == 0) {
        p.part_ml[2 * part] = mx;
        p.part_ml[2 * part + 1] = lsum;
      }
    }
  }
}

// Merges the splits of one (row, head): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s.
template <typename T, int D>
__global__ void paged_decode_merge_kernel(const PagedDecodeParams p) {
  allow_dependent_launch();
  const int head = blockIdx.x;
  const int b = blockIdx.y;
  const int num_splits = p.num_splits;
  const int64_t row_head = static_cast<int64_t>(b) * p.num_heads + head;
  const float* ml = p.part_ml + 2 * row_head * num_splits;
  const float* part = p.part_acc + row_head * num_splits * D;
  float mx = -INFINITY;
  for (int s = 0; s < num_splits; ++s) mx = fmaxf(mx, ml[2 * s]);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float a = 0.f;
    float lsum = 0.f;
    if (mx > -INFINITY) {
      for (int s = 0; s < num_splits; ++s) {
        const float ms = ml[2 * s];
        if (ms > -INFINITY) {  // empty splits wrote m = -inf, l = 0, acc = 0
          const float e = exp2f(ms - mx);
          a = fmaf(e, part[static_cast<int64_t>(s) * D + d], a);
          lsum = fmaf(e, ml[2 * s + 1], lsum);
        }
      }
    }
    static_cast<T*>(p.out)[row_head * D + d] = from_float<T>(lsum > 0.f ? a / lsum : 0.f);
  }
}

template <typename T, int D, int GQ, bool APPEND>
cudaError_t launch_decode_config(const DecodeParamsT<APPEND>& p, cudaStream_t stream) {
  const dim3 grid(p.num_heads / GQ, p.batch, p.num_splits);
  cudaError_t err;
  if (decode_pdl_launch()) {  // resident while the previous kernel drains (wait_for_previous_kernel)
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(kDecodeWarps * 32);
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    err = cudaLaunchKernelEx(&cfg, paged_decode_split_kernel<T, D, GQ, kDecodeWarps, APPEND>, p);
  } else {
    paged_decode_split_kernel<T, D, GQ, kDecodeWarps, APPEND><<<grid, kDecodeWarps * 32, 0, stream>>>(p);
    err = cudaGetLastError();
  }
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const int threads = D < 256 ? (D + 31) / 32 * 32 : 256;
  paged_decode_merge_kernel<T, D>
      <<<dim3(p.num_heads, p.batch), threads, 0, stream>>>(static_cast<const PagedDecodeParams&>(p));
  return cudaGetLastError();
}

// Calls op.template run<T, D, GQ>() for a runtime (head_size, heads_per_cta) with a compiled kernel.
template <typename T, int D, typename Op>
cudaError_t dispatch_heads_per_cta(int gq, const Op& op) {
  constexpr int kVec = VecTraits<T>::kVec;
  switch (gq) {
    case 8:
      if constexpr (decode_fits(kVec, D, 8)) return op.template run<T, D, 8>();
      break;
    case 4:
      if constexpr (decode_fits(kVec, D, 4)) return op.template run<T, D, 4>();
      break;
    case 2:
      if constexpr (decode_fits(kVec, D, 2)) return op.template run<T, D, 2>();
      break;
    case 1:
      return op.template run<T, D, 1>();
    default:
      break;
  }
  return cudaErrorInvalidValue;  // heads_per_cta must divide the group and fit (decode_fits)
}

template <typename T, typename Op>
cudaError_t dispatch_decode(int head_size, int gq, const Op& op) {
  switch (head_size) {
#define HYBRID_DECODE_CASE(D) \
  case D:                     \
    return dispatch_heads_per_cta<T, D>(gq, op);
    HYBRID_DECODE_HEAD_SIZES(HYBRID_DECODE_CASE)
#undef HYBRID_DECODE_CASE
    default:
      return cudaErrorInvalidValue;
  }
}

template <bool APPEND>
struct LaunchDecodeOp {
  const DecodeParamsT<APPEND>& p;
  cudaStream_t stream;
  template <typename T, int D, int GQ>
  cudaError_t run() const {
    return launch_decode_config<T, D, GQ, APPEND>(p, stream);
  }
};

struct DecodeOccupancyOp {
  int* ctas_per_sm;
  template <typename T, int D, int GQ>
  cudaError_t run() const {
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        ctas_per_sm, paged_decode_split_kernel<T, D, GQ, kDecodeWarps, false>, kDecodeWarps * 32, 0);
  }
};

template <typename T>
cudaError_t launch_paged_decode_typed(const PagedDecodeParams& p, cudaStream_t stream) {
  return dispatch_decode<T>(p.head_size, p.heads_per_cta, LaunchDecodeOp<false>{p, stream});
}

template <typename T>
cudaError_t launch_paged_decode_append_typed(const PagedDecodeAppendParams& p, cudaStream_t stream) {
  return dispatch_decode<T>(p.head_size, p.heads_per_cta, LaunchDecodeOp<true>{p, stream});
}

template <typename T>
cudaError_t paged_decode_ctas_per_sm_typed(int head_size, int heads_per_cta, int* ctas_per_sm) {
  return dispatch_decode<T>(head_size, heads_per_cta, DecodeOccupancyOp{ctas_per_sm});
}

}  // namespace hybrid
