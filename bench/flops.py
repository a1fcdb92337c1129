"""FLOP and byte accounting for stage 3, following DeepSpeed-Chat's `print_throughput_step3`.

DeepSpeed-Chat (applications/DeepSpeed-Chat/dschat/utils/perf.py) counts, per PPO iteration:
- training: Megatron's formula for actor and critic, each over the whole batch of
  prompt + answer tokens, `24 * f * B * s * L * h^2 * (1 + s / (6h) + V / (16 L h))` with
  f = 3 (forward + backward) or 4 with gradient checkpointing; LoRA lowers f by (1 - 2r/h).
  B is the global batch (per-device generation batch x generation batches x PPO epochs x GPUs);
- generation: one forward of the actor over the whole sequence, the same formula with f = 1 on the
  global generation batch (it ignores that decode runs token by token and the reference / reward /
  critic forwards of the experience phase);
- TFLOP/s per GPU = FLOPs / (seconds x GPUs), where generation uses the generation + experience
  time, training the training time, and "effective" (end to end) their sum over the e2e time.
Using the same formula keeps our figures comparable with its published tables.

Decode bytes (for MBU, our addition): every decode step must read the weights once and the live
KV cache of every row; MBU = those bytes / time / measured copy bandwidth (bench/hardware.py).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """What the accounting needs from a HuggingFace config."""

    num_layers: int
    hidden_size: int
    vocab_size: int
    num_params: int
    """Parameters of the model (embeddings included), as DeepSpeed-Chat sums them."""
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config, num_params: int) -> "ModelShape":
        num_layers = getattr(config, "num_hidden_layers", getattr(config, "n_layer", None))
        hidden = getattr(config, "hidden_size", getattr(config, "n_embd", None))
        vocab = getattr(config, "vocab_size", None)
        if not all((num_layers, hidden, vocab)):
            raise ValueError(f"cannot read layers / hidden size / vocab from {type(config).__name__}")
        heads = getattr(config, "num_attention_heads", getattr(config, "n_head", 1))
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        return cls(int(num_layers), int(hidden), int(vocab), int(num_params), int(kv_heads), int(head_dim))

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers, at 2 bytes per element (bf16/fp16 cache)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2


def checkpoint_activations_factor(gradient_checkpointing: bool, lora_dim: int = 0, hidden_size: int = 1) -> float:
    """3 for forward + backward, 4 when activations are recomputed; LoRA subtracts (1 - 2r/h)."""
    factor = 4.0 if gradient_checkpointing else 3.0
    if lora_dim > 0:
        factor -= 1.0 - lora_dim * 2 / hidden_size
    return factor


def megatron_flops(shape: ModelShape, factor: float, batch: int, seq_len: int) -> float:
    """Megatron-LM's FLOPs of `factor` passes over batch x seq_len tokens (DS-Chat's calculate_flops)."""
    L, h, V, s = shape.num_layers, shape.hidden_size, shape.vocab_size, seq_len
    return 24.0 * factor * batch * s * L * h**2 * (1.0 + s / (6.0 * h) + V / (16.0 * L * h))


@dataclass(frozen=True)
class Step3Flops:
    """FLOPs of one PPO iteration over all GPUs, DeepSpeed-Chat's accounting."""

    generation: float
    training: float

    @property
    def total(self) -> float:
        return self.generation + self.training


def step3_flops(
    actor: ModelShape,
    critic: ModelShape,
    batch_per_gpu: int,
    gpus: int,
    prompt_len: int,
    gen_len: int,
    ppo_epochs: int = 1,
    generation_batches: int = 1,
    actor_gradient_checkpointing: bool = False,
    critic_gradient_checkpointing: bool = False,
    actor_lora_dim: int = 0,
    critic_lora_dim: int = 0,
) -> Step3Flops:
    seq_len = prompt_len + gen_len
    train_batch = batch_per_gpu * generation_batches * ppo_epochs * gpus
    fa = checkpoint_activations_factor(actor_gradient_checkpointing, actor_lora_dim, actor.hidden_size)
    fc = checkpoint_activations_factor(critic_gradient_checkpointing, critic_lora_dim, critic.hidden_size)
    training = megatron_flops(actor, fa, train_batch, seq_len) + megatron_flops(critic, fc, train_batch, seq_len)
    generation = megatron_flops(actor, 1.0, batch_per_gpu * gpus, seq_len) * generation_batches
    return Step3Flops(generation=generation, training=training)


def tflops_per_gpu(flops: float, seconds: float, gpus: int) -> float:
    return flops / (seconds * gpus * 1e12) if seconds > 0 else float("nan")


def decode_bytes(
    actor: ModelShape, batch: int, prompt_len: int, gen_len: int, bytes_per_param: int = 2
) -> float:
    """Bytes that must move over the decode steps of one generation (per GPU, batch rows).

    The first answer token comes from the prefill; each of the gen_len - 1 decode steps j = 1..
    reads all weights once plus the KV of prompt_len + j live tokens for every row.
    """
    steps = max(gen_len - 1, 0)
    weights = actor.num_params * bytes_per_param
    live_tokens = steps * prompt_len + steps * (steps + 1) / 2  # sum over j of (prompt_len + j)
    return steps * weights + batch * actor.kv_bytes_per_token * live_tokens


def decode_mbu(bytes_moved: float, seconds: float, copy_bandwidth: float) -> float:
    """Memory-bandwidth utilisation: achieved bytes/s over the card's measured copy bandwidth."""
    if seconds <= 0 or copy_bandwidth <= 0:
        return float("nan")
    return bytes_moved / seconds / copy_bandwidth
