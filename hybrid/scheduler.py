"""Continuous batching for rollouts (pure Python, no torch).

All prompts of a rollout are queued at once. Each `schedule()` call returns either a prefill batch
(waiting prompts admitted as the KV pool allows, up to max_num_batched_tokens) or a decode batch
(every running row, for `num_steps` steps run on the device without the host looking). Finished rows
(EOS, max_new_tokens, max_model_len) retire and free their blocks as soon as the host learns of them;
waiting prompts are admitted as room frees. When the pool runs dry, the most recently admitted rows
are preempted: their blocks are freed and they are re-queued at the front with the tokens they
generated so far, which the next prefill recomputes.

The decode batch runs several steps per host round trip. The host knows everything about those
steps except where EOS falls (block needs are a function of positions only), so it reserves the
slots of all `num_steps` steps up front and learns the sampled tokens once per batch.
"""
from __future__ import annotations

import enum
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from hybrid.kv_cache.manager import KVCacheManager


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    request_id: int
    """Index of the prompt in the rollout."""
    sample_index: int
    """Which of the request's n answers this row is."""
    prompt_token_ids: list[int]
    max_new_tokens: int
    min_new_tokens: int = 0
    eos_token_ids: tuple[int, ...] = ()
    """Tokens that end the answer (empty: only lengths end it, e.g. ignore_eos)."""
    params: Any = None
    """Sampling parameters, opaque to the scheduler (the runner reads them)."""
    n: int = 1
    """Answers still to fork from this row once its prompt is prefilled."""
    output_token_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]


@dataclass
class PrefillBatch:
    seqs: list[Sequence]
    """Rows to prefill; every token of each (prompt + earlier answer after a preemption)."""


@dataclass
class DecodeBatch:
    seqs: list[Sequence]
    """Running rows, in batch order."""
    num_steps: int
    """Decode steps to run before the host reads the sampled tokens back."""
    block_copies: list[tuple[int, int]]
    """Copy-on-write block copies (src, dst) to perform before the first step."""


class Scheduler:
    def __init__(
        self,
        manager: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        decode_steps_per_sync: int = 16,
    ) -> None:
        self.manager = manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.decode_steps_per_sync = decode_steps_per_sync
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.finished: list[Sequence] = []
        self.num_preemptions = 0
        self._ids = itertools.count()

    # ---- requests ------------------------------------------------------------------------
    def add_request(
        self,
        prompt_token_ids: list[int],
        max_new_tokens: int,
        *,
        request_id: int,
        n: int = 1,
        min_new_tokens: int = 0,
        eos_token_ids: tuple[int, ...] = (),
        params: Any = None,
    ) -> Sequence:
        if not prompt_token_ids:
            raise ValueError(f"request {request_id}: empty prompt")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"request {request_id}: prompt of {len(prompt_token_ids)} tokens leaves no room "
                f"under max_model_len={self.max_model_len}"
            )
        seq = Sequence(
            seq_id=next(self._ids), request_id=request_id, sample_index=0,
            prompt_token_ids=list(prompt_token_ids), max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens, eos_token_ids=tuple(eos_token_ids), params=params, n=n,
        )
        if max_new_tokens <= 0:
            self._finish(seq, "length")
            for i in range(1, n):
                self.finished.append(self._child(seq, i))
        else:
            self.waiting.append(seq)
        return seq

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remaining_steps(self, seq: Sequence) -> int:
        """Tokens the row may still generate (answer and context limits)."""
        return min(seq.max_new_tokens - len(seq.output_token_ids),
                   self.max_model_len - seq.num_tokens)

    # ---- scheduling ----------------------------------------------------------------------
    def schedule(self) -> PrefillBatch | DecodeBatch:
        prefill = self._schedule_prefill()
        if prefill is not None:
            return prefill
        if not self.running:
            raise RuntimeError("scheduler has nothing to run")
        return self._schedule_decode()

    def _schedule_prefill(self) -> PrefillBatch | None:
        batch: list[Sequence] = []
        num_tokens = 0
        num_rows = len(self.running)
        while self.waiting:
            seq = self.waiting[0]
            if num_rows + seq.n > self.max_num_seqs and (batch or self.running):
                break
            if batch and num_tokens + seq.num_tokens > self.max_num_batched_tokens:
                break
            if not self.manager.can_admit(seq.num_tokens):
                idle = not batch and not self.running
                if idle and self.manager.blocks_for(seq.num_tokens) <= self.manager.num_free_blocks:
                    pass  # nothing else runs: the watermark protects no one, admit anyway
                elif idle:
                    raise RuntimeError(
                        f"a sequence of {seq.num_tokens} tokens needs "
                        f"{self.manager.blocks_for(seq.num_tokens)} blocks, the pool has "
                        f"{self.manager.num_blocks}; raise the KV-cache size or lower max_model_len"
                    )
                else:
                    break
            self.waiting.popleft()
            self.manager.allocate(seq.seq_id, seq.num_tokens)
            seq.status = SeqStatus.RUNNING
            batch.append(seq)
            num_tokens += seq.num_tokens
            num_rows += seq.n
        return PrefillBatch(batch) if batch else None

    def _schedule_decode(self) -> DecodeBatch:
        rows = self.running
        remaining = [self.remaining_steps(s) for s in rows]
        may_stop_early = any(s.eos_token_ids for s in rows)
        # Without EOS the host has nothing to learn until the longest row is done, unless it must
        # admit waiting prompts as soon as a row retires by length.
        steps = max(remaining)
        if may_stop_early:
            steps = min(steps, self.decode_steps_per_sync)
        if self.waiting:
            steps = min(steps, min(remaining))
        steps = max(steps, 1)
        while True:
            need = sum(self.manager.blocks_to_reserve(s.seq_id, self._slots_needed(s, steps)) for s in rows)
            if need <= self.manager.num_free_blocks:
                break
            if steps > 1:
                steps = max(1, steps // 2)
                continue
            self._preempt(rows[-1])
            rows = self.running
            if not rows:
                raise RuntimeError("KV pool too small to decode a single row")
        copies: list[tuple[int, int]] = []
        for seq in rows:
            copies += self.manager.reserve(seq.seq_id, self._slots_needed(seq, steps))
        return DecodeBatch(list(rows), steps, copies)

    def _slots_needed(self, seq: Sequence, steps: int) -> int:
        """Slots a row writes in `steps` decode steps: positions num_tokens - 1 onwards, one per
        step while it is active (it stops at its length limits; EOS is not known in advance)."""
        return seq.num_tokens - 1 + min(steps, self.remaining_steps(seq))

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption: blocks freed, row re-queued first with its tokens."""
        self.running.remove(seq)
        self.manager.free(seq.seq_id)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ---- results -------------------------------------------------------------------------
    def process_prefill(self, batch: PrefillBatch, sampled: list[list[int]]) -> None:
        """sampled[i] holds seq i's first new token for each of its n answers."""
        for seq, tokens in zip(batch.seqs, sampled, strict=True):
            assert len(tokens) == seq.n, (len(tokens), seq.n)
            rows = [seq]
            for i in range(1, seq.n):
                child = self._child(seq, i)
                self.manager.fork(seq.seq_id, child.seq_id)
                child.status = SeqStatus.RUNNING
                rows.append(child)
            seq.n = 1
            for row, token in zip(rows, tokens):
                self.running.append(row)
                self._append(row, token)

    def process_decode(self, batch: DecodeBatch, tokens: list[list[int]]) -> None:
        """tokens[i] holds row i's num_steps sampled tokens (those after its end are ignored).
        Whole rows at a time (list slicing / index in C): this runs once per chunk on the host
        while the device idles, so it is kept to ~1 us per row."""
        retired = False
        for seq, row_tokens in zip(batch.seqs, tokens, strict=True):
            if seq.status is not SeqStatus.RUNNING:
                continue
            new = row_tokens[: min(batch.num_steps, self.remaining_steps(seq))]
            stop = len(new)
            for eos in seq.eos_token_ids:
                try:
                    stop = min(stop, new.index(eos, 0, stop))
                except ValueError:
                    pass
            if stop < len(new):
                seq.output_token_ids.extend(new[: stop + 1])
                self._retire(seq, "stop", remove=False)
                retired = True
            else:
                seq.output_token_ids.extend(new)
                if self.remaining_steps(seq) <= 0:
                    self._retire(seq, "length", remove=False)
                    retired = True
        if retired:
            self.running = [s for s in self.running if s.status is SeqStatus.RUNNING]

    def _append(self, seq: Sequence, token: int) -> None:
        seq.output_token_ids.append(token)
        if token in seq.eos_token_ids:
            self._retire(seq, "stop")
        elif self.remaining_steps(seq) <= 0:
            self._retire(seq, "length")

    def _retire(self, seq: Sequence, reason: str, remove: bool = True) -> None:
        if remove:
            self.running.remove(seq)
        self.manager.free(seq.seq_id)
        self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        self.finished.append(seq)

    def _child(self, parent: Sequence, index: int) -> Sequence:
        child = Sequence(
            seq_id=next(self._ids), request_id=parent.request_id, sample_index=index,
            prompt_token_ids=parent.prompt_token_ids, max_new_tokens=parent.max_new_tokens,
            min_new_tokens=parent.min_new_tokens, eos_token_ids=parent.eos_token_ids,
            params=parent.params, output_token_ids=list(parent.output_token_ids),
            status=parent.status, finish_reason=parent.finish_reason,
        )
        return child
