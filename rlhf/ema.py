"""Exponential moving average of the actor's weights (DeepSpeed-Chat's `--enable_ema`, 0.992).

The shadow copy is fp32 and holds only what this rank owns: under ZeRO-3 that is the parameter's
local partition (`param.ds_tensor`), so the EMA costs 4 bytes per *partitioned* parameter and no
gather per step. To save it, `swapped_in(model)` copies the shadow into the live weights for the
duration of a `with` block (a normal ZeRO-3-aware save then gathers it) and restores them after.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


def _local(p: torch.nn.Parameter) -> torch.Tensor:
    """The tensor this rank holds for `p`: its ZeRO-3 partition, or the whole parameter."""
    return p.ds_tensor.data if hasattr(p, "ds_tensor") else p.data


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float = 0.992, device: str | None = None):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.device = device
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: _local(p).detach().to(device=device or _local(p).device, dtype=torch.float32, copy=True)
            for name, p in model.named_parameters()
        }

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """shadow = decay * shadow + (1 - decay) * param, for every parameter this rank holds."""
        for name, p in model.named_parameters():
            s = self.shadow[name]
            s.mul_(self.decay).add_(_local(p).to(device=s.device, dtype=s.dtype), alpha=1.0 - self.decay)
        self.num_updates += 1

    @contextmanager
    def swapped_in(self, model: torch.nn.Module):
        """Within the block the model's (local) weights are the EMA weights; restored on exit."""
        backup = {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                t = _local(p)
                backup[name] = t.detach().clone()
                t.copy_(self.shadow[name].to(device=t.device, dtype=t.dtype))
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    _local(p).copy_(backup[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state does not match the model's parameters: {sorted(missing)[:5]}")
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        for name, s in self.shadow.items():
            s.copy_(state["shadow"][name])
