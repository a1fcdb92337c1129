"""The systems `bench.e2e` compares, each behind the same `step(prompts) -> dict` / `close()`.

- ours: rlhf.ppo.PPOTrainer (DeepSpeed ZeRO actor + critic, hybrid engine on CUDA);
- hf-ddp: bench/baselines/hf_ddp.py (HF generate + torch DDP + torch AdamW, bf16 autocast);
- hf-static: the same with HF's static KV cache (compiled decode on GPU).
All run DeepSpeed-Chat's benchmark setting: answers forced to full length, one PPO epoch, one
generation batch, generation batch = training batch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

SYSTEMS = ("ours", "hf-ddp", "hf-static")


@dataclass
class SystemSpec:
    """What every system is built from (filled by bench/e2e.py's flags)."""

    model: str
    """Actor: built-in name (opt-1.3b, ...) or local HF directory."""
    critic: str
    """Critic and reward model."""
    batch: int
    """Per-GPU generation batch = training batch."""
    prompt_len: int = 256
    gen_len: int = 256
    actor_zero_stage: int = 2
    critic_zero_stage: int = 2
    enable_hybrid_engine: bool = True
    """ours: generate with the hybrid engine (the trainer falls back to HF generate where it cannot)."""
    offload: bool = False
    gradient_checkpointing: bool = False
    actor_lora_dim: int = 0
    lora_module_name: str = "layers."
    """Linear layers that get LoRA adapters: every decoder layer's, OPT (decoder.layers.N) and LLaMA (layers.N)."""
    hf_precision: str = "amp"
    """Baselines: amp (fp32 weights + bf16 autocast) | bf16 (bf16 weights)."""
    seed: int = 1234
    output_dir: str = "output/bench"


def local_device() -> torch.device:
    import os

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


class OursRunner:
    """rlhf's PPOTrainer behind the benchmark's step() contract."""

    def __init__(self, spec: SystemSpec) -> None:
        from rlhf.ppo.config import PPOConfig
        from rlhf.ppo.trainer import PPOTrainer

        cuda = torch.cuda.is_available()
        self.cfg = PPOConfig(
            actor_model_name_or_path=spec.model,
            critic_model_name_or_path=spec.critic,
            per_device_generation_batch_size=spec.batch,
            per_device_training_batch_size=spec.batch,
            generation_batches=1,
            ppo_epochs=1,
            max_prompt_seq_len=spec.prompt_len,
            max_answer_seq_len=spec.gen_len,
            actor_zero_stage=spec.actor_zero_stage,
            critic_zero_stage=spec.critic_zero_stage,
            offload=spec.offload,
            actor_gradient_checkpointing=spec.gradient_checkpointing,
            critic_gradient_checkpointing=spec.gradient_checkpointing,
            actor_lora_dim=spec.actor_lora_dim,
            only_optimize_lora=spec.actor_lora_dim > 0,
            lora_module_name=spec.lora_module_name,
            enable_hybrid_engine=spec.enable_hybrid_engine and cuda,
            ignore_eos=True,
            do_sample=False,
            actor_dropout=0.0,
            num_warmup_steps=0,
            max_steps=10**6,  # sizes the lr schedule only: the lr must not reach 0 within the run
            eval_prompts=0,
            progress_bar=False,
            output_dir=spec.output_dir,
            seed=spec.seed,
        )
        self.trainer = PPOTrainer.from_config(self.cfg)
        self.generation_path = None

    def step(self, prompts: dict) -> dict:
        stats = dict(self.trainer.step(prompts))
        self.generation_path = _GENERATORS.get(stats.get("generator"), stats.get("generator"))
        return stats

    def close(self) -> None:
        closer = getattr(self.trainer, "close", None)
        if callable(closer):
            closer()
        del self.trainer


_GENERATORS = {"hf": "hf-generate", "hybrid": "hybrid-engine"}
"""PPOTrainer.step()'s `generator` -> the row's generation_path."""


class BaselineRunner:
    """HF-DDP / HF-static behind the same contract (the trainer already has it)."""

    def __init__(self, spec: SystemSpec, static_cache: bool) -> None:
        from bench.baselines.hf_ddp import HFDDPConfig, HFDDPTrainer

        cfg = HFDDPConfig(
            actor_model_name_or_path=spec.model,
            critic_model_name_or_path=spec.critic,
            max_answer_seq_len=spec.gen_len,
            per_device_training_batch_size=spec.batch,
            static_cache=static_cache,
            precision=spec.hf_precision,
            ignore_eos=True,
            gradient_checkpointing=spec.gradient_checkpointing,
            actor_lora_dim=spec.actor_lora_dim,
            seed=spec.seed,
        )
        self.trainer = HFDDPTrainer(cfg, local_device())
        self.generation_path = self.trainer.generation_path

    def step(self, prompts: dict) -> dict:
        return self.trainer.step(prompts)

    def close(self) -> None:
        self.trainer.close()
        del self.trainer
        if self.generation_path == "hf-generate-static":
            torch._dynamo.reset()  # compiled decode graphs (and their CUDA-graph pools) go too


def build_system(name: str, spec: SystemSpec):
    """A fresh runner of system `name` (ours | hf-ddp | hf-static)."""
    if name == "ours":
        return OursRunner(spec)
    if name in ("hf-ddp", "hf-static"):
        return BaselineRunner(spec, static_cache=name == "hf-static")
    raise ValueError(f"unknown system {name!r}; choose from {SYSTEMS}")


def critic_param_count(config) -> int:
    """Trunk + value head parameters of a critic built from this config (meta device, no memory)."""
    from transformers import AutoModel

    with torch.device("meta"):
        trunk = AutoModel.from_config(config)
    width = getattr(config, "word_embed_proj_dim", None) or config.hidden_size
    return sum(p.numel() for p in trunk.parameters()) + width
