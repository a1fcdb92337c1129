"""Rollout generation behind one interface: HF `generate` or the hybrid inference engine.

Both return HF generate's layout: [B, Lp + n] token ids, the left-padded prompts first, then the
answers, `pad_token_id` after each row's EOS. The trainer never knows which one ran.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

import torch

from rlhf.deepspeed_utils import get_world_size, unwrap

logger = logging.getLogger(__name__)


class Generator(ABC):
    name: str = "generator"

    def __init__(self, cfg: Any, actor_engine: Any, tokenizer: Any):
        self.cfg = cfg
        self.actor_engine = actor_engine
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.eos_token_id = int(tokenizer.eos_token_id)

    @abstractmethod
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, greedy: bool = False) -> torch.Tensor:
        """input_ids, attention_mask [B, Lp] (left padded) -> sequences [B, Lp + n], n <= max_answer.
        `greedy` overrides the sampling flags (evaluation)."""

    def release(self) -> None:
        """Free generation-only memory before training (KV cache)."""

    def phase_times(self) -> dict:
        """Prefill / decode seconds of the last generate() where the generator measures them."""
        return {}


def _zero_stage(engine: Any) -> int:
    fn = getattr(engine, "zero_optimization_stage", None)
    return int(fn()) if callable(fn) else 0


class HFGenerator(Generator):
    """`generate` on the unwrapped actor. Under ZeRO-3 the parameters are gathered layer by layer by
    DeepSpeed's hooks during every forward; with several ranks `synced_gpus` keeps every rank
    stepping until the longest row of any rank is done (a rank that stopped early would hang the
    others' all-gathers)."""

    name = "hf"

    def _kwargs(self, greedy: bool = False) -> dict:
        c = self.cfg
        sample = c.do_sample and not greedy
        kw: dict = dict(
            max_new_tokens=c.max_answer_seq_len,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            do_sample=sample,
            use_cache=True,
        )
        if c.ignore_eos:
            kw["min_new_tokens"] = c.max_answer_seq_len  # EOS suppressed: fixed-length answers
        if sample:
            kw.update(temperature=c.temperature, top_k=c.top_k or None, top_p=c.top_p)
        else:  # explicit greedy: override sampling defaults a checkpoint's generation_config may carry
            kw.update(temperature=None, top_k=None, top_p=None)
        if self.pad_token_id != self.eos_token_id:
            # pad inside an answer would read as its end (action mask, reward model); never emit it
            kw["suppress_tokens"] = [self.pad_token_id]
        if _zero_stage(self.actor_engine) == 3 and get_world_size() > 1:
            kw["synced_gpus"] = True
        return kw

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, greedy: bool = False) -> torch.Tensor:
        model = unwrap(self.actor_engine)
        was_training = model.training
        model.eval()
        try:
            seq = model.generate(input_ids=input_ids, attention_mask=attention_mask, **self._kwargs(greedy))  # [B, Lp + n]
        finally:
            model.train(was_training)
        return seq


class HybridGenerator(Generator):
    """hybrid.engine.HybridEngine: copies the actor's current weights (LoRA folded in, ZeRO-3
    gathered) into its inference layout before each generation, and frees its KV pool after."""

    name = "hybrid"

    def __init__(self, cfg: Any, actor_engine: Any, tokenizer: Any, engine_config: Any = None):
        super().__init__(cfg, actor_engine, tokenizer)
        from hybrid.config import EngineConfig
        from hybrid.engine import HybridEngine

        if engine_config is None:
            engine_config = default_engine_config(cfg, EngineConfig)
        self.engine = HybridEngine(engine_config, pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id)

    def sampling_params(self, greedy: bool = False) -> Any:
        from hybrid.config import SamplingParams

        c = self.cfg
        sample = c.do_sample and not greedy
        return SamplingParams(
            max_new_tokens=c.max_answer_seq_len,
            ignore_eos=c.ignore_eos,
            temperature=c.temperature if sample else 0.0,
            top_k=c.top_k if sample else 0,
            top_p=c.top_p if sample else 1.0,
        )

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, greedy: bool = False) -> torch.Tensor:
        # the engine folds LoRA deltas into its own copy (the actor is not modified) and gathers
        # ZeRO-3 partitions layer by layer
        self.engine.load_weights(self.actor_engine)
        seq = self.engine.generate(input_ids, attention_mask, self.sampling_params(greedy))  # [B, Lp + max_new]
        # clone: the engine runs under inference_mode, and its tensors cannot enter autograd later
        return trim_trailing_padding(seq, input_ids.shape[1], self.pad_token_id).clone()

    def release(self) -> None:
        self.engine.release()

    def phase_times(self) -> dict:
        st = self.engine.stats
        return {"prefill": st.prefill_s, "decode": st.decode_s, "load_weights": self.engine.last_load_s}


def default_engine_config(cfg: Any, engine_config_cls: Any) -> Any:
    on_gpu = torch.cuda.is_available()
    ec = engine_config_cls(
        max_num_seqs=max(1, cfg.per_device_generation_batch_size),
        max_model_len=cfg.max_prompt_seq_len + cfg.max_answer_seq_len,
        dtype="bfloat16" if on_gpu and cfg.dtype in ("auto", "bf16") else ("float16" if cfg.dtype == "fp16" else "float32"),
        device="cuda" if on_gpu else "cpu",
        enable_cuda_graph=on_gpu,
        backend="auto" if on_gpu else "torch",  # CPU: the pure-PyTorch ops (the Triton interpreter is slow)
    )
    if cfg.hybrid_num_blocks is not None:
        ec.cache.num_blocks = cfg.hybrid_num_blocks
    return ec


def trim_trailing_padding(seq: torch.Tensor, prompt_len: int, pad_token_id: int) -> torch.Tensor:
    """Drop answer columns that are padding in every row (at least one answer column is kept):
    experience and training then run on the longest real answer, not max_answer_seq_len."""
    answer = seq[:, prompt_len:]  # [B, n]
    if answer.shape[1] == 0:
        return seq
    used = (answer != pad_token_id).any(dim=0)  # [n]
    last = int(used.nonzero().max().item()) + 1 if used.any() else 1
    return seq[:, : prompt_len + last]


def make_generator(cfg: Any, actor_engine: Any, tokenizer: Any) -> Generator:
    """Hybrid engine when asked for and able to serve this actor; otherwise HF generate, and say why
    in one log line."""
    if not cfg.enable_hybrid_engine:
        return HFGenerator(cfg, actor_engine, tokenizer)
    try:
        from hybrid.config import EngineConfig
        from hybrid.engine import engine_supported

        ok, reason = engine_supported(unwrap(actor_engine), default_engine_config(cfg, EngineConfig))
    except Exception as e:  # engine not importable here (missing build, no Triton driver, ...)
        ok, reason = False, f"{type(e).__name__}: {e}"
    if ok:
        try:
            gen = HybridGenerator(cfg, actor_engine, tokenizer)
            logger.info("generation: hybrid engine")
            return gen
        except Exception as e:
            reason = f"engine failed to start: {type(e).__name__}: {e}"
    logger.warning("--enable_hybrid_engine: hybrid engine cannot serve this actor (%s); falling back to HF generate", reason)
    return HFGenerator(cfg, actor_engine, tokenizer)
