"""The HF-DDP baseline: stage-3 PPO the way a plain PyTorch + HuggingFace user writes it.

Same algorithm as rlhf/ppo (DeepSpeed-Chat's step 3: KL-penalised rewards, GAE, clipped actor and
critic losses; the math is imported from rlhf.ppo, not re-derived), but nothing of this project's
machinery: rollouts with HuggingFace `generate`, actor and critic wrapped in torch
DistributedDataParallel, torch AdamW (fused on GPU), bf16 autocast over fp32 master weights (the
standard torch.amp recipe; `precision="bf16"` keeps the weights themselves in bf16 instead), frozen
reference and reward models in bf16, no DeepSpeed, no hybrid engine. `static_cache=True` is
`hf-static`: HF's static KV cache, whose decode step `generate` compiles with torch.compile on GPU.

The critic / reward model is what DeepSpeed-Chat's RewardModel is: the transformer trunk plus a
bias-free linear value head; the reward is the value at the last token.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from rlhf.models import load_base_model, load_causal_lm
from rlhf.ppo.advantages import compute_rewards, gae, logprobs_from_logits
from rlhf.ppo.losses import actor_loss, critic_loss

logger = logging.getLogger(__name__)


@dataclass
class HFDDPConfig:
    actor_model_name_or_path: str
    critic_model_name_or_path: str
    """Initialises the critic and is the frozen reward model (as in DeepSpeed-Chat's benchmark)."""
    max_answer_seq_len: int = 256
    per_device_training_batch_size: int | None = None
    """PPO mini-batch rows per rank (None: the whole generation batch, DS-Chat's benchmark setting)."""
    static_cache: bool = False
    """hf-static: generate with cache_implementation="static" (compiled decode on GPU)."""
    precision: str = "amp"
    """amp: fp32 weights + bf16 autocast (GPU); bf16: weights in bf16; fp32: no autocast (CPU default)."""
    ignore_eos: bool = True
    """Force full-length answers (min_new_tokens = max_new_tokens)."""
    gradient_checkpointing: bool = False
    actor_lora_dim: int = 0
    """> 0: PEFT LoRA of this rank on every linear layer of the actor's decoder layers, only the
    adapters trained (what a plain-HF user reaches for when the full actor does not fit)."""
    lora_alpha: float = 1.0
    """PEFT scaling alpha / r; 1.0 matches DeepSpeed-Chat's lora_scaling / lora_dim."""
    actor_learning_rate: float = 9.65e-6
    critic_learning_rate: float = 5e-6
    kl_ctl: float = 0.1
    clip_reward_value: float = 5.0
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    seed: int = 1234


class ValueModel(nn.Module):
    """Trunk + value head: one scalar per position (critic) or per sequence (reward)."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        cfg = trunk.config
        width = getattr(cfg, "word_embed_proj_dim", None) or cfg.hidden_size  # OPT-350m trunk: 512
        self.v_head = nn.Linear(width, 1, bias=False)
        self.config = cfg

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.v_head(hidden).squeeze(-1)  # [B, L]


def _with_peft_lora(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """The actor wrapped by PEFT: LoRA on each nn.Linear inside the decoder layers, base frozen."""
    from peft import LoraConfig, get_peft_model

    targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                      if isinstance(m, nn.Linear) and ".layers." in f".{name}"})
    if not targets:
        raise ValueError(f"no linear layers under '.layers.' in {type(model).__name__} for LoRA")
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                  target_modules=targets, bias="none"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info("hf-ddp actor: PEFT LoRA r=%d on %s, %s trainable parameters", rank, targets, f"{trainable:,}")
    return peft_model


def _no_dropout(model: nn.Module) -> None:
    """PPO ratios need deterministic forwards (DeepSpeed-Chat sets the actor's dropout to 0)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


class HFDDPTrainer:
    """One PPO step per `step(prompts)`; same step() contract as rlhf.ppo.PPOTrainer."""

    def __init__(self, cfg: HFDDPConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        cuda = device.type == "cuda"
        if cfg.precision not in ("amp", "bf16", "fp32"):
            raise ValueError(f"precision must be amp | bf16 | fp32, got {cfg.precision!r}")
        precision = cfg.precision if cuda else "fp32"  # no bf16 autocast math on the CPU test path
        self.autocast = precision == "amp"
        train_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        frozen_dtype = torch.bfloat16 if cuda else torch.float32
        torch.manual_seed(cfg.seed)
        with torch.device(device):  # build on the device: fast random init, early OOM
            self.actor = load_causal_lm(cfg.actor_model_name_or_path, dtype=train_dtype, seed=cfg.seed)
            self.ref = load_causal_lm(cfg.actor_model_name_or_path, dtype=frozen_dtype, seed=cfg.seed)
            self.critic = ValueModel(load_base_model(cfg.critic_model_name_or_path, dtype=train_dtype, seed=cfg.seed + 1))
            self.reward = ValueModel(load_base_model(cfg.critic_model_name_or_path, dtype=frozen_dtype, seed=cfg.seed + 1))
        if cfg.actor_lora_dim > 0:
            self.actor = _with_peft_lora(self.actor, cfg.actor_lora_dim, cfg.lora_alpha)
        self.critic.v_head.to(train_dtype)
        self.reward.v_head.to(frozen_dtype)
        self.reward.v_head.load_state_dict(self.critic.v_head.state_dict())
        for m in (self.ref, self.reward):
            m.eval().requires_grad_(False)
        for m in (self.actor, self.critic):
            _no_dropout(m)
            if cfg.gradient_checkpointing:
                (m if hasattr(m, "gradient_checkpointing_enable") else m.trunk).gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
        self.actor.generation_config.pad_token_id = self.actor.config.pad_token_id
        ddp_kw = dict(device_ids=[device.index] if cuda else None)
        self.actor_ddp = DDP(self.actor, **ddp_kw)
        self.critic_ddp = DDP(self.critic, **ddp_kw)
        fused = True if cuda else None
        self.actor_opt = torch.optim.AdamW([p for p in self.actor.parameters() if p.requires_grad], lr=cfg.actor_learning_rate, betas=(0.9, 0.95), fused=fused)
        self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=cfg.critic_learning_rate, betas=(0.9, 0.95), fused=fused)
        self.generation_path = "hf-generate-static" if cfg.static_cache else "hf-generate"
        self.actor_config = self.actor.config
        self.critic_config = self.critic.config
        self.actor_params = sum(p.numel() for p in self.actor.parameters())
        self.critic_params = sum(p.numel() for p in self.critic.parameters())

    # ------------------------------------------------------------------------------ helpers
    def _amp(self):
        if self.autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ------------------------------------------------------------------------------ phases
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        n = self.cfg.max_answer_seq_len
        kwargs = dict(max_new_tokens=n, do_sample=False, pad_token_id=self.actor.config.pad_token_id)
        if self.cfg.ignore_eos:
            kwargs["min_new_tokens"] = n
        if self.cfg.static_cache:
            kwargs["cache_implementation"] = "static"
        self.actor.eval()
        with self._amp():
            seq = self.actor.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)  # [B, P + n]
        self.actor.train()
        return seq

    @torch.no_grad()
    def make_experience(self, seq: torch.Tensor, prompt_mask: torch.Tensor) -> dict:
        B, P = prompt_mask.shape
        answer_mask = torch.ones(B, seq.shape[1] - P, dtype=prompt_mask.dtype, device=seq.device)  # [B, n]
        attention_mask = torch.cat([prompt_mask, answer_mask], dim=1)  # [B, L]
        action_mask = attention_mask[:, 1:].clone()  # [B, L-1]
        action_mask[:, : P - 1] = 0  # logprob column t scores token t+1: answers start at column P-1
        with self._amp():
            logits = self.actor(input_ids=seq, attention_mask=attention_mask, use_cache=False).logits  # [B, L, V]
            logprobs = logprobs_from_logits(logits[:, :-1], seq[:, 1:])  # [B, L-1]
            del logits
            ref_logits = self.ref(input_ids=seq, attention_mask=attention_mask, use_cache=False).logits  # [B, L, V]
            ref_logprobs = logprobs_from_logits(ref_logits[:, :-1], seq[:, 1:])  # [B, L-1]
            del ref_logits
            values = self.critic(seq, attention_mask)[:, :-1].float()  # [B, L-1]
            reward_score = self.reward(seq, attention_mask)[:, -1].float()  # [B] value at the last token
        rewards = compute_rewards(logprobs, ref_logprobs, reward_score, action_mask,
                                  self.cfg.kl_ctl, self.cfg.clip_reward_value)  # [B, L-1]
        advantages, returns = gae(values, rewards, action_mask, self.cfg.gamma, self.cfg.lam)  # [B, L-1] x2
        return dict(seq=seq, attention_mask=attention_mask, action_mask=action_mask, logprobs=logprobs,
                    values=values, advantages=advantages, returns=returns, reward_score=reward_score)

    def train_rlhf(self, exp: dict) -> dict:
        B = exp["seq"].shape[0]
        mb = self.cfg.per_device_training_batch_size or B
        stats = {"actor_loss": 0.0, "critic_loss": 0.0}
        losses = []
        for i in range(0, B, mb):
            sl = slice(i, i + mb)
            seq, attn, mask = exp["seq"][sl], exp["attention_mask"][sl], exp["action_mask"][sl]
            with self._amp():
                logits = self.actor_ddp(input_ids=seq, attention_mask=attn, use_cache=False).logits  # [b, L, V]
                logprobs = logprobs_from_logits(logits[:, :-1], seq[:, 1:])  # [b, L-1]
                a_loss, _ = actor_loss(logprobs, exp["logprobs"][sl], exp["advantages"][sl], mask, self.cfg.cliprange)
            del logits
            a_loss.backward()
            torch.nn.utils.clip_grad_norm_(self.actor.parameters(), 1.0)
            self.actor_opt.step()
            self.actor_opt.zero_grad(set_to_none=True)
            with self._amp():
                values = self.critic_ddp(seq, attn)[:, :-1]  # [b, L-1]
                c_loss, _ = critic_loss(values, exp["values"][sl], exp["returns"][sl], mask, self.cfg.cliprange_value)
            c_loss.backward()
            torch.nn.utils.clip_grad_norm_(self.critic.parameters(), 1.0)
            self.critic_opt.step()
            self.critic_opt.zero_grad(set_to_none=True)
            losses.append(torch.stack([a_loss.detach(), c_loss.detach()]))
        mean = torch.stack(losses).mean(0).tolist()  # one host sync per step, after training
        stats["actor_loss"], stats["critic_loss"] = mean
        return stats

    def step(self, prompts: dict) -> dict:
        """One PPO iteration on a prompt batch {'input_ids': [B, P], 'attention_mask': [B, P]}."""
        input_ids = prompts["input_ids"].to(self.device)  # [B, P]
        prompt_mask = prompts["attention_mask"].to(self.device)  # [B, P]
        t0 = self._sync()
        seq = self.generate(input_ids, prompt_mask)  # [B, P + n]
        t1 = self._sync()
        exp = self.make_experience(seq, prompt_mask)
        t2 = self._sync()
        stats = self.train_rlhf(exp)
        t3 = self._sync()
        gen_tokens = int(exp["action_mask"].sum().item())
        stats.update(
            time_generation_s=t1 - t0, time_experience_s=t2 - t1, time_training_s=t3 - t2,
            num_samples=int(input_ids.shape[0]), gen_tokens=gen_tokens,
            reward_score=float(exp["reward_score"].mean().item()),
        )
        return stats

    def close(self) -> None:
        """Drop every reference to models and optimizer state so the memory can be reused."""
        for name in ("actor_ddp", "critic_ddp", "actor_opt", "critic_opt", "actor", "ref", "critic", "reward"):
            if hasattr(self, name):
                delattr(self, name)
