"""Stage 2: the reward model (trunk + linear value head) and its pairwise training loop.

RewardModel is DeepSpeed-Chat's (applications/DeepSpeed-Chat/dschat/utils/model/reward_model.py):
one score per token; the pairwise loss -logsigmoid(chosen - rejected) is averaged over the tokens
from where the two answers diverge to the end of the longer one; a sequence's score is the value at
its last non-pad token. Here both are computed for the whole batch with masks instead of a Python
loop with `.item()` per row (same numbers, no host syncs), and the loss is taken in fp32. One
deliberate difference: a malformed pair whose span is empty (it diverges only inside the padding)
adds 0 to the loss where DeepSpeed-Chat's loop would average an empty slice into NaN.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from rlhf import deepspeed_utils as dsu
from rlhf.config import DataConfig, DeepSpeedConfig, OptimConfig, StageOutput
from rlhf.metrics import MetricsLogger

logger = logging.getLogger(__name__)

REWARD_HEAD_FILE = "reward_head.safetensors"
REWARD_CONFIG_FILE = "reward_model.json"


def _nth_pad_index(ids: torch.Tensor, pad_token_id: int, n: int, start: int = 0) -> torch.Tensor:
    """Per row, the position of the n-th (0-based) pad token at or after `start`, else seq_len."""
    seq_len = ids.shape[-1]
    pos = torch.arange(seq_len, device=ids.device)  # [T]
    is_pad = (ids == pad_token_id) & (pos >= start)  # [B, T]
    nth = is_pad & (is_pad.long().cumsum(-1) == n + 1)  # [B, T]
    return torch.where(nth, pos, seq_len).min(-1).values  # [B]


class RewardModel(nn.Module):
    """Transformer trunk (`rwtransformer`) + `v_head`: hidden -> one scalar per token."""

    def __init__(self, base_model: nn.Module, pad_token_id: int, num_padding_at_beginning: int = 0) -> None:
        super().__init__()
        self.config = base_model.config
        # OPT trunks end in project_out to word_embed_proj_dim (OPT-350m: 512 != hidden 1024).
        hidden = getattr(self.config, "word_embed_proj_dim", None) or self.config.hidden_size
        self.v_head = nn.Linear(hidden, 1, bias=False)
        self.rwtransformer = base_model
        self.pad_token_id = int(pad_token_id)
        self.num_padding_at_beginning = num_padding_at_beginning

    # ----------------------------------------------------------------------------- HF pass-throughs
    def activation_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """Checkpoint the trunk's layers (non-reentrant), whatever transformers calls it."""
        dsu.enable_gradient_checkpointing(self.rwtransformer)

    gradient_checkpointing_enable = activation_checkpointing_enable

    def gradient_checkpointing_disable(self) -> None:
        trunk = self.rwtransformer
        (getattr(trunk, "activation_checkpointing_disable", None) or trunk.gradient_checkpointing_disable)()

    @property
    def is_gradient_checkpointing(self) -> bool:
        trunk = self.rwtransformer
        flag = getattr(type(trunk), "is_activation_checkpointing", None) and "is_activation_checkpointing"
        return bool(getattr(trunk, flag or "is_gradient_checkpointing", False))

    # ----------------------------------------------------------------------------- forward
    def _values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        out = self.rwtransformer(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out[0]  # [B, T, H]
        return self.v_head(hidden).squeeze(-1)  # [B, T]

    def pairwise_loss(
        self, input_ids: torch.Tensor, rewards: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DeepSpeed-Chat's pairwise loss on a chosen-then-rejected batch of per-token rewards.

        input_ids, rewards: [2B, T]. Returns (loss, chosen_end_scores [B], rejected_end_scores [B]).
        """
        assert input_ids.dim() == 2 and input_ids.shape[0] % 2 == 0, input_ids.shape
        bs, seq_len = input_ids.shape[0] // 2, input_ids.shape[1]
        chosen_ids, rejected_ids = input_ids[:bs], input_ids[bs:]  # [B, T] each
        rewards = rewards.float()
        chosen_r, rejected_r = rewards[:bs], rewards[bs:]  # [B, T] each
        pos = torch.arange(seq_len, device=input_ids.device)  # [T]
        npb = self.num_padding_at_beginning

        c_ind = _nth_pad_index(chosen_ids, self.pad_token_id, npb)  # [B] first pad (end of chosen)
        r_ind = _nth_pad_index(rejected_ids, self.pad_token_id, npb)  # [B]
        differs = chosen_ids != rejected_ids  # [B, T]
        diverged = differs.any(-1)  # [B]
        first_diff = torch.where(differs, pos, seq_len).min(-1).values  # [B]
        # Identical pair: DS-Chat compares only the last position and reads both scores at c_ind - 1.
        r_ind = torch.where(diverged, r_ind, c_ind)  # [B]
        end_ind = torch.where(diverged, torch.maximum(c_ind, r_ind), seq_len)  # [B]
        div_ind = torch.where(diverged, first_diff, seq_len - 1)  # [B]

        span = (pos >= div_ind[:, None]) & (pos < end_ind[:, None])  # [B, T]
        per_token = -F.logsigmoid(chosen_r - rejected_r)  # [B, T]
        per_row = (per_token * span).sum(-1) / span.sum(-1).clamp(min=1)  # [B]
        loss = per_row.mean()

        rows = torch.arange(bs, device=input_ids.device)
        chosen_scores = chosen_r[rows, (c_ind - 1) % seq_len]  # [B]
        rejected_scores = rejected_r[rows, (r_ind - 1) % seq_len]  # [B]
        return loss, chosen_scores, rejected_scores

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **unused: Any) -> dict:
        """input_ids [2B, T]: B chosen rows then their B rejected rows (right padded)."""
        rewards = self._values(input_ids, attention_mask)  # [2B, T]
        loss, chosen, rejected = self.pairwise_loss(input_ids, rewards)
        return {"loss": loss, "chosen_mean_scores": chosen, "rejected_mean_scores": rejected}

    def forward_value(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_value_only: bool = False,
        prompt_length: int = 0,
        **unused: Any,
    ) -> torch.Tensor | dict:
        """Per-token values [B, T]; or with the score of each sequence at its last non-pad token
        after `prompt_length` (prompts may be left padded, answers are right padded)."""
        values = self._values(input_ids, attention_mask)  # [B, T]
        if return_value_only:
            return values
        seq_len = input_ids.shape[1]
        end = _nth_pad_index(input_ids, self.pad_token_id, 0, start=prompt_length)  # [B]
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        chosen_end_scores = values[rows, (end - 1) % seq_len]  # [B]
        return {"values": values, "chosen_end_scores": chosen_end_scores}

    # ----------------------------------------------------------------------------- persistence
    def save_pretrained(self, save_directory: str, state_dict: dict[str, torch.Tensor] | None = None, **kw: Any) -> None:
        """Trunk in HF format + `reward_head.safetensors` + `reward_model.json` (marks the dir)."""
        from safetensors.torch import save_file

        state_dict = self.state_dict() if state_dict is None else state_dict
        prefix = "rwtransformer."
        trunk = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        os.makedirs(save_directory, exist_ok=True)
        self.rwtransformer.save_pretrained(save_directory, state_dict=trunk, **kw)
        head = state_dict["v_head.weight"].detach().to("cpu").contiguous()
        save_file({"v_head.weight": head}, os.path.join(save_directory, REWARD_HEAD_FILE), metadata={"format": "pt"})
        with open(os.path.join(save_directory, REWARD_CONFIG_FILE), "w") as f:
            json.dump({"model_type": "hybrid_rlhf_reward_model", "pad_token_id": self.pad_token_id,
                       "num_padding_at_beginning": self.num_padding_at_beginning,
                       "head_in_features": self.v_head.in_features}, f, indent=2)

    @staticmethod
    def is_reward_model_dir(path: str) -> bool:
        return os.path.isfile(os.path.join(path, REWARD_CONFIG_FILE))

    @classmethod
    def from_pretrained(
        cls, directory: str, dtype: torch.dtype = torch.float32, ds_config: dict | None = None
    ) -> "RewardModel":
        """Reload what save_pretrained wrote (trunk + head), ZeRO-3 partitioned when ds_config says so."""
        from safetensors.torch import load_file

        from rlhf.models import load_base_model

        with open(os.path.join(directory, REWARD_CONFIG_FILE)) as f:
            meta = json.load(f)
        base = load_base_model(directory, dtype, ds_config=ds_config)
        model = cls(base, meta["pad_token_id"], meta.get("num_padding_at_beginning", 0))
        head = load_file(os.path.join(directory, REWARD_HEAD_FILE))["v_head.weight"]
        with torch.no_grad():
            model.v_head.weight.copy_(head.to(model.v_head.weight.dtype))
        model.v_head.to(dtype)
        return model


def create_reward_model(
    name_or_path: str, dtype: torch.dtype = torch.float32, ds_config: dict | None = None,
    num_padding_at_beginning: int = 0, seed: int = 0,
) -> RewardModel:
    """A stage-2 output dir (trunk + trained head), or a built-in name / plain HF LM dir (trunk only,
    fresh zero-mean head with std 1/sqrt(hidden + 1), as nn.Linear draws it)."""
    from rlhf.models import load_base_model, load_tokenizer

    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path) and RewardModel.is_reward_model_dir(path):
        model = RewardModel.from_pretrained(path, dtype=dtype, ds_config=ds_config)
        logger.info("loaded reward model (trunk + trained head) from %s", name_or_path)
        return model
    tokenizer = load_tokenizer(name_or_path)
    base = load_base_model(name_or_path, dtype, ds_config=ds_config, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RewardModel(base, tokenizer.pad_token_id, num_padding_at_beginning)
    model.v_head.to(dtype)
    logger.info("reward model from %s: trunk loaded, value head freshly initialised", name_or_path)
    return model


# =============================================================================== stage 2 training
def _default_optim() -> OptimConfig:
    # tiny-opt on the built-in data (3600 train pairs, 450 steps an epoch, ~9 s an epoch on 2 idle
    # CPU cores), starting from stage 1's output as the pipeline does: held-out accuracy 0.90 after
    # 300 steps, 0.96 after 2 epochs, 0.98 after 6. From random weights it is slower (0.76 after 2
    # epochs, 0.94 after 6). lr 1e-2 stalls (0.68); 3e-3 is no faster than 1.5e-3.
    return OptimConfig(learning_rate=1.5e-3, weight_decay=0.0, num_warmup_steps=10,
                       lr_scheduler_type="cosine", num_train_epochs=3)


@dataclass
class RewardConfig:
    model_name_or_path: str = "tiny-opt"
    """Trunk to start from: a built-in name, a plain HF LM dir (e.g. stage 1's output) or a reward dir."""
    output_dir: str = "output/step2_reward"
    """Where the reward model (trunk HF format + reward_head.safetensors), tokenizer and metrics go."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets and the 3-stage split; stage 2 trains on (chosen, rejected) pairs."""
    ds: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """ZeRO stage, offload, dtype, batch sizes (in pairs), accumulation, gradient checkpointing."""
    optim: OptimConfig = field(default_factory=_default_optim)
    """AdamW + schedule; the defaults fit the built-in data with tiny-opt on 2 CPU cores."""
    num_padding_at_beginning: int = 0
    """Pad tokens a tokenizer puts before every sequence (DeepSpeed-Chat: 1 for its OPT setup)."""
    eval_interval: int = 0
    """Evaluate every this many optimizer steps (0: only before and after training)."""
    log_interval: int = 10
    """Write a train row (mean loss / accuracy since the last row, lr) every this many steps."""
    seed: int = 1234
    """Seeds data order, the built-in trunk's random weights and the value head."""
    disable_dropout: bool = True
    """Set every dropout probability to 0 (DeepSpeed-Chat's step 2 scripts pass --disable_dropout)."""
    tensorboard: bool = True
    """Also write TensorBoard scalars under output_dir/tensorboard (when tensorboard is installed)."""
    progress: bool = True
    """Show a tqdm progress bar on rank 0."""


@torch.no_grad()
def evaluate_reward(engine: Any, loader: Any) -> dict[str, float]:
    """Pairwise accuracy (chosen scored strictly higher) and mean end scores over all ranks."""
    engine.eval()
    dev = dsu.device()
    sums = torch.zeros(5, dtype=torch.float64, device=dev)  # [correct, pairs, chosen, rejected, loss*pairs]
    for batch in loader:
        out = engine(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev))
        chosen, rejected = out["chosen_mean_scores"].double(), out["rejected_mean_scores"].double()  # [B]
        sums += torch.stack([(chosen > rejected).sum().double(), torch.tensor(float(chosen.numel()), device=dev,
                             dtype=torch.float64), chosen.sum(), rejected.sum(), out["loss"].double() * chosen.numel()])
    engine.train()
    sums = dsu.all_reduce_sum(sums)
    if sums[1] == 0:  # no eval split (eval_fraction 0)
        return {k: float("nan") for k in ("eval_accuracy", "chosen_mean", "rejected_mean", "eval_loss")}
    n = float(sums[1])
    return {"eval_accuracy": float(sums[0]) / n, "chosen_mean": float(sums[2]) / n,
            "rejected_mean": float(sums[3]) / n, "eval_loss": float(sums[4]) / n}


def hard_negative_rows(dataset: Any, tokenizer: Any) -> list[int]:
    """Rows of built-in stage-2 pairs whose rejected answer has the right form and the wrong content
    (builtin.is_hard_negative): accuracy on them shows whether the reward model ranks by content."""
    from rlhf.data.builtin import is_hard_negative

    rows = []
    for i in range(len(dataset)):
        text = tokenizer.decode(dataset[i]["rejected_input_ids"], skip_special_tokens=True)
        prompt, sep, answer = text.rpartition("Assistant:")
        try:
            if sep and is_hard_negative(prompt + sep, answer):
                rows.append(i)
        except ValueError:  # not a built-in request (cut by max_seq_len)
            continue
    return rows


def _with_hard_accuracy(metrics: dict[str, float], engine: Any, hard_loader: Any) -> dict[str, float]:
    if hard_loader is not None:
        metrics["eval_accuracy_hard"] = evaluate_reward(engine, hard_loader)["eval_accuracy"]
    return metrics


def run_reward(cfg: RewardConfig) -> StageOutput:
    """Train the reward model on preference pairs, evaluate, save. Returns metrics eval_accuracy,
    chosen_mean, rejected_mean, with built-in data eval_accuracy_hard (hard-negative pairs only),
    and their values before training (initial_*)."""
    from rlhf.data import build_stage_data
    from rlhf.data.collate import collate_pairs
    from rlhf.models import load_tokenizer

    start = time.perf_counter()
    dsu.init_distributed()
    dsu.set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    data = build_stage_data(cfg.data, tokenizer, 2)
    collate = lambda b: collate_pairs(b, tokenizer.pad_token_id)  # noqa: E731
    ds = cfg.ds
    train_loader = dsu.build_dataloader(data.train, ds.per_device_train_batch_size, collate, shuffle=True, seed=cfg.seed)
    eval_loader = dsu.build_dataloader(data.eval, ds.per_device_eval_batch_size, collate, shuffle=False, seed=cfg.seed)
    num_steps = dsu.num_update_steps(len(train_loader), ds, cfg.optim)
    hard_loader = None
    if all(p == "builtin" for p in cfg.data.data_path):
        from torch.utils.data import Subset

        hard = hard_negative_rows(data.eval, tokenizer)
        hard_loader = dsu.build_dataloader(Subset(data.eval, hard), ds.per_device_eval_batch_size, collate,
                                           shuffle=False, seed=cfg.seed)

    dtype = dsu.resolve_dtype(ds.dtype)
    model = create_reward_model(cfg.model_name_or_path, dtype, ds_config=dsu.get_train_ds_config(ds),
                                num_padding_at_beginning=cfg.num_padding_at_beginning, seed=cfg.seed)
    if cfg.disable_dropout:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
    engine, _, scheduler = dsu.initialize(model, ds, cfg.optim, num_steps)
    metrics_log = MetricsLogger(cfg.output_dir, "reward", enabled=dsu.is_rank0(), tensorboard=cfg.tensorboard)
    dsu.print_rank0(
        f"[reward] {cfg.model_name_or_path}: {len(data.train)} train / {len(data.eval)} eval pairs, "
        f"{num_steps} optimizer steps (ZeRO-{ds.zero_stage}, {dtype}, world {dsu.get_world_size()}, "
        f"micro-batch {ds.per_device_train_batch_size} pairs x accumulation {ds.gradient_accumulation_steps})"
    )

    initial = _with_hard_accuracy(evaluate_reward(engine, eval_loader), engine, hard_loader)
    metrics_log.log(0, "eval", **initial)
    dsu.print_rank0(f"[reward] before training: eval accuracy {initial['eval_accuracy']:.3f}"
                    + (f", on hard negatives {initial['eval_accuracy_hard']:.3f}" if hard_loader else ""))

    dev = dsu.device()
    step, losses, accs, last = 0, [], [], {}
    bar = tqdm(total=num_steps, desc="reward", disable=not (cfg.progress and dsu.is_rank0()), dynamic_ncols=True)
    engine.train()
    for epoch in range(cfg.optim.num_train_epochs):
        train_loader.sampler.set_epoch(epoch)
        for batch in train_loader:
            out = engine(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev))
            engine.backward(out["loss"])
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            losses.append(out["loss"].detach().float())
            accs.append((out["chosen_mean_scores"] > out["rejected_mean_scores"]).float().mean().detach())
            if not boundary:
                continue
            step += 1
            bar.update(1)
            if step % cfg.log_interval == 0 or step == num_steps:
                last = {"loss": float(dsu.all_reduce_mean(torch.stack(losses).mean())),
                        "accuracy": float(dsu.all_reduce_mean(torch.stack(accs).mean()))}
                losses, accs = [], []
                metrics_log.log(step, "train", **last, lr=scheduler.get_last_lr()[0], epoch=epoch)
                bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['accuracy']:.2f}")
            if cfg.eval_interval and step % cfg.eval_interval == 0 and step < num_steps:
                metrics_log.log(step, "eval", **evaluate_reward(engine, eval_loader))
            if step >= num_steps:
                break
        if step >= num_steps:
            break
    bar.close()

    final = _with_hard_accuracy(evaluate_reward(engine, eval_loader), engine, hard_loader)
    metrics_log.log(step, "eval", **final)
    dsu.save_hf_model(engine, tokenizer, cfg.output_dir, ds.zero_stage)
    metrics = {**final, **{f"initial_{k}": v for k, v in initial.items()},
               "train_loss": last.get("loss", float("nan")), "steps": step}
    metrics_log.summary(metrics, step=step, output_dir=cfg.output_dir)
    return StageOutput(output_dir=cfg.output_dir, metrics=metrics, wall_time_s=time.perf_counter() - start)
