"""Configuration of the hybrid inference engine (generation side of stage 3).

Nothing in hybrid/ imports rlhf/: the engine is fed a plain HuggingFace model.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CacheConfig:
    block_size: int = 16
    """Tokens per KV-cache block."""
    gpu_memory_utilization: float = 0.9
    """Fraction of the device's *total* memory the process may use once the pool is allocated
    (weights, activations and everything else already held count against it); the pool takes what
    is left of that share. Ignored when num_blocks is set."""
    num_blocks: int | None = None
    """Fixed pool size in blocks (tests, CPU); overrides gpu_memory_utilization."""
    watermark: float = 0.01
    """Share of blocks kept free when admitting new prompts, so running rows can keep decoding."""


@dataclass
class EngineConfig:
    cache: CacheConfig = field(default_factory=CacheConfig)
    max_num_seqs: int = 256
    """Rows decoded together at most (continuous-batching width)."""
    max_num_batched_tokens: int = 16384
    """Prompt tokens prefilled in one step at most."""
    max_model_len: int = 2048
    """Prompt + answer tokens per row at most."""
    dtype: str = "bfloat16"
    """Weight / activation dtype of the inference copy (float32 for CPU tests)."""
    backend: str = "auto"
    """Kernel backend: auto | triton | cuda | torch (torch = the pure-PyTorch reference ops)."""
    enable_cuda_graph: bool = True
    """Capture decode steps as CUDA graphs for the batch buckets below (GPU only)."""
    cuda_graph_batch_sizes: list[int] = field(
        default_factory=lambda: [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256]
    )
    decode_steps_per_sync: int = 16
    """Decode steps run back to back before the host reads the sampled tokens (and learns which
    rows hit EOS). Without EOS (ignore_eos) the host waits for the longest row instead."""
    prefill_attention: str = "ops"
    """Prefill attention: "ops" (hybrid.ops.prefill_attention, Triton varlen) | "sdpa" (batched per run
    of equal-length prompts) | "flash" (torch.nn.attention.varlen, CUDA). All three measured the same
    prefill time on an H200: the prefill is GEMM-bound."""
    fuse_kv_write: bool = False
    """Decode steps write each layer's new key/value inside the paged-attention launch
    (ops.paged_decode_attention_append) instead of a separate write_kv_cache launch per layer.
    Off until a GPU run measures it (bench/engine_decode.py --fuse-kv-write); prefill unchanged."""
    autotune_linear: bool = True
    """Time cuBLAS / cuBLASLt / split-K GEMMs per projection shape and decode batch bucket on the
    GPU once per process (before graph capture) and use the fastest (hybrid/ops/linear.py);
    False: every projection is F.linear."""
    fuse_linear_norm: bool = True
    """With autotune_linear: also time out_proj / fc2 (o_proj / down_proj) as a split-K GEMM whose
    reduce does the bias, residual add and the next LayerNorm / RMSNorm (hybrid/ops/linear_norm.py)
    against GEMM + separate norm launch, per decode bucket, and use the faster."""
    fuse_mlp: bool = True
    """With autotune_linear (CUDA): also time OPT's fc1 -> ReLU -> fc2 as one persistent launch
    (csrc/decode_mlp.cu, then the split-K reduce + add + norm; hybrid/ops/mlp.py) against the two
    GEMMs, per decode bucket, each between its decoder-layer neighbours, and use the faster. H200,
    OPT-1.3B: the dataflow schedule (flow_pdl) is chosen for 4-16 rows (whole step at 16 rows
    1.48 ms vs 1.54 with two GEMMs at 1b5a9e7; 1.41 ms at 4d1c883), cuBLAS above. Its CTAs wait for each other (all must be
    resident), so it must not share the GPU with kernels that hold SMs indefinitely on another
    stream (e.g. NCCL collectives running during generation); turn it off for such setups."""
    pdl_launch: bool = True
    """CUDA sm_90+: launch the decode step's Triton kernels and the CUDA decode attention with
    programmatic dependent launch (hybrid/ops/pdl.py), so each is resident while the kernel before it
    drains and waits for it on the device instead of being launched after it ends. Measured on an
    H200 together with skinny_gemm (bench/engine_decode.py --pdl / --skinny-gemm): 1-2.5% faster
    steps at batch 16, equal at 64-128; alone it measured equal."""
    skinny_gemm: bool = True
    """CUDA: offer csrc/skinny_gemm.cu (plain and PDL-launched, M <= 64) to the linear autotune
    (HYBRID_SKINNY_GEMM=0 / 1 in the environment overrides this)."""
    gemm_kv_write: bool = False
    """OPT decode steps: where the qkv projection runs on the CUDA skinny GEMM, its epilogue also stores
    k / v in the paged cache (hybrid.ops.linear.linear_kv), so no write_kv_cache launch follows.
    HYBRID_GEMM_KV_WRITE=0 / 1 in the environment overrides this. Off: on an H200 (OPT-1.3B batch
    16, where the skinny GEMM runs qkv) the step measured 1.507 -> 1.502 ms, within noise: the
    write_kv launch it removes was already hidden by the PDL chain."""
    attn_prefetch: bool = True
    """CUDA with pdl_launch: inside the decode step, the CUDA decode attention loads each warp's first
    KV tile before waiting for the kernel ahead of it (csrc/paged_attention.cuh), so that DRAM round
    trip overlaps the previous kernel's tail. HYBRID_ATTN_PREFETCH=0 / 1 in the environment overrides."""
    cublaslt_gemm: bool = False
    """CUDA: offer cuBLASLt's other heuristic candidates for each decode GEMM shape and bucket to the
    linear autotune (hybrid/ops/cublaslt.py; HYBRID_LT_GEMM=0 / 1 in the environment overrides this).
    Off: on an H200 the autotune picked them for 0.4-4 us wins per GEMM (OPT-1.3B lm_head 55.4 ->
    51.7 us at 16 rows), yet the engine's step measured the same with and without (OPT-1.3B batch 16
    1.500 vs 1.497 ms, 64 2.504 vs 2.504) while the autotune took 2 s longer."""
    l2_prefetch_mb: float = 0.0
    """> 0 (CUDA): before each projection's GEMM, ask the L2 to fetch up to this many MB of the
    next projection's weight (hybrid/ops/l2_prefetch.py), so DRAM keeps streaming across kernel
    boundaries. 0 = off (the default until bench/engine_decode.py --l2-prefetch measures a win)."""
    l2_prefetch_mode: str = "side-bulk"
    """side-bulk | side-line | inline-bulk | inline-line: the prefetch kernel on a forked side
    stream or in line before the GEMM; bulk (cp.async.bulk.prefetch.L2) or per-line prefetch."""
    release_weights: bool = False
    """release() also frees the inference weight copy (saves memory; load_weights re-copies)."""
    keep_graphs_across_release: bool = True
    """release() keeps the captured decode CUDA graphs (and their private memory pool) instead of
    dropping them, and the next pool reuses them if it lands at the address and shape they were
    captured with (ModelRunner.set_storage checks; a different pool drops them and they are
    recaptured, as with this off). Measured (bench.keep_graphs, OPT-1.3B, 256 + 256 tokens, H200,
    eba1488): the pool came back in place every time, also with 4 GB allocated and freed in
    between; the rollout after a release took 0.370 s instead of 0.395-0.406 at 16 rows and 0.699
    instead of 0.726-0.742 at 64 (no recapture: 26-43 ms), for 24-28 MB more held while training
    runs."""
    device: str = "cuda"


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    """EOS is masked out until this many tokens were generated."""
    ignore_eos: bool = False
    """Generate exactly max_new_tokens (benchmarks force full-length answers)."""
    temperature: float = 0.0
    """0 means greedy."""
    top_k: int = 0
    """0 disables top-k."""
    top_p: float = 1.0
    seed: int | None = None
    """Seeds torch's global generator before sampling (as HF generate users do with manual_seed)."""
    n: int = 1
    """Answers sampled per prompt; they share the prompt's KV blocks (rows grouped by prompt)."""
    suppress_token_ids: tuple[int, ...] = ()
    """Tokens never sampled (HF's suppress_tokens), e.g. the pad id when it differs from EOS."""
