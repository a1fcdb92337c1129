"""Fused decode attention with KV append (ops.paged_decode_attention_append) on the GPU:

- both backends (triton, cuda) equal write_kv_cache + paged_decode_attention in bf16 at OPT-1.3B,
  LLaMA-7B and Llama-3-8B (GQA 4) shapes, with inactive rows (slot -1, seq_len 0), seq_len 1,
  block-boundary lengths and forced split-K; the caches afterwards equal the reference write;
- the fused op captured in a CUDA graph and replayed on new inputs;
- the engine: greedy output with fuse_kv_write on == off == HF on tiny fp32 models (CUDA graphs,
  backends triton / cuda / auto), and with it on no decode step launches a write_kv_cache kernel;
- a timing row per (batch, fuse): OPT-1.3B-shaped engine (random bf16 weights), decode step ms from
  the engine's own timer at batch 16 and 64, fuse off / on alternated on the same engine, to
  $OUT/fused_append.jsonl.

    OMP_NUM_THREADS=4 python3 -m pytest -q -s -m gpu tests/gpu/test_fused_append_gpu.py -p no:cacheprovider
"""
import json
import os
import statistics

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from hybrid import ops
from hybrid.config import CacheConfig, EngineConfig, SamplingParams
from hybrid.engine import HybridEngine
from hybrid.models.base import set_fuse_kv_write
from hybrid.ops import reference
from hybrid.ops.testing import assert_matches, random_block_tables

pytestmark = pytest.mark.gpu

DEV = "cuda"
SHAPES = {  # num_heads, num_kv_heads, head_size
    "opt-1.3b": (32, 32, 64),
    "llama-7b": (32, 32, 128),
    "llama3-8b": (32, 8, 128),
}


@pytest.fixture(autouse=True)
def _restore_state():
    before = ops.get_backend()
    yield
    ops.set_backend(before)
    set_fuse_kv_write(False)


def _record(row: dict) -> None:
    row = dict(row, device=torch.cuda.get_device_name())
    print(json.dumps(row))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "fused_append.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


def _backends():
    out = ["triton"]
    if ops.cuda_ext_available():
        out.append("cuda")
    return out


def _inputs(shape, seq_lens, dtype=torch.bfloat16, block_size=16, max_blocks=None, seed=0):
    """q/k/v as views of one fused projection (as the models make them), caches, tables, and
    decode_prepare-style slots (position seq_len - 1; -1 for seq_len 0)."""
    num_heads, num_kv_heads, head_size = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    batch = len(seq_lens)
    need = sum(-(-n // block_size) for n in seq_lens)
    num_blocks = need + need // 4 + 8
    max_blocks = max_blocks or max(1, max(-(-n // block_size) for n in seq_lens))
    bt = random_block_tables(seq_lens, block_size, num_blocks, max_blocks, g, DEV)
    kc = torch.randn(num_blocks, block_size, num_kv_heads, head_size, device=DEV, dtype=dtype)
    vc = torch.randn_like(kc)
    qkv = torch.randn(batch, (num_heads + 2 * num_kv_heads) * head_size, device=DEV, dtype=dtype)
    q = qkv[:, :num_heads * head_size].view(batch, num_heads, head_size)
    k = qkv[:, num_heads * head_size:(num_heads + num_kv_heads) * head_size].view(batch, num_kv_heads, head_size)
    v = qkv[:, (num_heads + num_kv_heads) * head_size:].view(batch, num_kv_heads, head_size)
    return q, k, v, kc, vc, _slots(bt, seq_lens, block_size), bt, torch.tensor(seq_lens, dtype=torch.int32, device=DEV)


def _slots(bt, seq_lens, block_size=16):
    """decode_prepare's slots: position seq_len - 1 of the row's table, -1 for seq_len 0."""
    bt_host = bt.cpu()
    return torch.tensor([int(bt_host[i, (n - 1) // block_size]) * block_size + (n - 1) % block_size if n else -1
                         for i, n in enumerate(seq_lens)], dtype=torch.int64, device=DEV)


def _fused(backend, **knobs):
    if not knobs:
        return ops.get_impl("paged_decode_attention_append", backend)
    if backend == "triton":
        from hybrid.ops.paged_attention import paged_decode_attention_append
    else:
        from hybrid.ops.cuda_backend import paged_decode_attention_append
    return lambda *a: paged_decode_attention_append(*a, **knobs)


CASES = [  # (shape, seq_lens, triton knobs, cuda knobs)
    ("opt-1.3b", [256, 0, 1, 17, 32, 255, 129, 64] * 2, {}, {}),
    ("opt-1.3b", [1000, 0, 1, 513], {"partition_size": 256}, {"num_splits": 3}),  # split-K
    ("llama-7b", [300, 1, 0, 16, 200], {}, {}),
    ("llama-7b", [2048, 1, 0, 33], {"partition_size": 256}, {"num_splits": 5}),
    ("llama3-8b", [700, 0, 1, 48, 333, 2], {}, {}),
    ("llama3-8b", [1500, 1, 0, 97], {"partition_size": 512}, {"num_splits": 4}),
    ("llama3-8b", [129, 64, 1], {}, {"heads_per_cta": 2}),  # several CTAs per kv head: one writes
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fused_equals_write_then_attend_bf16(backend, case):
    if backend not in _backends():
        pytest.skip("CUDA extension unavailable")
    shape, seq_lens, tknobs, cknobs = CASES[case]
    q, k, v, kc, vc, slots, bt, sl = _inputs(shape, seq_lens, seed=case)
    scale = SHAPES[shape][2] ** -0.5
    # the reference in fp32 (write then attend) and the backend's own two-launch path
    kc32, vc32 = kc.float(), vc.float()
    ref = reference.paged_decode_attention_append(q.float(), k.float(), v.float(), kc32, vc32, slots, bt, sl, scale)
    kc2, vc2 = kc.clone(), vc.clone()
    ops.get_impl("write_kv_cache", backend)(k, v, kc2, vc2, slots)
    two = ops.get_impl("paged_decode_attention", backend)(q, kc2, vc2, bt, sl, scale)
    # poison the target slots: the fused kernel must take the step's token from k / v
    live = slots[slots >= 0]
    kc.view(-1, *kc.shape[2:])[live] = float("nan")
    vc.view(-1, *vc.shape[2:])[live] = float("nan")
    out = _fused(backend, **(tknobs if backend == "triton" else cknobs))(q, k, v, kc, vc, slots, bt, sl, scale)
    torch.cuda.synchronize()
    assert_matches(out, ref, torch.bfloat16, what=f"{backend} fused vs fp32 reference")
    assert_matches(out, two.float(), torch.bfloat16, what=f"{backend} fused vs write + attend")
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2), "cache after the fused op != write_kv_cache's"
    dead = sl == 0
    assert torch.equal(out[dead], torch.zeros_like(out[dead]))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fused_captured_in_cuda_graph(backend):
    if backend not in _backends():
        pytest.skip("CUDA extension unavailable")
    shape = "opt-1.3b"
    seq_lens = [200, 0, 1, 77, 150, 13]  # + 2 tokens stay inside each row's allocated blocks
    q, k, v, kc, vc, slots, bt, sl = _inputs(shape, seq_lens, max_blocks=16, seed=5)
    scale = 0.125
    fn = ops.get_impl("paged_decode_attention_append", backend)
    static = [t.clone() for t in (q, k, v, slots, sl)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(static[0], static[1], static[2], kc, vc, static[3], bt, static[4], scale)  # warm-up, compile
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(static[0], static[1], static[2], kc, vc, static[3], bt, static[4], scale)
    for step in range(3):  # a new token per live row each replay: the next position, same table
        lens = [n + 1 if n else 0 for n in seq_lens] if step else seq_lens
        q2, k2, v2 = (torch.randn_like(t) for t in (q, k, v))
        slots2 = _slots(bt, lens)
        sl2 = torch.tensor(lens, dtype=torch.int32, device=DEV)
        for dst, src in zip(static, (q2, k2, v2, slots2, sl2)):
            dst.copy_(src)
        kref, vref = kc.float().clone(), vc.float().clone()
        ref = reference.paged_decode_attention_append(q2.float(), k2.float(), v2.float(), kref, vref, slots2, bt,
                                                      sl2, scale)
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(out, ref, torch.bfloat16, what=f"{backend} graph replay {step}")
        torch.testing.assert_close(kc.float(), kref, rtol=0, atol=0)
        seq_lens = lens


# ---- engine: fuse on == fuse off == HF, no decode-time write_kv_cache kernels --------------------

def _tiny(family: str):
    torch.manual_seed(0)
    if family == "opt":  # head_size 32: every backend (csrc/ has no head_size 16)
        cfg = OPTConfig(hidden_size=128, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4, vocab_size=257,
                        max_position_embeddings=256, word_embed_proj_dim=128, pad_token_id=1, eos_token_id=3)
        return OPTForCausalLM(cfg).cuda().eval()
    cfg = LlamaConfig(hidden_size=256, num_hidden_layers=2, intermediate_size=384, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=257, max_position_embeddings=256, pad_token_id=0,
                      eos_token_id=2)
    return LlamaForCausalLM(cfg).cuda().eval()


def _batch(model, lens, seed=1):
    g = torch.Generator().manual_seed(seed)
    lp = max(lens)
    ids = torch.randint(4, model.config.vocab_size, (len(lens), lp), generator=g)
    mask = torch.ones(len(lens), lp, dtype=torch.long)
    for i, n in enumerate(lens):
        mask[i, :lp - n] = 0
        ids[i, :lp - n] = model.config.pad_token_id
    return ids.cuda(), mask.cuda()


def _kernel_names(fn) -> list[str]:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]  # graph replays included


@pytest.mark.parametrize("backend", ["triton", "cuda", "auto"])
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_engine_greedy_fuse_on_equals_off(family, backend):
    if backend == "cuda" and "cuda" not in _backends():
        pytest.skip("CUDA extension unavailable")
    model = _tiny(family)
    ids, mask = _batch(model, [17, 5, 40, 9, 23, 1])
    new = 24
    hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, pad_token_id=model.config.pad_token_id)
    outs, writes = {}, {}
    for fuse in (False, True):
        eng = HybridEngine(EngineConfig(cache=CacheConfig(block_size=16, num_blocks=256), max_num_seqs=8,
                                        max_model_len=128, dtype="float32", backend=backend, device=DEV,
                                        fuse_kv_write=fuse))
        eng.load_weights(model)
        params = SamplingParams(max_new_tokens=new, min_new_tokens=new)
        eng.generate(ids, mask, params)  # graphs captured, kernels compiled
        names = _kernel_names(lambda: outs.__setitem__(fuse, eng.generate(ids, mask, params)))
        writes[fuse] = sum("write_kv_cache" in n for n in names)
        prefill_steps = eng.stats.num_prefill_steps
        eng.release()
        del eng
    assert torch.equal(outs[True], outs[False]), "fuse_kv_write changed the greedy output"
    assert torch.equal(outs[True][:, :hf.shape[1]], hf), "fused engine != HF greedy"
    layers = model.config.num_hidden_layers
    assert writes[True] == layers * prefill_steps, f"decode steps still launch write_kv_cache: {writes}"
    assert writes[False] > writes[True], writes


# ---- timing: OPT-1.3B engine decode step, fuse off vs on --------------------------------------

def test_opt_1_3b_decode_step_fuse_on_vs_off():
    cfg = OPTConfig(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                    vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2048)
    torch.manual_seed(0)
    with torch.device(DEV):
        model = OPTForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()
    prompt, gen = 256, 128
    eng = HybridEngine(EngineConfig(cache=CacheConfig(gpu_memory_utilization=0.8), max_num_seqs=64,
                                    max_model_len=prompt + gen, dtype="bfloat16", device=DEV))
    eng.load_weights(model)
    for batch in (16, 64):
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(4, cfg.vocab_size, (batch, prompt), generator=g).to(DEV)
        mask = torch.ones_like(ids)
        params = SamplingParams(max_new_tokens=gen, ignore_eos=True)
        steps = {False: [], True: []}
        outs = {}
        for rep in range(3):
            for fuse in (False, True):  # alternated, so drift hits both alike
                eng.release()  # drops the captured graphs: the switch is read while tracing
                eng.config.fuse_kv_write = fuse
                set_fuse_kv_write(fuse)
                eng.load_weights(model)
                eng.generate(ids, mask, params)  # pool, graph capture
                outs[fuse] = eng.generate(ids, mask, params)
                steps[fuse].append(eng.stats.per_step_ms)
        off, on = statistics.median(steps[False]), statistics.median(steps[True])
        # bf16 greedy over 128 steps of a random model: report, not assert, token agreement
        agree = (outs[True] == outs[False]).float().mean().item()
        _record({"test": "fused_append_engine", "model": "opt-1.3b", "batch": batch, "prompt_len": prompt,
                 "gen_len": gen, "backend": ops.get_backend(),
                 "auto_cuda_ops": sorted(ops._auto_cuda_ops),
                 "step_ms_fuse_off": round(off, 4), "step_ms_fuse_on": round(on, 4),
                 "saved_us_per_step": round(1e3 * (off - on), 1), "speedup": round(off / on, 4),
                 "step_ms_off_all": [round(x, 4) for x in steps[False]],
                 "step_ms_on_all": [round(x, 4) for x in steps[True]],
                 "token_agreement": round(agree, 4)})
        assert off > 0 and on > 0
    eng.release()
