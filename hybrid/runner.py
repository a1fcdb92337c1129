"""Runs the inference model on the paged KV cache: eager prefill steps and decode chunks.

Decode state lives in static device buffers (input ids, positions, block tables, per-row sampling
parameters and counters), filled in place from one pinned host buffer at the start of a chunk.
One decode step reads the buffers, runs the model, samples in-graph, and writes its results back
into the same buffers (next input id, position + 1, remaining steps - 1, EOS seen), so `num_steps`
steps replay back to back with no host involvement; the step is captured as a CUDA graph per batch
bucket (padding rows have remaining = 0: slot -1, seq_len 0). The host learns the sampled tokens
once per chunk, with one device->host copy of the [num_steps, batch] token block.
"""
from __future__ import annotations

import bisect
import itertools
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from hybrid import ops
from hybrid.config import EngineConfig
from hybrid.kv_cache.storage import KVCacheStorage
from hybrid.models.base import AttentionMetadata, InferenceModel
from hybrid.sampler import compute_logprobs, sample

log = logging.getLogger(__name__)

# rows of the packed int64 host->device metadata buffer
_IDS, _POS, _REM, _GEN, _MIN_NEW, _TOP_K, _STOP, _NUM_INT = range(8)


@dataclass
class SamplingFlags:
    """Host-side promises about every row of a generate call (they pick the graph variant)."""

    all_greedy: bool
    filter_top_k_top_p: bool
    mask_eos: bool
    """Some row has min_new_tokens > 0: EOS logits are masked while a row is below it."""
    suppress: tuple[int, ...] = ()
    """Token ids whose logits are -inf for every row."""

    def key(self) -> tuple:
        return (self.all_greedy, self.filter_top_k_top_p, self.mask_eos, self.suppress)


@dataclass
class DecodeRow:
    last_token: int
    position: int
    """Position of last_token (its key/value is written this step)."""
    remaining: int
    """Steps the row may still run (answer / context limits)."""
    num_generated: int
    min_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    stop_on_eos: bool
    block_table: list[int]


def pool_key(storage: KVCacheStorage) -> tuple:
    """What a captured decode graph holds of the KV pool: its address, shape, dtype and device."""
    kv = storage.kv
    return (kv.data_ptr(), tuple(kv.shape), kv.dtype, str(kv.device))


class ModelRunner:
    def __init__(self, model: InferenceModel, config: EngineConfig, eos_token_ids: tuple[int, ...],
                 pad_token_id: int) -> None:
        self.model, self.cfg = model, config
        self.device = model.device
        self.block_size = config.cache.block_size
        self.max_blocks = -(-config.max_model_len // self.block_size)
        self.eos_token_ids, self.pad_token_id = eos_token_ids, pad_token_id
        sizes = sorted(s for s in config.cuda_graph_batch_sizes if s <= config.max_num_seqs)
        if not sizes or sizes[-1] < config.max_num_seqs:
            sizes.append(config.max_num_seqs)
        self.buckets = sizes
        self.max_rows = sizes[-1]
        self.storage: KVCacheStorage | None = None
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.graph_pool = None
        self._graphs_pool_key: tuple | None = None  # pool_key() of the storage the graphs were captured on
        self.capture_s = 0.0
        self.graphs_reused = 0  # set_storage calls that kept the graphs (keep_graphs_across_release)
        self._suppress_idx: dict[tuple[int, ...], torch.Tensor] = {}
        self._alloc_buffers()

    # ---- buffers -------------------------------------------------------------------------
    def _alloc_buffers(self) -> None:
        b, dev, pin = self.max_rows, self.device, self.device.type == "cuda"
        self.ints = torch.zeros(_NUM_INT, b, dtype=torch.int64, device=dev)  # [F, B]
        self.floats = torch.zeros(2, b, dtype=torch.float32, device=dev)  # temperature, top_p
        self.block_tables = torch.zeros(b, self.max_blocks, dtype=torch.int32, device=dev)  # [B, M]
        self.out_tokens = torch.zeros(self.cfg.max_model_len, b, dtype=torch.int64, device=dev)  # [K, B]
        self.step_idx = torch.zeros(1, dtype=torch.int64, device=dev)
        self.eos_ids = torch.tensor(self.eos_token_ids or [-1], dtype=torch.int64, device=dev)
        self.ints_host = torch.zeros(_NUM_INT, b, dtype=torch.int64, pin_memory=pin)
        self.floats_host = torch.zeros(2, b, dtype=torch.float32, pin_memory=pin)
        self.bt_host = torch.zeros(b, self.max_blocks, dtype=torch.int32, pin_memory=pin)
        self.out_host = torch.zeros(self.cfg.max_model_len, b, dtype=torch.int64, pin_memory=pin)
        self._ints_np, self._floats_np, self._bt_np = (
            self.ints_host.numpy(), self.floats_host.numpy(), self.bt_host.numpy())

    def set_storage(self, storage: KVCacheStorage | None) -> None:
        """A new pool (or none). The captured graphs hold the pool's addresses: they are dropped,
        except with EngineConfig.keep_graphs_across_release, where a pool taken away (None) leaves
        them idle and a pool that comes back at the address and shape they were captured with
        (pool_key) gets them again. Everything else a graph holds (weights, the runner's buffers)
        lives as long as this runner."""
        keep = self.cfg.keep_graphs_across_release
        self.storage = storage
        if storage is None:
            if not keep:
                self.drop_graphs()
            return
        if keep and self.graphs and pool_key(storage) == self._graphs_pool_key:
            self.graphs_reused += 1
            log.info("decode CUDA graphs kept: the KV pool came back at the address they were captured on")
            return
        if self.graphs and keep:
            log.info("decode CUDA graphs dropped: the KV pool came back at another address or shape")
        self.drop_graphs()

    def drop_graphs(self) -> None:
        self.graphs.clear()
        self.graph_pool = None
        self._graphs_pool_key = None

    def use_graphs(self) -> bool:
        # the torch reference write_kv_cache indexes with a boolean mask (a host sync): not capturable
        return (self.cfg.enable_cuda_graph and self.device.type == "cuda"
                and ops.resolve_backend("write_kv_cache", self.device) != "torch")

    # ---- prefill -------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, token_ids: list[list[int]], block_tables: list[list[int]]) -> torch.Tensor:
        """Runs every token of each sequence, writing its keys/values; returns the fp32 logits of
        each sequence's last token [num_seqs, vocab]."""
        hidden, cu = self._prefill_hidden(token_ids, block_tables)
        return self.model.compute_logits(hidden[cu[1:] - 1]).float()  # [N, V]

    def _prefill_hidden(self, token_ids, block_tables):
        # host metadata in numpy (a 64 x 256-token prefill: ~0.5 ms, against ~2 ms through torch
        # CPU ops), the GPU idles until it is on the device
        dev, n, bs = self.device, len(token_ids), self.block_size
        lens = np.fromiter(map(len, token_ids), np.int64, n)
        total = int(lens.sum())
        flat = np.fromiter(itertools.chain.from_iterable(token_ids), np.int64, total)
        cu = np.zeros(n + 1, np.int64)
        np.cumsum(lens, out=cu[1:])
        seq_idx = np.repeat(np.arange(n), lens)  # [T]
        positions = np.arange(total) - cu[seq_idx]  # [T]
        bt = np.zeros((n, max(map(len, block_tables))), np.int64)
        for i, table in enumerate(block_tables):
            bt[i, :len(table)] = table
        slots = bt[seq_idx, positions // bs] * bs + positions % bs
        ids, positions, slots, cu_dev = (torch.from_numpy(x).to(dev, non_blocking=True)
                                         for x in (flat, positions, slots, cu))
        meta = AttentionMetadata(True, slots, cu_seqlens=cu_dev.to(torch.int32), max_seqlen=int(lens.max()),
                                 prefill_lens=lens.tolist())
        hidden = self.model(ids, positions, self.storage.kv_caches, meta)  # [T, H]
        return hidden, cu_dev

    @torch.inference_mode()
    def prompt_logprobs(self, token_ids: list[list[int]], block_tables: list[list[int]]) -> list[torch.Tensor]:
        """Teacher-forced fp32 logprob of tokens 1.. of each sequence, from one prefill."""
        hidden, cu = self._prefill_hidden(token_ids, block_tables)
        logits = self.model.compute_logits(hidden).float()  # [T, V]
        out, bounds = [], cu.tolist()
        for seq, lo, hi in zip(token_ids, bounds[:-1], bounds[1:]):
            target = torch.tensor(seq[1:], device=self.device)
            out.append(compute_logprobs(logits[lo:hi - 1], target))
        return out

    @torch.inference_mode()
    def decode_logits(self, token_ids: list[int], positions: list[int],
                      block_tables: list[list[int]]) -> torch.Tensor:
        """Eager decode step with given input tokens (teacher forcing): writes their keys/values
        and returns fp32 logits [rows, vocab]."""
        dev, bs = self.device, self.block_size
        bt = torch.zeros(len(token_ids), self.max_blocks, dtype=torch.int32)
        for i, table in enumerate(block_tables):
            bt[i, :len(table)] = torch.tensor(table, dtype=torch.int32)
        slots = [t[p // bs] * bs + p % bs for t, p in zip(block_tables, positions)]
        meta = AttentionMetadata(
            False, torch.tensor(slots, dtype=torch.int64, device=dev), block_tables=bt.to(dev),
            seq_lens=torch.tensor([p + 1 for p in positions], dtype=torch.int32, device=dev))
        ids = torch.tensor(token_ids, dtype=torch.int64, device=dev)
        pos = torch.tensor(positions, dtype=torch.int64, device=dev)
        hidden = self.model(ids, pos, self.storage.kv_caches, meta)  # [b, H]
        return self.model.compute_logits(hidden).float()  # [b, V]

    @torch.inference_mode()
    def sample_rows(self, logits: torch.Tensor, rows_per_seq: list[int], rows: list[DecodeRow],
                    flags: SamplingFlags) -> list[int]:
        """First answer tokens after a prefill: logits [N, V] repeated n times per sequence."""
        counts = torch.tensor(rows_per_seq, device=self.device)
        logits = torch.repeat_interleave(logits, counts, dim=0, output_size=len(rows))  # [R, V]
        if flags.mask_eos and self.eos_token_ids:
            ban = torch.tensor([r.num_generated < r.min_new_tokens for r in rows], device=self.device)
            logits[:, list(self.eos_token_ids)] = logits[:, list(self.eos_token_ids)].masked_fill(
                ban[:, None], float("-inf"))
        temp = torch.tensor([r.temperature for r in rows], dtype=torch.float32, device=self.device)
        top_k = torch.tensor([r.top_k for r in rows], dtype=torch.int32, device=self.device)
        top_p = torch.tensor([r.top_p for r in rows], dtype=torch.float32, device=self.device)
        self._suppress(logits, flags)
        tokens = sample(logits, temp, top_k, top_p, all_greedy=flags.all_greedy,
                        filter_top_k_top_p=flags.filter_top_k_top_p)
        return tokens.tolist()  # host sync once per prefill, outside the decode loop

    # ---- decode --------------------------------------------------------------------------
    def _decode_step(self, b: int, flags: SamplingFlags) -> None:
        """One decode step over the first b rows of the static buffers, entirely on the device.

        Outside the model the step is ops.decode_prepare (slots, seq_lens), the optional
        ops.ban_eos / suppress, the sampler (ops.greedy_partials when all greedy: chunked argmax whose
        reduction happens in decode_advance) and ops.decode_advance (tokens -> out_tokens and the
        row buffers): three or four launches where the eager torch chain
        took about 25 small kernels of ~2-4 us each, graph-replayed or not
        (tests/hybrid/test_ops_decode_bookkeeping.py guards the count)."""
        ints = self.ints[:, :b]
        ids, pos, rem, gen = ints[_IDS], ints[_POS], ints[_REM], ints[_GEN]
        bt = self.block_tables[:b]  # [b, M]
        slots, seq_lens = ops.decode_prepare(pos, rem, bt, self.block_size)  # [b] int64, [b] int32
        meta = AttentionMetadata(False, slots, block_tables=bt, seq_lens=seq_lens)
        prefetch = self._attn_prefetch()
        if prefetch:  # the step's structure is what makes the early KV loads safe (see the kernel)
            from hybrid.ops import cuda_backend

            cuda_backend.set_decode_prefetch(True)
        try:
            hidden = self.model(ids, pos, self.storage.kv_caches, meta)  # [b, H]
        finally:
            if prefetch:
                cuda_backend.set_decode_prefetch(False)
        # model-dtype logits: the sampler upcasts where it needs to, greedy argmax does not
        # (saves writing and re-reading a [b, V] fp32 copy every step)
        logits = self.model.compute_logits(hidden)  # [b, V]
        if flags.mask_eos and self.eos_token_ids:
            ops.ban_eos(logits, gen, ints[_MIN_NEW], self.eos_ids)
        self._suppress(logits, flags)
        if flags.all_greedy:
            # argmax split over vocabulary chunks; decode_advance reduces the [b, S] keys
            nxt = ops.greedy_partials(logits)
        else:
            nxt = sample(logits, self.floats[0, :b], ints[_TOP_K].to(torch.int32), self.floats[1, :b],
                         filter_top_k_top_p=flags.filter_top_k_top_p)  # [b]
        # pad for inactive rows, out_tokens[step_idx], EOS stop, rem/ids/pos/gen, step_idx + 1
        ops.decode_advance(nxt, ids, pos, rem, gen, ints[_STOP], self.out_tokens[:, :b],
                           self.step_idx, self.eos_ids, self.pad_token_id)

    def _attn_prefetch(self) -> bool:
        """EngineConfig.attn_prefetch (HYBRID_ATTN_PREFETCH=0 / 1 overrides), on CUDA with the
        extension loaded; the kernel also needs the PDL launch to do anything."""
        env = os.environ.get("HYBRID_ATTN_PREFETCH")
        on = env == "1" if env in ("0", "1") else self.cfg.attn_prefetch
        if not on or self.device.type != "cuda":
            return False
        from hybrid.ops import cuda_backend

        return cuda_backend.loaded()  # never builds the extension just for this switch

    def _suppress(self, logits: torch.Tensor, flags: SamplingFlags) -> None:
        if flags.suppress:
            # device index tensor made once per id set, outside any graph capture
            idx = self._suppress_idx.get(flags.suppress)
            if idx is None:
                idx = torch.tensor(flags.suppress, dtype=torch.int64, device=self.device)
                self._suppress_idx[flags.suppress] = idx
            logits.index_fill_(1, idx, float("-inf"))

    def _bucket(self, b: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, b)]

    def _graph(self, b: int, flags: SamplingFlags) -> torch.cuda.CUDAGraph:
        key = (b, *flags.key())
        graph = self.graphs.get(key)
        if graph is not None:
            # a kept graph replays only on the pool it was captured on (set_storage drops it otherwise)
            assert self.storage is not None and pool_key(self.storage) == self._graphs_pool_key
            return graph
        import time

        t0 = time.perf_counter()
        if flags.suppress and flags.suppress not in self._suppress_idx:
            self._suppress_idx[flags.suppress] = torch.tensor(flags.suppress, dtype=torch.int64, device=self.device)
        prepare = getattr(self.model, "prepare_decode_layout", None)
        if prepare is not None:  # a variant forced after the autotune may need another weight layout
            prepare()
        self.ints[_REM].zero_()  # capture with every row inactive: warm-up writes nothing
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compiles Triton kernels, settles allocator
                self._decode_step(b, flags)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self.graph_pool is None:
            self.graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            self._decode_step(b, flags)
        torch.cuda.synchronize(self.device)
        self.graphs[key] = graph
        self._graphs_pool_key = pool_key(self.storage)
        self.capture_s += time.perf_counter() - t0
        log.info("captured decode CUDA graph for batch %d in %.0f ms", b, 1e3 * (time.perf_counter() - t0))
        return graph

    @torch.inference_mode()
    def decode(self, rows: list[DecodeRow], num_steps: int, flags: SamplingFlags) -> list[list[int]]:
        """Runs num_steps decode steps for the rows; returns each row's num_steps sampled tokens
        (pad after the row's end). One host sync, at the end."""
        n = len(rows)
        graphed = self.use_graphs() and n <= self.max_rows
        b = self._bucket(n) if graphed else n
        graph = self._graph(b, flags) if graphed else None  # captured before the buffers are set
        self._fill(rows, b)
        for _ in range(num_steps):
            if graph is not None:
                graph.replay()
            else:
                self._decode_step(b, flags)
        # contiguous on both sides: a strided non_blocking device->host copy may stage through a
        # temporary that is read before the transfer lands
        src = self.out_tokens[:num_steps, :b].contiguous()  # [K, b]
        out = self.out_host.view(-1)[:num_steps * b].view(num_steps, b)
        out.copy_(src, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return out[:, :n].t().tolist()

    def _fill(self, rows: list[DecodeRow], b: int) -> None:
        """Host state of the chunk -> static device buffers (rows n..b are inactive padding)."""
        n, ints, floats, bt = len(rows), self._ints_np, self._floats_np, self._bt_np
        if n > self.max_rows:
            raise ValueError(f"{n} rows exceed the runner's {self.max_rows}")
        ints[:, :b] = 0
        floats[0, :b], floats[1, :b] = 0.0, 1.0
        for i, r in enumerate(rows):
            ints[:, i] = (r.last_token, r.position, r.remaining, r.num_generated, r.min_new_tokens,
                          r.top_k, int(r.stop_on_eos))
            floats[0, i], floats[1, i] = r.temperature, r.top_p
            bt[i, :len(r.block_table)] = r.block_table
        # whole buffers (a few hundred KB): contiguous pinned -> device copies, truly async;
        # columns past b are stale and unread by the bucket-b step
        self.ints.copy_(self.ints_host, non_blocking=True)
        self.floats.copy_(self.floats_host, non_blocking=True)
        self.block_tables.copy_(self.bt_host, non_blocking=True)
        self.step_idx.zero_()
