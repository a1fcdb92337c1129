"""Inference-layout models per family, keyed by the HF config's model_type."""
from __future__ import annotations

from hybrid.models.base import AttentionMetadata, InferenceModel
from hybrid.models.llama import LlamaForInference
from hybrid.models.opt import OPTForInference

MODEL_REGISTRY: dict[str, type[InferenceModel]] = {
    "opt": OPTForInference,
    "llama": LlamaForInference,
}


def get_model_class(model_type: str) -> type[InferenceModel] | None:
    return MODEL_REGISTRY.get(model_type)


def build_model(hf_config, dtype, device, max_model_len: int = 0) -> InferenceModel:
    """Empty (uninitialised) inference model of the config's family; load_weights fills it."""
    cls = get_model_class(hf_config.model_type)
    if cls is None:
        raise ValueError(f"no inference model for model_type {hf_config.model_type!r}; "
                         f"supported: {sorted(MODEL_REGISTRY)}")
    if cls is LlamaForInference:
        return cls(hf_config, dtype, device, max_model_len=max_model_len)
    return cls(hf_config, dtype, device)


__all__ = ["AttentionMetadata", "InferenceModel", "MODEL_REGISTRY", "get_model_class", "build_model",
           "OPTForInference", "LlamaForInference"]
