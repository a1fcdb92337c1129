"""Low-rank adapters (LoRA) for the actor and critic, merged into the weights on save.

A small own implementation (as DeepSpeed-Chat's) rather than peft, because it must live under
every ZeRO stage: the base `weight` / `bias` stay the *same* Parameter objects at the same module
path, so HF names, ZeRO-3 partitions and checkpoints of the base model are untouched; only
`lora_right_weight` [in, r] and `lora_left_weight` [r, out] are added next to them.
    y = x W^T + b + dropout(x) @ right @ left * (alpha / r)
`left` starts at zero, so a converted model computes exactly what the original did.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

LORA_KEYS = ("lora_right_weight", "lora_left_weight")


def _shape(p: torch.Tensor) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def _gathered(params, modifier_rank=None):
    """Gather ZeRO-3 partitions of `params` for the block (no-op for ordinary parameters)."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


class LoRALinear(nn.Module):
    def __init__(self, linear: nn.Linear, lora_dim: int, lora_scaling: float = 1.0, lora_dropout: float = 0.0):
        super().__init__()
        if lora_dim <= 0:
            raise ValueError(f"lora_dim must be > 0, got {lora_dim}")
        self.weight = linear.weight  # the same Parameter: [out, in]
        self.bias = linear.bias
        out_features, in_features = _shape(self.weight)
        dev, dt = linear.weight.device, linear.weight.dtype
        self.lora_right_weight = nn.Parameter(torch.empty(in_features, lora_dim, device=dev, dtype=dt))  # [in, r]
        self.lora_left_weight = nn.Parameter(torch.zeros(lora_dim, out_features, device=dev, dtype=dt))  # [r, out]
        nn.init.kaiming_uniform_(self.lora_right_weight, a=math.sqrt(5))
        self.lora_scaling = lora_scaling / lora_dim
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self._backup: torch.Tensor | None = None

    def delta_weight(self) -> torch.Tensor:
        """scaling * (right @ left)^T -> [out, in], what merging adds to `weight`."""
        return self.lora_scaling * (self.lora_right_weight @ self.lora_left_weight).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + (self.lora_dropout(x) @ self.lora_right_weight @ self.lora_left_weight) * self.lora_scaling

    def _local_weight(self) -> torch.Tensor:
        return self.weight.ds_tensor.data if hasattr(self.weight, "ds_tensor") else self.weight.data

    @torch.no_grad()
    def merge(self) -> None:
        """weight += delta. The exact pre-merge weights (this rank's part) are kept on CPU so
        unmerge restores them bit for bit: W + d - d drifts in bf16, and a frozen base weight
        (`--only_optimize_lora`) is never rewritten from fp32 master weights to undo the drift."""
        if self.merged:
            return
        self._backup = self._local_weight().detach().to("cpu", copy=True)
        with _gathered([self.weight, self.lora_right_weight, self.lora_left_weight], modifier_rank=0):
            self.weight.data += self.delta_weight().to(self.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self._local_weight().copy_(self._backup)
        self._backup = None
        self.merged = False


def convert_linear_layer_to_lora(
    model: nn.Module, lora_module_name: str, lora_dim: int, lora_scaling: float = 1.0, lora_dropout: float = 0.0
) -> nn.Module:
    """Replace every nn.Linear whose qualified name contains one of the comma-separated
    `lora_module_name` parts (DeepSpeed-Chat default "decoder.layers.") by a LoRALinear."""
    parts = [p.strip() for p in lora_module_name.split(",") if p.strip()]
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(p in n for p in parts)]
    if not targets:
        raise ValueError(f"no nn.Linear module name contains any of {parts}")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), lora_dim, lora_scaling, lora_dropout))
    return model


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in lora_modules(model))


def is_lora_param(name: str) -> bool:
    return any(k in name for k in LORA_KEYS)


def only_optimize_lora_parameters(model: nn.Module) -> nn.Module:
    """Freeze everything but the adapters (`--only_optimize_lora`)."""
    for name, p in model.named_parameters():
        p.requires_grad = is_lora_param(name)
    return model


def optimizer_param_groups(
    model: nn.Module, weight_decay: float, lora_lr: float | None = None,
    no_decay_names: tuple[str, ...] = ("bias", "layer_norm.weight", "layernorm.weight", "norm.weight", "ln_f.weight"),
) -> list[dict]:
    """DeepSpeed-Chat's grouping: decayed, decayed LoRA (own lr when given), not decayed."""
    groups = {"decay": [], "lora": [], "no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if any(nd in name for nd in no_decay_names):
            groups["no_decay"].append(p)
        elif is_lora_param(name):
            groups["lora"].append(p)
        else:
            groups["decay"].append(p)
    out = [{"params": groups["decay"], "weight_decay": weight_decay}]
    lora_group = {"params": groups["lora"], "weight_decay": weight_decay}
    if lora_lr is not None:
        lora_group["lr"] = lora_lr
    out += [lora_group, {"params": groups["no_decay"], "weight_decay": 0.0}]
    return [g for g in out if g["params"]]


def merge_lora(model: nn.Module) -> None:
    for m in lora_modules(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model):
        m.unmerge()


@contextmanager
def lora_merged(model: nn.Module):
    """Within the block the adapters are folded into the base weights (for generation engines and
    HF-format saves); unfolded again on exit so training continues on the factored form."""
    merge_lora(model)
    try:
        yield model
    finally:
        unmerge_lora(model)


def strip_lora_keys(state_dict: dict) -> dict:
    """Drop adapter tensors; with the adapters merged what remains is a plain HF state dict."""
    return {k: v for k, v in state_dict.items() if not is_lora_param(k)}
