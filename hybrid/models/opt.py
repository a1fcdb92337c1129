"""OPT for inference: fused qkv, paged KV cache, flattened (varlen) tokens.

Follows transformers' OPTForCausalLM: learned positions with offset 2, pre-LayerNorm (125m, 1.3b,
...) or post-LayerNorm (350m, `do_layer_norm_before=False`), ReLU FFN, project_in / project_out
when word_embed_proj_dim != hidden_size (350m), lm_head tied to the input embeddings.
HF weight names: model.decoder.{embed_tokens, embed_positions, project_in, project_out,
final_layer_norm, layers.N.{self_attn.{q,k,v,out}_proj, self_attn_layer_norm, fc1, fc2,
final_layer_norm}}, lm_head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybrid import ops
from hybrid.ops import l2_prefetch
from hybrid.models.base import (AttentionMetadata, InferenceModel, LinearReader, copy_weight, gemm_kv_write,
                                paged_attention)
from hybrid.ops.linear import LinearShape, linear, linear_kv
from hybrid.ops.linear_norm import LinearNormShape, linear_add_norm
from hybrid.ops.mlp import MlpShape, mlp_add_norm

POSITION_OFFSET = 2
LN_EPS = 1e-5  # nn.LayerNorm's default, which HF OPT uses


class OPTLayer(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        h, f = cfg.hidden_size, cfg.ffn_dim
        bias = getattr(cfg, "enable_bias", True)

        def buf(name, *shape, fill=None):
            t = torch.empty(*shape, dtype=dtype, device=device)
            if fill is not None:
                t.fill_(fill)
            self.register_buffer(name, t, persistent=False)

        buf("qkv_w", 3 * h, h)
        buf("o_w", h, h)
        buf("fc1_w", f, h)
        buf("fc2_w", h, f)
        for name, shape in (("qkv_b", 3 * h), ("o_b", h), ("fc1_b", f), ("fc2_b", h)):
            if bias:
                buf(name, shape)
            else:
                self.register_buffer(name, None, persistent=False)
        # LayerNorms without elementwise_affine keep weight 1 / bias 0
        for name in ("ln1", "ln2"):
            buf(f"{name}_w", h, fill=1.0)
            buf(f"{name}_b", h, fill=0.0)
        # fc2_w transposed ([ffn, hidden]) while an "accum" MLP variant reads it
        # (OPTForInference.prepare_decode_layout). Not a buffer: weight_bytes counts fc2 once
        self.fc2_wt: torch.Tensor | None = None


class OPTForInference(InferenceModel):
    gathered_only = ("embed_positions",)

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__(dtype, device)
        if cfg.activation_function != "relu":
            raise ValueError(f"OPT with activation {cfg.activation_function!r} is not supported")
        self.cfg = cfg
        self.hidden = cfg.hidden_size
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = self.num_kv_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.vocab_size = cfg.vocab_size
        self.scale = self.head_dim ** -0.5
        self.pre_ln = cfg.do_layer_norm_before
        self.tied = getattr(cfg, "tie_word_embeddings", True)
        emb_dim = cfg.word_embed_proj_dim
        self._buf("embed_tokens", cfg.vocab_size, emb_dim)
        self._buf("embed_positions", cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size)
        self.projected = emb_dim != cfg.hidden_size
        if self.projected:
            self._buf("project_in", cfg.hidden_size, emb_dim)
            self._buf("project_out", emb_dim, cfg.hidden_size)
        self.has_final_ln = self.pre_ln and not getattr(cfg, "_remove_final_layer_norm", False)
        if self.has_final_ln:
            self._buf("final_ln_w", cfg.hidden_size).fill_(1.0)
            self._buf("final_ln_b", cfg.hidden_size).fill_(0.0)
        if not self.tied:
            self._buf("lm_head", cfg.vocab_size, emb_dim)
        self.layers = nn.ModuleList(OPTLayer(cfg, dtype, self.device) for _ in range(self.num_layers))

    # ---- forward -------------------------------------------------------------------------
    def _attention(self, layer: OPTLayer, x, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        """Self-attention up to (not including) out_proj: [T, hidden] -> [T, hidden]."""
        t, h = x.shape[0], self.hidden
        written = False
        if not meta.is_prefill and gemm_kv_write():  # k / v stored by the GEMM where it can
            qkv, written = linear_kv(x, layer.qkv_w, layer.qkv_b, kv_cache[0], kv_cache[1], meta.slot_mapping, h)
        else:
            qkv = linear(x, layer.qkv_w, layer.qkv_b)  # [T, 3 * hidden]
        q = qkv[:, :h].view(t, self.num_heads, self.head_dim)  # [T, H, D]
        k = qkv[:, h:2 * h].view(t, self.num_heads, self.head_dim)  # [T, H, D]
        v = qkv[:, 2 * h:].view(t, self.num_heads, self.head_dim)  # [T, H, D]
        o = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, kv_written=written)  # [T, H, D]
        return o.reshape(t, h)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, word_embed_proj_dim]
        # every out_proj / fc2 ends in the next residual add + LayerNorm: linear_add_norm fuses them
        # where its autotune measured that faster (split-K reduce + add + norm in one launch)
        layers, eps = self.layers, LN_EPS
        if self.pre_ln and not self.projected:  # both lookups, their sum and the first LN: one launch
            x, residual = ops.embed_layernorm(input_ids, self.embed_tokens, positions, self.embed_positions,
                                              POSITION_OFFSET, layers[0].ln1_w, layers[0].ln1_b, eps)
        else:
            h = F.embedding(input_ids, self.embed_tokens)  # [T, E]
            if self.projected:
                h = linear(h, self.project_in)  # [T, hidden]
            h = h + F.embedding(positions + POSITION_OFFSET, self.embed_positions)  # [T, hidden]
            if self.pre_ln:
                x, residual = ops.add_layernorm(h, None, layers[0].ln1_w, layers[0].ln1_b, eps)
        for i, (layer, kv) in enumerate(zip(layers, kv_caches)):
            if self.pre_ln:
                o = self._attention(layer, x, kv, meta)
                x, residual = linear_add_norm(o, layer.o_w, layer.o_b, residual, layer.ln2_w, layer.ln2_b, eps)
                # fc1 (+ bias, ReLU) -> fc2 -> + residual -> next LN: mlp_add_norm (one persistent
                # launch for both GEMMs where its autotune measured that faster)
                mlp = (layer.fc1_w, layer.fc1_b, layer.fc2_w, layer.fc2_b, residual)
                if i + 1 < len(layers):
                    nxt = layers[i + 1]
                    x, residual = mlp_add_norm(x, *mlp, nxt.ln1_w, nxt.ln1_b, eps, w2t=layer.fc2_wt)
                elif self.has_final_ln:
                    h, _ = mlp_add_norm(x, *mlp, self.final_ln_w, self.final_ln_b, eps, w2t=layer.fc2_wt)
                else:
                    f = linear(x, layer.fc1_w, layer.fc1_b, act="relu")  # [T, ffn], bias + ReLU fused
                    h = linear(f, layer.fc2_w, layer.fc2_b) + residual
            else:  # post-LN (350m): LayerNorm(sublayer(h) + h)
                o = self._attention(layer, h, kv, meta)
                h, _ = linear_add_norm(o, layer.o_w, layer.o_b, h, layer.ln1_w, layer.ln1_b, eps)
                h, _ = mlp_add_norm(h, layer.fc1_w, layer.fc1_b, layer.fc2_w, layer.fc2_b, h, layer.ln2_w,
                                    layer.ln2_b, eps, w2t=layer.fc2_wt)
        if self.projected:
            h = linear(h, self.project_out)  # [T, E]
        l2_prefetch.join()
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, E] -> [N, V]
        return linear(hidden, self.embed_tokens if self.tied else self.lm_head)

    def linear_shapes(self) -> list[LinearShape]:
        """Every projection forward / compute_logits runs, for hybrid.ops.linear's autotune."""
        lay, bias = self.layers[0], self.layers[0].qkv_b is not None
        shapes = [LinearShape(*lay.qkv_w.shape, bias), LinearShape(*lay.o_w.shape, bias),
                  LinearShape(*lay.fc1_w.shape, bias, "relu"), LinearShape(*lay.fc2_w.shape, bias)]
        if self.projected:
            shapes += [LinearShape(*self.project_in.shape), LinearShape(*self.project_out.shape)]
        return shapes + [LinearShape(*(self.embed_tokens if self.tied else self.lm_head).shape)]

    def prefetch_order(self) -> list[torch.Tensor]:
        """The projection weights in the order a decode step reads them (hybrid.ops.l2_prefetch)."""
        order = [self.project_in] if self.projected else []
        for lay in self.layers:
            order += [lay.qkv_w, lay.o_w, lay.fc1_w, lay.fc2_w]
        if self.projected:
            order.append(self.project_out)
        return order + [self.embed_tokens if self.tied else self.lm_head]

    def mlp_shapes(self) -> list[MlpShape]:
        """The fc1 -> ReLU -> fc2 -> add + LayerNorm blocks forward runs through mlp_add_norm."""
        lay = self.layers[0]
        return [MlpShape(lay.fc1_w.shape[1], lay.fc1_w.shape[0], lay.fc1_b is not None, "relu", "layer")]

    @torch.no_grad()
    def prepare_decode_layout(self) -> bool:
        """Gives every layer fc2's transposed copy ([ffn, hidden], read by the "accum" MLP variants)
        once the MLP table uses one (hybrid.ops.mlp.wants_w2t, tuned or forced); load_layer keeps it
        current from then on. Never dropped while the model lives: captured CUDA graphs hold its
        address. Returns whether the copies exist."""
        from hybrid.ops import mlp as mlp_ops

        layers = self.layers
        if layers[0].fc2_wt is None and any(mlp_ops.wants_w2t(s, layers[0].fc2_w.dtype) for s in self.mlp_shapes()):
            with torch.inference_mode(False):  # a normal tensor: load_weights updates it in place later
                for lay in layers:
                    lay.fc2_wt = lay.fc2_w.t().contiguous()
        return layers[0].fc2_wt is not None

    def linear_norm_shapes(self) -> list[LinearNormShape]:
        """The projections forward ends in a residual add + LayerNorm (out_proj, fc2)."""
        lay, bias = self.layers[0], self.layers[0].qkv_b is not None
        return [LinearNormShape(*lay.o_w.shape, bias, "layer"), LinearNormShape(*lay.fc2_w.shape, bias, "layer")]

    # ---- weights from the training model -------------------------------------------------
    @staticmethod
    def hf_layers(hf_model: nn.Module) -> list[nn.Module]:
        return list(hf_model.model.decoder.layers)

    @staticmethod
    def hf_global_modules(hf_model: nn.Module) -> list[nn.Module]:
        dec = hf_model.model.decoder
        mods = [dec.embed_tokens, dec.embed_positions, dec.project_in, dec.project_out, dec.final_layer_norm]
        if not getattr(hf_model.config, "tie_word_embeddings", True):
            mods.append(hf_model.get_output_embeddings())
        return [m for m in mods if m is not None]

    @torch.no_grad()
    def load_globals(self, hf_model: nn.Module, read: LinearReader) -> None:
        dec = hf_model.model.decoder
        w, _, d = read(dec.embed_tokens)
        copy_weight(self.embed_tokens, w, d)
        copy_weight(self.embed_positions, read(dec.embed_positions)[0])
        if self.projected:
            copy_weight(self.project_in, *_wd(read(dec.project_in)))
            copy_weight(self.project_out, *_wd(read(dec.project_out)))
        if self.has_final_ln and dec.final_layer_norm.weight is not None:
            copy_weight(self.final_ln_w, dec.final_layer_norm.weight)
            copy_weight(self.final_ln_b, dec.final_layer_norm.bias)
        if not self.tied:
            copy_weight(self.lm_head, *_wd(read(hf_model.get_output_embeddings())))

    @torch.no_grad()
    def load_layer(self, i: int, hf_layer: nn.Module, read: LinearReader) -> None:
        layer, h, attn = self.layers[i], self.hidden, hf_layer.self_attn
        for j, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
            w, b, d = read(proj)
            copy_weight(layer.qkv_w[j * h:(j + 1) * h], w, d)
            if layer.qkv_b is not None:
                copy_weight(layer.qkv_b[j * h:(j + 1) * h], b)
        for dst, src in (("o", attn.out_proj), ("fc1", hf_layer.fc1), ("fc2", hf_layer.fc2)):
            w, b, d = read(src)
            copy_weight(getattr(layer, f"{dst}_w"), w, d)
            if getattr(layer, f"{dst}_b") is not None:
                copy_weight(getattr(layer, f"{dst}_b"), b)
        if layer.fc2_wt is not None:
            layer.fc2_wt.copy_(layer.fc2_w.t())
        for dst, src in (("ln1", hf_layer.self_attn_layer_norm), ("ln2", hf_layer.final_layer_norm)):
            if src.weight is not None:
                copy_weight(getattr(layer, f"{dst}_w"), src.weight)
                copy_weight(getattr(layer, f"{dst}_b"), src.bias)


def _wd(wbd):
    w, _, d = wbd
    return w, d
