"""Model and tokenizer resolution: a local HuggingFace directory or a built-in name.

Built-in names carry the published architecture of that checkpoint (OPT as released by Meta,
LLaMA-2 7B/13B, Llama-3 8B) plus two tiny models for CPU runs and tests. A built-in name builds the
exact architecture with seeded random weights and says so in the log: benchmarks need shapes, not
knowledge, and nothing is downloaded, ever. Built-in names pair with the byte-level tokenizer
(rlhf/tokenizer.py), so their configs carry its pad/bos/eos ids (256/257/258); every vocabulary
here is larger than the tokenizer's 259 ids. Parameter counts match the released checkpoints
(tests/rlhf/test_models.py checks each one on the meta device).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
from typing import Any, Iterator

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from rlhf.tokenizer import BOS_ID, EOS_ID, PAD_ID, ByteTokenizer

logger = logging.getLogger(__name__)

_BYTE_IDS = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)


def _opt(hidden: int, layers: int, heads: int, **kw: Any) -> dict:
    cfg = dict(
        model_type="opt", vocab_size=50272, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, ffn_dim=4 * hidden, max_position_embeddings=2048,
        word_embed_proj_dim=hidden, do_layer_norm_before=True, activation_function="relu",
        dropout=0.1, attention_dropout=0.0, enable_bias=True, tie_word_embeddings=True,
    )
    cfg.update(kw)
    return cfg


def _llama(hidden: int, inter: int, layers: int, heads: int, kv_heads: int, **kw: Any) -> dict:
    cfg = dict(
        model_type="llama", vocab_size=32000, hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    cfg.update(kw)
    return cfg


BUILTIN_MODELS: dict[str, dict] = {
    # facebook/opt-* configs (Zhang et al., 2022, table 1).
    "opt-125m": _opt(768, 12, 12),
    "opt-350m": _opt(1024, 24, 16, word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": _opt(2048, 24, 32),
    "opt-2.7b": _opt(2560, 32, 32),
    "opt-6.7b": _opt(4096, 32, 32),
    "opt-13b": _opt(5120, 40, 40),
    "opt-30b": _opt(7168, 48, 56),
    "opt-66b": _opt(9216, 64, 72),
    "opt-175b": _opt(12288, 96, 96),
    # meta-llama/Llama-2-{7,13}b-hf and Meta-Llama-3-8B configs.
    "llama-7b": _llama(4096, 11008, 32, 32, 32),
    "llama-13b": _llama(5120, 13824, 40, 40, 40),
    "llama3-8b": _llama(
        4096, 14336, 32, 32, 8, vocab_size=128256, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
    # CPU-sized models for the default run and the tests (vocabulary covers the byte tokenizer).
    "tiny-opt": _opt(64, 2, 4, vocab_size=320, ffn_dim=256, max_position_embeddings=1024, dropout=0.0),
    "tiny-llama": _llama(64, 176, 2, 4, 2, vocab_size=320, max_position_embeddings=1024),
}
"""Built-in name -> HF config kwargs (model_type selects the config class)."""


def builtin_names() -> list[str]:
    return list(BUILTIN_MODELS)


def _looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or name.startswith((".", "~")) or os.path.exists(name)


def _missing_path_error(name: str) -> FileNotFoundError:
    base = os.path.basename(name.rstrip("/"))
    hint = f" (did you mean the built-in name {base!r}?)" if base in BUILTIN_MODELS else ""
    return FileNotFoundError(
        f"model directory {name!r} does not exist{hint}; nothing is downloaded: pass a local "
        f"HuggingFace directory or one of the built-in names {builtin_names()}"
    )


def _classify(name_or_path: str) -> str:
    """'dir' for a local HF directory, 'builtin' for a built-in name; raise otherwise."""
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"model directory {name_or_path!r} has no config.json")
        return "dir"
    if name_or_path in BUILTIN_MODELS:
        return "builtin"
    if _looks_like_path(name_or_path):
        raise _missing_path_error(name_or_path)
    raise ValueError(f"unknown model {name_or_path!r}: not a local directory nor a built-in name {builtin_names()}")


def resolve_config(name_or_path: str) -> PretrainedConfig:
    """The HF config of a local directory or a built-in name (a fresh copy each call)."""
    if _classify(name_or_path) == "dir":
        return AutoConfig.from_pretrained(os.path.expanduser(name_or_path))
    kwargs = copy.deepcopy(BUILTIN_MODELS[name_or_path])
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, **kwargs, **_BYTE_IDS)
    config.name_or_path = name_or_path
    return config


@contextlib.contextmanager
def _zero3_context(ds_config: dict | None) -> Iterator[Any]:
    """HF's ZeRO-3 construction switch: an alive HfDeepSpeedConfig makes from_config/from_pretrained
    build under deepspeed.zero.Init. Without ZeRO-3 we hide any earlier one (e.g. the actor's) so a
    ZeRO-0 reward model in the same process is not partitioned by accident."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    zero3 = bool(ds_config) and int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3
    if zero3:
        dschf = hf_ds.HfDeepSpeedConfig(ds_config)  # sets the weak ref; the model keeps it alive
        yield dschf
        return
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield None
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


@contextlib.contextmanager
def _random_init_device(zero3: bool) -> Iterator[None]:
    """Random built-in weights are drawn on this rank's GPU when there is one: a 6.7B model's
    initialisation takes minutes on the host and seconds on the card, and the engines move it there
    anyway. Kept on the host under ZeRO-3 (zero.Init places the partitions itself) and inside an
    explicit `with torch.device(...)` of the caller."""
    if zero3 or not torch.cuda.is_available() or torch.get_default_device().type != "cpu":
        yield
        return
    device = torch.cuda.current_device()
    with torch.random.fork_rng(devices=[device]), torch.device("cuda", device):
        yield


def _load(auto_cls: Any, name_or_path: str, dtype: torch.dtype, ds_config: dict | None, seed: int) -> Any:
    kind = _classify(name_or_path)
    with _zero3_context(ds_config) as dschf:
        if kind == "dir":
            model = auto_cls.from_pretrained(os.path.expanduser(name_or_path), dtype=dtype)
            logger.info("loaded %s from %s (%s)", type(model).__name__, name_or_path, dtype)
        else:
            config = resolve_config(name_or_path)
            with torch.random.fork_rng(devices=[]), _random_init_device(dschf is not None):
                torch.manual_seed(seed)
                model = auto_cls.from_config(config, dtype=dtype)
            logger.warning(
                "built-in model %r: built the published architecture with RANDOM weights (seed %d, %s, "
                "%s parameters); nothing was downloaded", name_or_path, seed, dtype,
                f"{count_parameters(config):,}",
            )
    if dschf is not None:
        model._hf_ds_config = dschf  # keeps HF's ZeRO-3 switch alive as long as the model
        logger.info("built %s under DeepSpeed ZeRO-3 (zero.Init)", name_or_path)
    return model


def load_causal_lm(
    name_or_path: str, dtype: torch.dtype = torch.float32, ds_config: dict | None = None, seed: int = 0
) -> Any:
    """A `PreTrainedModel` with an LM head: from a local HF directory, or a built-in name with seeded
    random weights. ds_config with zero_optimization.stage == 3 builds it partitioned (zero.Init)."""
    return _load(AutoModelForCausalLM, name_or_path, dtype, ds_config, seed)


def load_base_model(
    name_or_path: str, dtype: torch.dtype = torch.float32, ds_config: dict | None = None, seed: int = 0
) -> Any:
    """The transformer trunk (AutoModel, no LM head) for reward / critic models. Note OPT-350m's
    trunk outputs word_embed_proj_dim (512) features, not hidden_size."""
    return _load(AutoModel, name_or_path, dtype, ds_config, seed)


def load_tokenizer(name_or_path: str) -> Any:
    """The directory's tokenizer (ours when its tokenizer_config marks it), or the byte tokenizer for
    a built-in name. pad_token_id is always set (falls back to eos)."""
    kind = _classify(name_or_path)
    path = os.path.expanduser(name_or_path)
    if kind == "builtin":
        logger.info("built-in model %r uses the byte-level tokenizer (259 ids)", name_or_path)
        return ByteTokenizer()
    if ByteTokenizer.is_byte_tokenizer_dir(path):
        return ByteTokenizer.from_pretrained(path)
    has_files = any(
        os.path.isfile(os.path.join(path, f))
        for f in ("tokenizer_config.json", "tokenizer.json", "vocab.json", "tokenizer.model")
    )
    if not has_files:
        raise FileNotFoundError(f"model directory {name_or_path!r} has no tokenizer files")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
        logger.info("tokenizer of %s has no pad token: using eos (%r)", name_or_path, tok.eos_token)
    return tok


def count_parameters(config: PretrainedConfig | str) -> int:
    """Parameters of the causal LM (tied embeddings counted once), built on the meta device."""
    if isinstance(config, str):
        config = resolve_config(config)
    with _zero3_context(None), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())
