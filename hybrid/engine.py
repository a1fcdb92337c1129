"""HybridEngine: the generation side of stage 3.

    engine = HybridEngine(EngineConfig())
    engine.load_weights(actor)              # actor's current weights -> inference layout (copy_)
    seqs = engine.generate(input_ids, attention_mask, SamplingParams(max_new_tokens=256))
    engine.release()                         # KV pool (and optionally weights) back to training

generate() queues every prompt, then alternates prefill steps (admitting prompts as KV blocks
allow) and decode chunks (all running rows, several steps per host round trip, CUDA graphs),
retiring rows at EOS / length and admitting waiting prompts as room frees.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from hybrid import ops
from hybrid.config import EngineConfig, SamplingParams
from hybrid.kv_cache.manager import KVCacheManager
from hybrid.kv_cache.storage import KVCacheStorage, bytes_per_block, num_blocks_for_budget
from hybrid.models import build_model, get_model_class
from hybrid.models.base import set_fuse_kv_write, set_gemm_kv_write, set_prefill_impl
from hybrid.ops import linear as linear_ops
from hybrid.ops import pdl
from hybrid.runner import DecodeRow, ModelRunner, SamplingFlags
from hybrid.scheduler import PrefillBatch, Scheduler, Sequence
from hybrid.weights import load_weights, unwrap_model

log = logging.getLogger(__name__)


@dataclass
class GenerateStats:
    """What the last generate() did and how long it took (seconds unless named _ms)."""

    num_prompts: int = 0
    num_rows: int = 0
    num_generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    pool_alloc_s: float = 0.0
    capture_s: float = 0.0
    graphs_reused: bool = False
    """The decode graphs captured before the last release() served this generate (the pool came
    back at their address; EngineConfig.keep_graphs_across_release)."""
    autotune_s: float = 0.0
    """GEMM / fused-variant autotune and decode-kernel autoselect: once per process and shape, so
    nonzero only in a first (cold) generate."""
    num_prefill_steps: int = 0
    num_decode_steps: int = 0
    num_decode_chunks: int = 0
    num_preemptions: int = 0
    num_block_copies: int = 0
    num_blocks: int = 0
    decode_chunks: list[tuple[int, int, float]] = field(default_factory=list)
    """(rows, steps, seconds) per decode chunk."""

    @property
    def per_step_ms(self) -> float:
        return 1e3 * self.decode_s / max(1, self.num_decode_steps)


_cuda_pdl_on = False


def set_pdl_launch(on: bool, device: torch.device) -> None:
    """EngineConfig.pdl_launch: the Triton kernels' PDL launches (hybrid/ops/pdl.py) and the CUDA
    decode attention's (when the extension is loaded). Module-level, read while tracing a step."""
    global _cuda_pdl_on
    pdl.set_launch(on)
    # the CUDA switch only when it changes (turning it off must not load the extension)
    if (on or _cuda_pdl_on) and device.type == "cuda" and ops.cuda_ext_available():
        from hybrid.ops import cuda_backend

        ok = cuda_backend.set_decode_pdl_launch(on)
        _cuda_pdl_on = on and ok
        if on and not ok:
            log.info("PDL launch: the loaded CUDA extension has no switch; its attention launches as before")
    if on and not pdl.LAUNCH_AVAILABLE:
        log.info("PDL launch asked for, but this Triton has no launch_pdl option: Triton kernels launch as before")


def engine_supported(model: nn.Module, config: EngineConfig | None = None) -> tuple[bool, str]:
    """Whether the hybrid engine can generate from this model here, and why not."""
    hf, _ = unwrap_model(model)
    cfg = getattr(hf, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if get_model_class(model_type) is None:
        return False, f"model family {model_type!r} has no inference model (supported: opt, llama)"
    if model_type == "opt" and cfg.activation_function != "relu":
        return False, f"OPT with activation {cfg.activation_function!r}"
    if model_type == "llama":
        if getattr(cfg, "hidden_act", "silu") != "silu":
            return False, f"LLaMA with activation {cfg.hidden_act!r}"
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        if rope.get("rope_type", rope.get("type", "default")) in ("dynamic", "longrope"):
            return False, f"rope type {rope.get('rope_type')!r} changes with the sequence length"
    device = torch.device(config.device if config else ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = config.backend if config else ops.get_backend()
    if device.type == "cpu" and backend != "torch" and os.environ.get("TRITON_INTERPRET") != "1":
        return False, "CPU without TRITON_INTERPRET=1 and without the torch ops backend"
    if device.type == "cuda" and not torch.cuda.is_available():
        return False, "config asks for CUDA but no GPU is present"
    return True, "ok"


def _as_ids(x) -> tuple[int, ...]:
    if x is None:
        return ()
    return tuple(int(i) for i in x) if isinstance(x, (list, tuple)) else (int(x),)


class HybridEngine:
    def __init__(self, config: EngineConfig, *, pad_token_id: int | None = None,
                 eos_token_id: int | list[int] | None = None) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = getattr(torch, config.dtype)
        ops.set_backend(config.backend)
        set_prefill_impl(config.prefill_attention)
        set_fuse_kv_write(config.fuse_kv_write)
        env = os.environ.get("HYBRID_GEMM_KV_WRITE")
        set_gemm_kv_write(env == "1" if env in ("0", "1") else config.gemm_kv_write)
        set_pdl_launch(config.pdl_launch, self.device)
        linear_ops.set_enabled(config.autotune_linear)
        linear_ops.set_skinny_offered(config.skinny_gemm)
        linear_ops.set_lt_offered(config.cublaslt_gemm)
        self.model = None
        self.runner: ModelRunner | None = None
        self.storage: KVCacheStorage | None = None
        self.pad_token_id, self.eos_token_ids = pad_token_id, _as_ids(eos_token_id)
        self._ids_given = (pad_token_id is not None, eos_token_id is not None)
        self._arch = None
        self.stats = GenerateStats()
        self.last_load_s = 0.0
        self.last_release_s = 0.0
        self._autoselected = False

    # ---- weights -------------------------------------------------------------------------
    def load_weights(self, model: nn.Module) -> None:
        """Copy the actor's current weights into the inference layout (buffers reused)."""
        t0 = time.perf_counter()
        hf, _ = unwrap_model(model)
        ok, why = engine_supported(hf, self.config)
        if not ok:
            raise ValueError(f"hybrid engine cannot serve this model: {why}")
        arch = hf.config.to_json_string(use_diff=False)
        if self.model is None or arch != self._arch:
            self._build(hf)
            self._arch = arch
        info = load_weights(self.model, model)
        self._set_l2_prefetch()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last_load_s = time.perf_counter() - t0
        log.debug("load_weights (%s) in %.1f ms", info, 1e3 * self.last_load_s)

    def _build(self, hf: nn.Module) -> None:
        self.release()
        self.model = build_model(hf.config, self.dtype, self.device, self.config.max_model_len)
        gen = getattr(hf, "generation_config", None)
        if not self._ids_given[1]:
            self.eos_token_ids = _as_ids(getattr(gen, "eos_token_id", None)) or _as_ids(hf.config.eos_token_id)
        if not self._ids_given[0]:
            pad = getattr(gen, "pad_token_id", None)
            pad = pad if pad is not None else hf.config.pad_token_id
            self.pad_token_id = pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)
        self.runner = ModelRunner(self.model, self.config, self.eos_token_ids, int(self.pad_token_id))
        log.info("hybrid engine: %s inference copy (%d layers, %s, %.2f GB) on %s, ops backend %s",
                 hf.config.model_type, self.model.num_layers, self.config.dtype,
                 self.model.weight_bytes() / 1e9, self.device, self.config.backend)

    # ---- KV pool -------------------------------------------------------------------------
    def _ensure_pool(self, blocks_needed: int, longest_blocks: int) -> int:
        cache, m = self.config.cache, self.model
        block_bytes = bytes_per_block(m.num_layers, cache.block_size, m.num_kv_heads, m.head_dim, self.dtype)
        if cache.num_blocks is not None:
            want = cache.num_blocks
        else:
            if self.storage is not None and self.storage.num_blocks >= blocks_needed:
                return self.storage.num_blocks
            if self.storage is not None:  # too small: give it back before sizing a new one
                self.runner.set_storage(None)
                self.storage = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            budget = num_blocks_for_budget(cache, block_bytes, self.device, self._activation_reserve())
            want = min(budget, blocks_needed)
        if want < longest_blocks:
            raise RuntimeError(f"KV pool of {want} blocks cannot hold one row ({longest_blocks} blocks); "
                               "raise gpu_memory_utilization / num_blocks or lower max_model_len")
        if self.storage is None or self.storage.num_blocks != want:
            t0 = time.perf_counter()
            self.runner.set_storage(None)
            self.storage = None
            self.storage = KVCacheStorage(m.num_layers, want, cache.block_size, m.num_kv_heads,
                                          m.head_dim, self.dtype, self.device)
            self.runner.set_storage(self.storage)
            self.stats.pool_alloc_s = time.perf_counter() - t0
        return want

    def _activation_reserve(self) -> int:
        """Bytes kept out of the pool for prefill activations and decode logits / sampling."""
        widest = max(b.shape[0] for b in self.model.layers[0].buffers() if b is not None)
        elt = torch.empty((), dtype=self.dtype).element_size()
        prefill = self.config.max_num_batched_tokens * (6 * self.model.hidden + 3 * widest) * elt
        logits = self.runner.max_rows * self.model.vocab_size * 4 * 6
        return prefill + logits + (256 << 20)

    def release(self) -> None:
        """Free the KV pool (and the weight copy if config.release_weights) and empty the
        allocator cache, so training gets the memory back. The next generate() re-allocates (and,
        with config.keep_graphs_across_release, reuses the decode graphs if the new pool lands
        where the old one was)."""
        t0 = time.perf_counter()
        if self.runner is not None:
            self.runner.set_storage(None)
        self.storage = None
        if self.config.release_weights and self.model is not None:
            self.model, self.runner, self._arch = None, None, None
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.last_release_s = time.perf_counter() - t0

    # ---- generation ----------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 params: SamplingParams) -> torch.Tensor:
        """input_ids [B, Lp] left-padded -> [B * n, Lp + max_new_tokens]: the prompt rows as
        given, then the answers, pad_token_id after EOS (HF generate's layout, always full width).
        The result is an ordinary tensor (not an inference-mode one): it can enter autograd."""
        ids_cpu = input_ids.cpu()
        mask = torch.ones_like(ids_cpu, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
        prompts = [row[m].tolist() for row, m in zip(ids_cpu, mask)]
        answers = self.generate_token_ids(prompts, params)
        b, lp = ids_cpu.shape
        out = torch.full((b * params.n, lp + params.max_new_tokens), int(self.pad_token_id), dtype=torch.int64)
        out[:, :lp] = ids_cpu.repeat_interleave(params.n, dim=0)
        for r, ans in enumerate(answers):
            out[r, lp:lp + len(ans)] = torch.tensor(ans, dtype=torch.int64)
        return out.to(input_ids.device)

    @torch.inference_mode()
    def generate_token_ids(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Answers (new tokens only, EOS included when hit) per prompt, n per prompt in order."""
        if self.model is None:
            raise RuntimeError("call load_weights(model) before generate")
        if not 1 <= params.n <= self.config.max_num_seqs:
            raise ValueError(f"n={params.n} answers per prompt must be in 1..max_num_seqs={self.config.max_num_seqs}")
        t_start = time.perf_counter()
        cfg, stats = self.config, GenerateStats(num_prompts=len(prompts), num_rows=len(prompts) * params.n)
        self.stats = stats
        if params.seed is not None:
            torch.manual_seed(params.seed)
        bs = cfg.cache.block_size
        lens = [min(len(p) + params.max_new_tokens, cfg.max_model_len) for p in prompts]
        need = sum(params.n * -(-n // bs) for n in lens)
        t_tune = time.perf_counter()
        self._autotune_linears()  # before the pool takes the free memory and before any capture
        stats.autotune_s = time.perf_counter() - t_tune
        reused0 = self.runner.graphs_reused
        stats.num_blocks = self._ensure_pool(need, max(-(-n // bs) for n in lens))
        stats.graphs_reused = self.runner.graphs_reused > reused0
        manager = KVCacheManager(stats.num_blocks, bs, cfg.cache.watermark)
        sched = Scheduler(manager, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_model_len,
                          cfg.decode_steps_per_sync)
        eos = () if params.ignore_eos else self.eos_token_ids
        for i, p in enumerate(prompts):
            sched.add_request(p, params.max_new_tokens, request_id=i, n=params.n,
                              min_new_tokens=params.min_new_tokens, eos_token_ids=eos, params=params)
        greedy = params.temperature == 0
        flags = SamplingFlags(all_greedy=greedy,
                              filter_top_k_top_p=not greedy and (params.top_k > 0 or params.top_p < 1.0),
                              mask_eos=params.min_new_tokens > 0 and bool(eos),
                              suppress=tuple(sorted(set(params.suppress_token_ids))))
        t_tune = time.perf_counter()
        self._autoselect_kernels(min(len(prompts) * params.n, cfg.max_num_seqs),
                                 sum(len(p) for p in prompts) // len(prompts) + params.max_new_tokens // 2)
        stats.autotune_s += time.perf_counter() - t_tune
        capture0 = self.runner.capture_s
        while sched.has_unfinished():
            batch = sched.schedule()
            t0 = time.perf_counter()
            if isinstance(batch, PrefillBatch):
                logits = self.runner.prefill([s.token_ids for s in batch.seqs],
                                             [manager.block_tables[s.seq_id] for s in batch.seqs])
                rows = [self._row(sched, s, manager) for s in batch.seqs for _ in range(s.n)]
                tokens = self.runner.sample_rows(logits, [s.n for s in batch.seqs], rows, flags)
                split, k = [], 0
                for s in batch.seqs:
                    split.append(tokens[k:k + s.n])
                    k += s.n
                sched.process_prefill(batch, split)
                stats.prefill_s += time.perf_counter() - t0
                stats.num_prefill_steps += 1
            else:
                self.storage.copy_blocks(batch.block_copies)
                stats.num_block_copies += len(batch.block_copies)
                rows = [self._row(sched, s, manager) for s in batch.seqs]
                tokens = self.runner.decode(rows, batch.num_steps, flags)
                sched.process_decode(batch, tokens)
                dt = time.perf_counter() - t0
                stats.decode_s += dt
                stats.num_decode_steps += batch.num_steps
                stats.num_decode_chunks += 1
                stats.decode_chunks.append((len(rows), batch.num_steps, dt))
        stats.capture_s = self.runner.capture_s - capture0
        stats.num_preemptions = sched.num_preemptions
        done = sorted(sched.finished, key=lambda s: (s.request_id, s.sample_index))
        stats.num_generated_tokens = sum(len(s.output_token_ids) for s in done)
        stats.total_s = time.perf_counter() - t_start
        return [s.output_token_ids for s in done]

    def _autoselect_kernels(self, rows: int, context: int) -> None:
        """Once per engine, "auto" backend on CUDA: time Triton vs the CUDA extension for the
        paged-attention / cache-write ops at this rollout's context and every decode batch bucket
        (each bucket's graph keeps its own pick), before any graph capture."""
        if self._autoselected or self.config.backend != "auto" or self.device.type != "cuda":
            return
        self._autoselected = True
        try:
            from hybrid.ops.autoselect import pick_decode_backends

            m = self.model
            # every bucket a graph may be captured for, not just this rollout's: it runs once per
            # engine, and a later, larger rollout must not inherit a smaller batch's pick (measured
            # up to 24 rows only, the 32-row step ran 2.14 ms on Triton against 1.94 on CUDA)
            pick_decode_backends(m.num_heads, m.num_kv_heads, m.head_dim, self.config.cache.block_size,
                                 self.runner.buckets, context, self.dtype, self.device)
        except Exception as err:  # noqa: BLE001 - a failed measurement keeps the defaults
            log.warning("kernel auto-selection failed (%s); keeping the default backends", err)

    def _set_l2_prefetch(self) -> None:
        """config.l2_prefetch_mb > 0 on CUDA: next-weight L2 prefetch before each projection
        (hybrid/ops/l2_prefetch.py); read while graphs are captured, so set on every load."""
        from hybrid.ops import l2_prefetch

        mb = self.config.l2_prefetch_mb
        if mb <= 0 or self.device.type != "cuda" or not hasattr(self.model, "prefetch_order"):
            l2_prefetch.set_plan(None)
            return
        try:
            l2_prefetch.set_plan(self.model.prefetch_order(), int(mb * 2**20), self.config.l2_prefetch_mode)
        except Exception as err:  # noqa: BLE001 - a hint: decoding works without it
            log.warning("l2 prefetch unavailable (%s); decoding without it", err)
            l2_prefetch.set_plan(None)

    def _autotune_linears(self) -> None:
        """CUDA, config.autotune_linear: pick each projection's GEMM per decode bucket (measured once
        per process and shape; later calls only refill the table)."""
        if not self.config.autotune_linear or self.device.type != "cuda":
            return
        linear_ops.set_enabled(True)
        t0 = time.perf_counter()
        try:
            shapes = self.model.linear_shapes()
            linear_ops.autotune_linears(shapes, self.runner.buckets, self.device, self.dtype)
            from hybrid.ops import linear_norm

            norm_shapes = getattr(self.model, "linear_norm_shapes", lambda: [])()
            fused = 0
            if norm_shapes and self.config.fuse_linear_norm:  # after linear's: "unfused" runs its choices
                try:
                    linear_norm.autotune_linear_norms(norm_shapes, self.runner.buckets, self.device, self.dtype)
                    fused = len(norm_shapes)
                except Exception as err:  # noqa: BLE001 - the GEMM choices above still hold
                    linear_norm.clear_choices()
                    log.warning("linear + norm autotune failed (%s); GEMM and norm stay separate", err)
            else:
                linear_norm.clear_choices()
            from hybrid.ops import mlp as mlp_ops

            mlp_shapes = getattr(self.model, "mlp_shapes", lambda: [])()
            mlps = 0
            if mlp_shapes and self.config.fuse_mlp:  # after both: "unfused" runs their choices
                try:
                    mlp_ops.autotune_mlps(mlp_shapes, self.runner.buckets, self.device, self.dtype)
                    mlps = len(mlp_shapes)
                except Exception as err:  # noqa: BLE001 - the choices above still hold
                    mlp_ops.clear_choices()
                    log.warning("persistent MLP autotune failed (%s); fc1 and fc2 stay separate", err)
            else:
                mlp_ops.clear_choices()
            prepare = getattr(self.model, "prepare_decode_layout", None)
            if prepare is not None and prepare():  # before the pool sizes itself on what is left
                log.info("MLP blocks read fc2 transposed (an accum variant was picked): one more fc2 copy per layer")
            dt = time.perf_counter() - t0
            log.log(logging.INFO if dt > 0.05 else logging.DEBUG,
                    "linear autotune: %d shapes (%d also as fused linear + norm, %d MLP blocks) x %d buckets "
                    "in %.2f s (cached per process)", len(shapes), fused, mlps, len(self.runner.buckets), dt)
        except Exception as err:  # noqa: BLE001 - a failed measurement keeps cuBLAS everywhere
            log.warning("linear autotune failed (%s); keeping cuBLAS for every projection", err)

    def _row(self, sched: Scheduler, seq: Sequence, manager: KVCacheManager) -> DecodeRow:
        p: SamplingParams = seq.params
        return DecodeRow(
            last_token=seq.last_token_id, position=seq.num_tokens - 1,
            remaining=sched.remaining_steps(seq), num_generated=len(seq.output_token_ids),
            min_new_tokens=seq.min_new_tokens, temperature=p.temperature, top_k=p.top_k,
            top_p=p.top_p, stop_on_eos=bool(seq.eos_token_ids),
            block_table=manager.block_tables.get(seq.seq_id, []),
        )

    # ---- scoring -------------------------------------------------------------------------
    @torch.inference_mode()
    def prompt_logprobs(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Teacher-forced fp32 logprobs of tokens 1.. of each sequence (one prefill)."""
        bs = self.config.cache.block_size
        blocks = [-(-len(s) // bs) for s in sequences]
        num_blocks = self._ensure_pool(sum(blocks), max(blocks))
        manager = KVCacheManager(num_blocks, bs, 0.0)
        tables = [manager.allocate(i, len(s)) for i, s in enumerate(sequences)]
        return self.runner.prompt_logprobs(sequences, tables)

    @torch.inference_mode()
    def teacher_forced_logprobs(self, prompts: list[list[int]], answers: list[list[int]]) -> list[torch.Tensor]:
        """fp32 logprob of each answer token given the prompt and the answer before it, computed
        the way generation computes it: the prompt prefilled, the answer fed one paged decode step
        at a time. (PPO's old / reference logprobs come from the training model; this checks the
        engine against it.)"""
        from hybrid.sampler import compute_logprobs

        bs = self.config.cache.block_size
        blocks = [-(-(len(p) + len(a)) // bs) for p, a in zip(prompts, answers)]
        num_blocks = self._ensure_pool(sum(blocks), max(blocks))
        manager = KVCacheManager(num_blocks, bs, 0.0)
        tables = [manager.allocate(i, len(p) + len(a)) for i, (p, a) in enumerate(zip(prompts, answers))]
        logits = self.runner.prefill(prompts, tables)  # [N, V]
        first = torch.tensor([a[0] for a in answers], device=self.device)
        out = [[lp] for lp in compute_logprobs(logits, first).unbind(0)]
        for t in range(1, max(len(a) for a in answers)):
            live = [i for i, a in enumerate(answers) if len(a) > t]
            logits = self.runner.decode_logits([answers[i][t - 1] for i in live],
                                               [len(prompts[i]) + t - 1 for i in live],
                                               [tables[i] for i in live])
            target = torch.tensor([answers[i][t] for i in live], device=self.device)
            for i, lp in zip(live, compute_logprobs(logits, target).unbind(0)):
                out[i].append(lp)
        return [torch.stack(lps) for lps in out]
