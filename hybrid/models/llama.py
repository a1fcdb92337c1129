"""LLaMA for inference: fused qkv, fused gate_up (SwiGLU), RoPE, grouped-query attention, paged KV.

Follows transformers' LlamaForCausalLM: RMSNorm (fp32 statistics), rotary embeddings in the
rotate_half (neox) layout with the config's rope_theta and rope scaling (llama3 included: the
inverse frequencies come from transformers' own rotary module, so every rope type it knows matches),
optional attention / MLP biases, lm_head tied or not.
HF weight names: model.{embed_tokens, norm, layers.N.{self_attn.{q,k,v,o}_proj,
mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm}}, lm_head.
"""
from __future__ import annotations

import torch
from torch import nn

from hybrid import ops
from hybrid.ops import l2_prefetch
from hybrid.models.base import AttentionMetadata, InferenceModel, LinearReader, copy_weight, paged_attention
from hybrid.ops.linear import LinearShape, linear
from hybrid.ops.linear_norm import LinearNormShape, linear_add_norm


def rope_cos_sin_cache(cfg, max_positions: int, device) -> torch.Tensor:
    """[max_positions, head_dim] fp32: cos(pos * inv_freq) in the first half, sin in the second,
    both times transformers' attention_scaling (1 except for yarn / longrope).

    Angles and cos/sin in fp32 exactly as HF computes them, but kept in fp32: HF casts cos/sin to
    the activation dtype and rotates in bf16 (three roundings); the rotary kernel rotates in fp32
    and rounds once, within half a bf16 ulp of the exact rotation (tests/hybrid/test_ops_rotary.py).
    End to end the choice is below bf16 noise: on CPU (torch backend, hidden 4096, random weights)
    the engine's mean |logprob - fp32 HF| was 0.026 (8 layers) / 0.043 (16) with this cache and
    0.031 / 0.040 with it rounded to bf16; HF bf16's own was 0.033 / 0.040."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = LlamaRotaryEmbedding(cfg)
    inv_freq = rope.inv_freq.float().to(device)  # [D / 2]
    pos = torch.arange(max_positions, device=device, dtype=torch.float32)  # [P]
    freqs = pos[:, None] * inv_freq[None, :]  # [P, D / 2]
    scaling = float(rope.attention_scaling)
    return torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1).contiguous()


class LlamaLayer(nn.Module):
    def __init__(self, cfg, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        h, inter = cfg.hidden_size, cfg.intermediate_size
        qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * head_dim
        shapes = {"qkv_w": (qkv, h), "o_w": (h, cfg.num_attention_heads * head_dim),
                  "gate_up_w": (2 * inter, h), "down_w": (h, inter), "ln1_w": (h,), "ln2_w": (h,)}
        attn_bias, mlp_bias = getattr(cfg, "attention_bias", False), getattr(cfg, "mlp_bias", False)
        shapes.update({"qkv_b": (qkv,) if attn_bias else None, "o_b": (h,) if attn_bias else None,
                       "gate_up_b": (2 * inter,) if mlp_bias else None, "down_b": (h,) if mlp_bias else None})
        for name, shape in shapes.items():
            t = None if shape is None else torch.empty(*shape, dtype=dtype, device=device)
            self.register_buffer(name, t, persistent=False)


class LlamaForInference(InferenceModel):
    gathered_only = ("cos_sin_cache",)

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str, max_model_len: int = 0) -> None:
        super().__init__(dtype, device)
        self.cfg = cfg
        self.hidden = cfg.hidden_size
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.vocab_size = cfg.vocab_size
        self.inter = cfg.intermediate_size
        self.scale = self.head_dim ** -0.5
        self.eps = cfg.rms_norm_eps
        self.tied = getattr(cfg, "tie_word_embeddings", False)
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"LLaMA with activation {cfg.hidden_act!r} is not supported")
        self._buf("embed_tokens", cfg.vocab_size, cfg.hidden_size)
        self._buf("norm_w", cfg.hidden_size)
        if not self.tied:
            self._buf("lm_head", cfg.vocab_size, cfg.hidden_size)
            self.gathered_only = ("cos_sin_cache", "embed_tokens")
        max_pos = max(cfg.max_position_embeddings, max_model_len)
        self.register_buffer("cos_sin_cache", rope_cos_sin_cache(cfg, max_pos, self.device), persistent=False)
        self.layers = nn.ModuleList(
            LlamaLayer(cfg, self.head_dim, dtype, self.device) for _ in range(self.num_layers))

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        t = input_ids.shape[0]
        nq, nkv, d = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.head_dim
        layers = self.layers
        # lookup + first RMSNorm in one launch
        x, residual = ops.embed_rmsnorm(input_ids, self.embed_tokens, layers[0].ln1_w, self.eps)
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(layers, kv_caches)):
            qkv = linear(x, layer.qkv_w, layer.qkv_b)  # [T, (H + 2 Hkv) * D]
            q = qkv[:, :nq].view(t, self.num_heads, d)  # [T, H, D]
            k = qkv[:, nq:nq + nkv].view(t, self.num_kv_heads, d)  # [T, Hkv, D]
            v = qkv[:, nq + nkv:].view(t, self.num_kv_heads, d)  # [T, Hkv, D]
            ops.rotary_embedding(positions, q, k, self.cos_sin_cache, True)
            o = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)  # [T, H, D]
            # o_proj / down_proj + residual add + RMSNorm: one launch where linear_add_norm's
            # autotune measured the fused split-K reduce faster
            x, residual = linear_add_norm(o.reshape(t, nq), layer.o_w, layer.o_b, residual, layer.ln2_w,
                                          None, self.eps)
            gate_up = linear(x, layer.gate_up_w, layer.gate_up_b)  # [T, 2 * inter]
            next_norm = layers[i + 1].ln1_w if i + 1 < len(layers) else self.norm_w
            x, residual = linear_add_norm(ops.silu_and_mul(gate_up), layer.down_w, layer.down_b, residual,
                                          next_norm, None, self.eps)
        l2_prefetch.join()
        return x  # the final RMSNorm's output

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, V]
        return linear(hidden, self.embed_tokens if self.tied else self.lm_head)

    def linear_shapes(self) -> list[LinearShape]:
        """Every projection forward / compute_logits runs, for hybrid.ops.linear's autotune."""
        lay = self.layers[0]
        shapes = [LinearShape(*getattr(lay, f"{p}_w").shape, getattr(lay, f"{p}_b") is not None)
                  for p in ("qkv", "o", "gate_up", "down")]
        return shapes + [LinearShape(*(self.embed_tokens if self.tied else self.lm_head).shape)]

    def prefetch_order(self) -> list[torch.Tensor]:
        """The projection weights in the order a decode step reads them (hybrid.ops.l2_prefetch)."""
        order = []
        for lay in self.layers:
            order += [lay.qkv_w, lay.o_w, lay.gate_up_w, lay.down_w]
        return order + [self.embed_tokens if self.tied else self.lm_head]

    def linear_norm_shapes(self) -> list[LinearNormShape]:
        """The projections forward ends in a residual add + RMSNorm (o_proj, down_proj)."""
        lay = self.layers[0]
        return [LinearNormShape(*lay.o_w.shape, lay.o_b is not None, "rms"),
                LinearNormShape(*lay.down_w.shape, lay.down_b is not None, "rms")]

    # ---- weights from the training model -------------------------------------------------
    @staticmethod
    def hf_layers(hf_model: nn.Module) -> list[nn.Module]:
        return list(hf_model.model.layers)

    @staticmethod
    def hf_global_modules(hf_model: nn.Module) -> list[nn.Module]:
        mods = [hf_model.model.embed_tokens, hf_model.model.norm]
        if not getattr(hf_model.config, "tie_word_embeddings", False):
            mods.append(hf_model.get_output_embeddings())
        return mods

    @torch.no_grad()
    def load_globals(self, hf_model: nn.Module, read: LinearReader) -> None:
        w, _, d = read(hf_model.model.embed_tokens)
        copy_weight(self.embed_tokens, w, d)
        copy_weight(self.norm_w, hf_model.model.norm.weight)
        if not self.tied:
            w, _, d = read(hf_model.get_output_embeddings())
            copy_weight(self.lm_head, w, d)

    @torch.no_grad()
    def load_layer(self, i: int, hf_layer: nn.Module, read: LinearReader) -> None:
        layer, attn, mlp = self.layers[i], hf_layer.self_attn, hf_layer.mlp
        nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bounds = ((0, nq), (nq, nq + nkv), (nq + nkv, nq + 2 * nkv))
        for (lo, hi), proj in zip(bounds, (attn.q_proj, attn.k_proj, attn.v_proj)):
            w, b, d = read(proj)
            copy_weight(layer.qkv_w[lo:hi], w, d)
            if layer.qkv_b is not None:
                copy_weight(layer.qkv_b[lo:hi], b)
        for (lo, hi), proj in zip(((0, self.inter), (self.inter, 2 * self.inter)), (mlp.gate_proj, mlp.up_proj)):
            w, b, d = read(proj)
            copy_weight(layer.gate_up_w[lo:hi], w, d)
            if layer.gate_up_b is not None:
                copy_weight(layer.gate_up_b[lo:hi], b)
        for dst, src in (("o", attn.o_proj), ("down", mlp.down_proj)):
            w, b, d = read(src)
            copy_weight(getattr(layer, f"{dst}_w"), w, d)
            if getattr(layer, f"{dst}_b") is not None:
                copy_weight(getattr(layer, f"{dst}_b"), b)
        copy_weight(layer.ln1_w, hf_layer.input_layernorm.weight)
        copy_weight(layer.ln2_w, hf_layer.post_attention_layernorm.weight)
