"""Pure-PyTorch reference of every op in hybrid/ops (the "torch" backend and the tests' oracle).

Each function has the exact signature and semantics of its Triton kernel. They compute in fp32 and
cast back to the input dtype, so they serve as the higher-precision reference on GPU as well.
The decode-path ops (paged attention, norms, rotary, activations) are free of host syncs, so the
"torch" backend can be captured in a CUDA graph; write_kv_cache and prefill_attention are not
(boolean mask / per-sequence loop), which only matters for the torch backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, slot = block * block_size + offset; < 0 skips
) -> None:
    num_blocks, block_size, num_kv_heads, head_size = key_cache.shape
    flat_k = key_cache.view(num_blocks * block_size, num_kv_heads, head_size)
    flat_v = value_cache.view(num_blocks * block_size, num_kv_heads, head_size)
    valid = slot_mapping >= 0  # [num_tokens]
    slots = slot_mapping[valid]  # boolean indexing syncs; reference only
    flat_k[slots] = key[valid].to(key_cache.dtype)
    flat_v[slots] = value[valid].to(value_cache.dtype)


def paged_decode_attention(
    query: torch.Tensor,  # [batch, num_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    block_tables: torch.Tensor,  # [batch, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [batch] int32
    scale: float,
) -> torch.Tensor:  # [batch, num_heads, head_size]
    """One query token per row attends to the first seq_lens[b] cached tokens of its block table.

    Gathers the whole (padded) block table, so memory is batch * max_blocks_per_seq * block_size.
    Rows with seq_len 0 return zeros. Entries of block_tables past a row's last block may hold
    anything (they are clamped for the gather and masked out).
    """
    batch, num_heads, head_size = query.shape
    num_blocks, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    max_blocks = block_tables.shape[1]
    max_len = max_blocks * block_size
    bt = block_tables.long().clamp(0, num_blocks - 1)  # [batch, max_blocks]
    k = key_cache[bt].reshape(batch, max_len, num_kv_heads, head_size).float()  # [B, L, Hkv, D]
    v = value_cache[bt].reshape(batch, max_len, num_kv_heads, head_size).float()  # [B, L, Hkv, D]
    q = query.float().view(batch, num_kv_heads, group, head_size)  # [B, Hkv, G, D]
    scores = torch.einsum("bhgd,blhd->bhgl", q, k) * scale  # [B, Hkv, G, L]
    pos = torch.arange(max_len, device=query.device)  # [L]
    live = pos[None, :] < seq_lens.long()[:, None]  # [B, L]
    scores = scores.masked_fill(~live[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all -inf rows (seq_len 0) -> 0
    out = torch.einsum("bhgl,blhd->bhgd", probs, v)  # [B, Hkv, G, D]
    return out.reshape(batch, num_heads, head_size).to(query.dtype)


def paged_decode_attention_append(
    query: torch.Tensor,  # [batch, num_heads, head_size]
    key: torch.Tensor,  # [batch, num_kv_heads, head_size]: the step's keys
    value: torch.Tensor,  # [batch, num_kv_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size], written in place
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size], written in place
    slot_mapping: torch.Tensor,  # [batch] int64; < 0 skips the write
    block_tables: torch.Tensor,  # [batch, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [batch] int32, counting the current token
    scale: float,
) -> torch.Tensor:  # [batch, num_heads, head_size]
    """The fused decode op's definition: write_kv_cache, then paged_decode_attention. (The kernels
    read the current token from key/value instead of the cache, which agrees whenever slot_mapping
    holds the slot of position seq_len - 1 of each row's table, as decode_prepare makes it.)"""
    write_kv_cache(key, value, key_cache, value_cache, slot_mapping)
    return paged_decode_attention(query, key_cache, value_cache, block_tables, seq_lens, scale)


def prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    cu_seqlens: torch.Tensor,  # [batch + 1] int32, prefix sums of the sequence lengths
    max_seqlen: int,
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_size]
    """Causal attention within each packed sequence, by SDPA one sequence at a time (syncs)."""
    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        q = query[start:end].transpose(0, 1)  # [H, L, D]
        k = key[start:end].transpose(0, 1).repeat_interleave(group, dim=0)  # [H, L, D]
        v = value[start:end].transpose(0, 1).repeat_interleave(group, dim=0)  # [H, L, D]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)  # [H, L, D]
        out[start:end] = o.transpose(0, 1)
    return out


def add_layernorm(
    x: torch.Tensor,  # [num_tokens, hidden]
    residual: torch.Tensor | None,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    bias: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual_out = x + residual (rounded to x.dtype, as HF adds in the model dtype);
    normed = LayerNorm(residual_out) computed in fp32 with fp32 weight and bias."""
    r = x.float() if residual is None else x.float() + residual.float()
    residual_out = r.to(x.dtype)  # [T, C]
    h = residual_out.float()
    mean = h.mean(-1, keepdim=True)
    var = (h - mean).pow(2).mean(-1, keepdim=True)
    normed = (h - mean) * torch.rsqrt(var + eps) * weight.float() + bias.float()
    return normed.to(x.dtype), residual_out


def embed_layernorm(ids, table, pos_ids, pos_table, pos_offset: int, weight, bias, eps: float):
    """add_layernorm(table[ids], pos_table[pos_ids + pos_offset]) (OPT's embeddings + first LN)."""
    return add_layernorm(table[ids], pos_table[pos_ids + pos_offset], weight, bias, eps)


def embed_rmsnorm(ids, table, weight, eps: float):
    """add_rmsnorm(table[ids], None) (LLaMA's embedding + first RMSNorm)."""
    return add_rmsnorm(table[ids], None, weight, eps)


def add_rmsnorm(
    x: torch.Tensor,  # [num_tokens, hidden]
    residual: torch.Tensor | None,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF LlamaRMSNorm on residual_out = x + residual: fp32 statistics, the normalised value cast
    back to the model dtype, then multiplied by the weight in the model dtype."""
    r = x.float() if residual is None else x.float() + residual.float()
    residual_out = r.to(x.dtype)  # [T, C]
    h = residual_out.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    normed = (h.to(x.dtype).float() * weight.float()).to(x.dtype)
    return normed, residual_out


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_size], rotated in place
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size], rotated in place
    cos_sin_cache: torch.Tensor,  # [max_position, rot_dim]: cos in [:rot_dim/2], sin in [rot_dim/2:]
    is_neox: bool = True,
) -> None:
    """Rotates the first rot_dim features of every head. Neox style (HF LLaMA rotate_half) pairs
    feature i with i + rot_dim/2; GPT-J style pairs 2i with 2i + 1."""
    rot_dim = cos_sin_cache.shape[1]
    half = rot_dim // 2
    cs = cos_sin_cache[positions].float()  # [T, rot_dim]
    cos, sin = cs[:, None, :half], cs[:, None, half:]  # [T, 1, half]
    for x in (query, key):
        rot = x[..., :rot_dim].float()  # [T, heads, rot_dim]
        if is_neox:
            x1, x2 = rot[..., :half], rot[..., half:]
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        if is_neox:
            out = torch.cat([o1, o2], dim=-1)
        else:
            out = torch.stack([o1, o2], dim=-1).flatten(-2)
        x[..., :rot_dim] = out.to(x.dtype)


def relu(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # x: [num_tokens, 2 * inter] -> [T, inter]
    inter = x.shape[-1] // 2
    gate, up = x[..., :inter].float(), x[..., inter:].float()
    return (F.silu(gate) * up).to(x.dtype)


def decode_prepare(
    positions: torch.Tensor,  # [b] int64
    remaining: torch.Tensor,  # [b] int64; <= 0 marks an inactive row
    block_tables: torch.Tensor,  # [b, max_blocks] int32
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # slot_mapping [b] int64 (-1 inactive), seq_lens [b] int32
    """Decode attention metadata: each active row writes its token at its table's block
    pos // block_size (clamped to the table width), offset pos % block_size, and attends to pos + 1
    tokens; inactive rows get slot -1 and seq_len 0."""
    active = remaining > 0  # [b]
    idx = (positions // block_size).clamp(max=block_tables.shape[1] - 1)  # [b]
    blk = block_tables.gather(1, idx[:, None])[:, 0].long()  # [b]
    slots = torch.where(active, blk * block_size + positions % block_size, -1)
    seq_lens = torch.where(active, positions + 1, 0).to(torch.int32)
    return slots, seq_lens


def ban_eos(
    logits: torch.Tensor,  # [b, V], in place
    num_generated: torch.Tensor,  # [b] int64
    min_new_tokens: torch.Tensor,  # [b] int64
    eos_ids: torch.Tensor,  # [E] int64
) -> None:
    """logits[i, e] = -inf for every e in eos_ids while num_generated[i] < min_new_tokens[i]."""
    ban = num_generated < min_new_tokens  # [b]
    cols = logits.index_select(1, eos_ids).masked_fill(ban[:, None], float("-inf"))  # [b, E]
    logits.index_copy_(1, eos_ids, cols)


_KEY_MIN = -(2 ** 63)


def greedy_partials(logits: torch.Tensor, num_splits: int | None = None) -> torch.Tensor:
    """logits [b, V] -> int64 keys [b, S]: per contiguous chunk of ceil(V / S) columns, the max of
    (ordered float bits << 32) | (2^32 - 1 - column) (see hybrid/ops/greedy.py)."""
    rows, vocab = logits.shape
    splits = num_splits or min(4, vocab)
    chunk = -(-vocab // splits)
    bits = (logits.float() + 0.0).view(torch.int32)  # -0.0 -> +0.0 first
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).long()  # [b, V]
    cols = torch.arange(vocab, device=logits.device)
    keys = (ordered << 32) | (0xFFFFFFFF - cols)  # [b, V]
    padded = torch.full((rows, splits * chunk), _KEY_MIN, dtype=torch.int64, device=logits.device)
    padded[:, :vocab] = keys
    return padded.view(rows, splits, chunk).amax(-1)  # [b, S]


def greedy_tokens(keys: torch.Tensor) -> torch.Tensor:
    """int64 keys [b, S] from greedy_partials -> argmax token ids [b] int64."""
    return 0xFFFFFFFF - (keys.amax(-1) & 0xFFFFFFFF)


def decode_advance(
    next_tokens: torch.Tensor,  # [b] int64, or [b, S] int64 greedy_partials keys
    input_ids: torch.Tensor,  # [b] int64, in place
    positions: torch.Tensor,  # [b] int64, in place
    remaining: torch.Tensor,  # [b] int64, in place
    num_generated: torch.Tensor,  # [b] int64, in place
    stop_on_eos: torch.Tensor,  # [b] int64
    out_tokens: torch.Tensor,  # [K, b] int64, row step_idx written
    step_idx: torch.Tensor,  # [1] int64, in place
    eos_ids: torch.Tensor,  # [E] int64
    pad_token_id: int,
) -> None:
    """Records the step's tokens (pad for inactive rows) at out_tokens[step_idx] and advances each
    row: next input = the token, position + 1 if active, remaining 0 after an EOS of a
    stop_on_eos row else max(remaining - 1, 0), num_generated + 1; then step_idx + 1.
    A 2-D next_tokens holds greedy_partials keys: the tokens are their argmax (greedy_tokens)."""
    if next_tokens.dim() == 2:
        next_tokens = greedy_tokens(next_tokens)
    active = remaining > 0  # [b]
    tok = torch.where(active, next_tokens, pad_token_id)  # [b]
    out_tokens.index_copy_(0, step_idx, tok[None])
    hit_eos = (stop_on_eos > 0) & (tok[:, None] == eos_ids[None, :]).any(-1)  # [b]
    remaining.copy_(torch.where(hit_eos, 0, (remaining - 1).clamp(min=0)))
    input_ids.copy_(tok)
    positions.add_(active.long())
    num_generated.add_(1)
    step_idx.add_(1)
