"""Copy the actor's current weights from the training model into the inference layout.

Accepts a HuggingFace model, a peft model (LoRA adapters merged on the fly: W + B @ A * scale,
the training model is never modified), a model with DeepSpeed-Chat style LoRA layers
(rlhf.lora.LoRALinear: `lora_right_weight` / `lora_left_weight`), or a DeepSpeed engine (its
`.module`). Under ZeRO-3 the partitions are gathered one decoder layer at a time with
deepspeed.zero.GatheredParameters, so peak extra memory is one layer, not the model.
Everything is copy_ into buffers the inference model allocated once (no reallocation per re-sync).
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from hybrid.models.base import InferenceModel

log = logging.getLogger(__name__)


def unwrap_model(model: nn.Module) -> tuple[nn.Module, str]:
    """-> (HF PreTrainedModel, possibly holding LoRA layers; what wrapped it)."""
    kinds = []
    for _ in range(4):  # e.g. DeepSpeedEngine -> PeftModel -> PreTrainedModel
        if type(model).__name__ == "DeepSpeedEngine" or (hasattr(model, "module") and not hasattr(model, "config")):
            kinds.append("deepspeed")
            model = model.module
        elif hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
            kinds.append("peft")
            model = model.get_base_model()
        else:
            break
    return model, "+".join(kinds) or "hf"


def _is_peft_lora(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "get_delta_weight")


@torch.no_grad()
def read_module(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(weight [out, in], bias | None, LoRA delta [out, in] | None) of a linear or embedding."""
    if hasattr(module, "lora_right_weight"):  # DeepSpeed-Chat style LoRALinear
        delta = None if getattr(module, "merged", False) else module.delta_weight()
        return module.weight, module.bias, delta
    if _is_peft_lora(module):
        base = module.base_layer
        delta = None
        if not getattr(module, "disable_adapters", False):
            merged = set(getattr(module, "merged_adapters", []))
            for name in module.active_adapters:
                if name not in module.lora_A and name not in getattr(module, "lora_embedding_A", {}):
                    continue
                if name in merged:
                    continue
                if getattr(module, "use_dora", {}).get(name, False):
                    raise NotImplementedError("DoRA adapters are not supported by the hybrid engine")
                d = module.get_delta_weight(name).float()
                delta = d if delta is None else delta + d
        return base.weight, getattr(base, "bias", None), delta
    return module.weight, getattr(module, "bias", None), None


def _gathered(params: list[torch.Tensor]):
    """Gather ZeRO-3 partitions (read-only) for the block; no-op for ordinary tensors."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


@torch.no_grad()
def load_weights(inference_model: InferenceModel, train_model: nn.Module) -> dict:
    """Fill inference_model's buffers from train_model (any wrapper above). Returns a small report
    (wrapper kinds, whether ZeRO-3 gathering or LoRA merging happened)."""
    hf, wrapped = unwrap_model(train_model)
    layers = inference_model.hf_layers(hf)
    if len(layers) != inference_model.num_layers:
        raise ValueError(f"training model has {len(layers)} layers, the inference copy "
                         f"{inference_model.num_layers}")
    zero3 = any(hasattr(p, "ds_id") for p in hf.parameters())
    lora = any(hasattr(m, "lora_right_weight") or _is_peft_lora(m) for m in hf.modules())
    global_params = [p for m in inference_model.hf_global_modules(hf) for p in m.parameters()]
    with _gathered(global_params):
        inference_model.load_globals(hf, read_module)
    for i, layer in enumerate(layers):
        with _gathered(list(layer.parameters())):
            inference_model.load_layer(i, layer, read_module)
    return {"wrapped": wrapped, "zero3": zero3, "lora": lora}
