"""HybridEngine on CPU against HuggingFace: greedy outputs equal token for token (torch ops backend
and the Triton interpreter), teacher-forced logprobs agree, preemption, n answers sharing blocks,
EOS handling, LoRA (peft), release / re-sync, sampling."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from hybrid import ops
from hybrid.config import CacheConfig, EngineConfig, SamplingParams
from hybrid.engine import HybridEngine, engine_supported
from hybrid.models.base import set_fuse_kv_write

VOCAB = 97


def tiny(family: str, seed: int = 0):
    torch.manual_seed(seed)
    if family == "opt":
        cfg = OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4, vocab_size=VOCAB,
                        max_position_embeddings=128, word_embed_proj_dim=64, pad_token_id=1, bos_token_id=2,
                        eos_token_id=3)
        model = OPTForCausalLM(cfg)
    elif family == "opt-350m-style":  # post-LayerNorm, project_in / project_out
        cfg = OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4, vocab_size=VOCAB,
                        max_position_embeddings=128, word_embed_proj_dim=32, do_layer_norm_before=False,
                        pad_token_id=1, bos_token_id=2, eos_token_id=3)
        model = OPTForCausalLM(cfg)
    else:  # llama with grouped-query attention 4 / 2 and llama3 rope scaling
        cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2, rope_theta=500000.0,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
        model = LlamaForCausalLM(cfg)
    return model.eval()


def batch(model, lens, seed=1):
    g = torch.Generator().manual_seed(seed)
    lp = max(lens)
    ids = torch.randint(4, VOCAB, (len(lens), lp), generator=g)
    mask = torch.ones(len(lens), lp, dtype=torch.long)
    for i, n in enumerate(lens):
        mask[i, :lp - n] = 0
        ids[i, :lp - n] = model.config.pad_token_id
    return ids, mask


def hf_greedy(model, ids, mask, new, eos=None, **kw):
    pad = model.config.pad_token_id
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                         pad_token_id=pad, eos_token_id=eos if eos is not None else model.config.eos_token_id, **kw)
    full = torch.full((ids.shape[0], ids.shape[1] + new), pad, dtype=torch.long)
    full[:, :out.shape[1]] = out
    return full


def engine(backend="torch", num_blocks=128, block_size=4, watermark=0.01, **kw):
    cfg = EngineConfig(cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, watermark=watermark),
                       max_num_seqs=8, max_model_len=64, dtype="float32", backend=backend, device="cpu", **kw)
    return HybridEngine(cfg)


@pytest.fixture(autouse=True)
def _restore_ops_backend():
    before = ops.get_backend()
    yield
    ops.set_backend(before)
    set_fuse_kv_write(False)  # engine(fuse_kv_write=True) sets the module-level switch


@pytest.mark.parametrize("fuse", [False, True], ids=["write+attend", "fused-append"])
@pytest.mark.parametrize("family", ["opt", "opt-350m-style", "llama"])
def test_greedy_matches_hf_torch_backend(family, fuse):
    model = tiny(family)
    ids, mask = batch(model, [9, 5, 7, 2, 11])
    eng = engine(decode_steps_per_sync=3, fuse_kv_write=fuse)  # several host round trips
    eng.load_weights(model)
    out = eng.generate(ids, mask, SamplingParams(max_new_tokens=14))
    assert torch.equal(out, hf_greedy(model, ids, mask, 14))
    assert eng.stats.num_decode_chunks > 1 and eng.stats.num_generated_tokens > 0
    st = eng.stats  # the phases account for the wall time (autotune: a no-op on CPU, still timed)
    assert 0 <= st.autotune_s <= st.total_s and st.prefill_s + st.decode_s + st.autotune_s <= st.total_s


@pytest.mark.parametrize("fuse", [False, True], ids=["write+attend", "fused-append"])
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_greedy_matches_hf_triton_interpreter(family, fuse, monkeypatch):
    pytest.importorskip("triton")
    if not ops.triton_usable(torch.device("cpu")):
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")
    calls = {"paged_decode_attention": 0, "paged_decode_attention_append": 0}
    for name in calls:  # which decode attention the layers really call
        def counted(*args, _fn=getattr(ops, name), _name=name):
            calls[_name] += 1
            return _fn(*args)
        monkeypatch.setattr(ops, name, counted)
    model = tiny(family)
    ids, mask = batch(model, [6, 3, 5])
    eng = engine(backend="triton", fuse_kv_write=fuse)
    eng.load_weights(model)
    out = eng.generate(ids, mask, SamplingParams(max_new_tokens=5))
    assert torch.equal(out, hf_greedy(model, ids, mask, 5))
    used = "paged_decode_attention_append" if fuse else "paged_decode_attention"
    assert calls[used] > 0 and sum(calls.values()) == calls[used], calls


def test_eos_retires_rows_and_pads_like_hf():
    model = tiny("llama")
    ids, mask = batch(model, [8, 4, 6, 3], seed=3)
    free_run = hf_greedy(model, ids, mask, 16, eos=-1)[:, ids.shape[1]:]
    eos = int(free_run[0, 5])  # a token row 0 emits mid-answer: it becomes EOS
    want = hf_greedy(model, ids, mask, 16, eos=eos)
    assert (want[:, ids.shape[1]:] == eos).any()
    eng = HybridEngine(engine().config, eos_token_id=eos)
    eng.load_weights(model)
    assert torch.equal(eng.generate(ids, mask, SamplingParams(max_new_tokens=16)), want)
    ignored = eng.generate(ids, mask, SamplingParams(max_new_tokens=16, ignore_eos=True))
    assert torch.equal(ignored[:, ids.shape[1]:], free_run), "ignore_eos must run the full length"
    delayed = eng.generate(ids, mask, SamplingParams(max_new_tokens=16, min_new_tokens=16))
    assert not (delayed[:, ids.shape[1]:] == eos).any(), "min_new_tokens masks EOS"


# the fused op's kernel (triton) under preemption and copy-on-write forks; torch = write + attend
FUSE_CASES = pytest.mark.parametrize("backend,fuse", [("torch", False), ("triton", True)],
                                     ids=["torch-write+attend", "triton-fused-append"])


def _need_backend(backend):
    if backend == "triton" and not ops.triton_usable(torch.device("cpu")):
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")


@FUSE_CASES
def test_pool_exhaustion_preempts_and_still_matches_hf(backend, fuse):
    _need_backend(backend)
    model = tiny("opt")
    ids, mask = batch(model, [9, 5, 7, 2, 11, 6], seed=4)
    eng = engine(num_blocks=14, backend=backend, fuse_kv_write=fuse)
    eng.load_weights(model)
    out = eng.generate(ids, mask, SamplingParams(max_new_tokens=20))
    assert eng.stats.num_preemptions > 0, "the pool was sized to force preemption"
    assert torch.equal(out, hf_greedy(model, ids, mask, 20))


@FUSE_CASES
def test_n_answers_share_prompt_blocks_and_copy_on_write(backend, fuse):
    _need_backend(backend)
    model = tiny("opt")
    ids, mask = batch(model, [9, 6], seed=5)  # prompts end mid-block: forks copy the tail block
    eng = engine(backend=backend, fuse_kv_write=fuse)
    eng.load_weights(model)
    out = eng.generate(ids, mask, SamplingParams(max_new_tokens=8, n=3))
    want = hf_greedy(model, ids, mask, 8).repeat_interleave(3, dim=0)
    assert out.shape == want.shape and torch.equal(out, want)
    assert eng.stats.num_block_copies > 0, "forked rows must copy the shared, partly filled tail block"


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_teacher_forced_logprobs_match_hf(family):
    model = tiny(family)
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (13, 6, 9)]
    prompt_lens = [5, 2, 4]
    eng = engine()
    eng.load_weights(model)
    prefill = eng.prompt_logprobs(seqs)
    decode = eng.teacher_forced_logprobs([s[:p] for s, p in zip(seqs, prompt_lens)],
                                         [s[p:] for s, p in zip(seqs, prompt_lens)])
    for s, p, lp_prefill, lp_decode in zip(seqs, prompt_lens, prefill, decode):
        with torch.no_grad():
            logits = model(torch.tensor([s])).logits[0].float()  # [L, V]
        ref = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(s[1:])[:, None])[:, 0]
        torch.testing.assert_close(lp_prefill, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lp_decode, ref[p - 1:], atol=1e-4, rtol=1e-4)


def test_peft_lora_output_equals_merged_model():
    peft = pytest.importorskip("peft")
    model = tiny("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)  # B starts at zero: make the adapter matter
    ids, mask = batch(model, [7, 4, 9], seed=8)
    eng = engine()
    eng.load_weights(lora)
    out = eng.generate(ids, mask, SamplingParams(max_new_tokens=10))
    merged = lora.merge_and_unload()
    assert torch.equal(out, hf_greedy(merged, ids, mask, 10))
    base_out = hf_greedy(tiny("llama"), ids, mask, 10)
    assert not torch.equal(out, base_out), "the adapter must change the answers"


def test_release_then_generate_and_resync_after_weight_update():
    model = tiny("opt")
    ids, mask = batch(model, [5, 8], seed=9)
    eng = engine(release_weights=False)
    eng.load_weights(model)
    first = eng.generate(ids, mask, SamplingParams(max_new_tokens=6))
    ptrs = [b.data_ptr() for b in eng.model.buffers()]
    eng.release()
    assert eng.storage is None
    with torch.no_grad():  # a "PPO update"
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    eng.load_weights(model)
    assert [b.data_ptr() for b in eng.model.buffers()] == ptrs, "re-sync must reuse the buffers"
    second = eng.generate(ids, mask, SamplingParams(max_new_tokens=6))
    assert torch.equal(second, hf_greedy(model, ids, mask, 6))
    assert not torch.equal(first, second)


def test_sampling_seeded_top_k_1_is_greedy():
    model = tiny("llama")
    ids, mask = batch(model, [6, 3, 8], seed=10)
    eng = engine()
    eng.load_weights(model)
    greedy = eng.generate(ids, mask, SamplingParams(max_new_tokens=8))
    topk1 = eng.generate(ids, mask, SamplingParams(max_new_tokens=8, temperature=1.0, top_k=1))
    assert torch.equal(greedy, topk1)
    a = eng.generate(ids, mask, SamplingParams(max_new_tokens=8, temperature=1.0, seed=123))
    b = eng.generate(ids, mask, SamplingParams(max_new_tokens=8, temperature=1.0, seed=123))
    c = eng.generate(ids, mask, SamplingParams(max_new_tokens=8, temperature=1.0, seed=321))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, greedy)


def test_engine_supported_names_the_reason():
    cfg = EngineConfig(device="cpu", backend="torch")
    assert engine_supported(tiny("opt"), cfg) == (True, "ok")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    ok, why = engine_supported(gpt2, cfg)
    assert not ok and "gpt2" in why


def test_suppressed_tokens_match_hf_suppress_tokens():
    model = tiny("opt")
    ids, mask = batch(model, [7, 4, 9], seed=11)
    lp = ids.shape[1]
    free = hf_greedy(model, ids, mask, 10)[:, lp:]
    ban = (int(free[0, 1]), int(free[2, 3]))  # tokens greedy would pick
    want = hf_greedy(model, ids, mask, 10, suppress_tokens=list(ban))
    eng = engine(decode_steps_per_sync=4)
    eng.load_weights(model)
    out = eng.generate(ids, mask, SamplingParams(max_new_tokens=10, suppress_token_ids=ban))
    assert torch.equal(out, want)
    assert not torch.isin(out[:, lp:], torch.tensor(ban)).any()
    assert not out.is_inference(), "generate() output must be usable in autograd (PPO)"


@pytest.mark.parametrize("keep", [False, True])
def test_graphs_follow_the_pool_across_release(keep):
    """ModelRunner.set_storage: graphs are dropped with the pool unless keep_graphs_across_release,
    and then reused only by a pool at the address and shape they were captured on. (No graphs are
    captured on the CPU: stand-ins fill the table; tests/gpu/test_engine_gpu.py runs the real ones.)"""
    from hybrid.kv_cache.storage import KVCacheStorage
    from hybrid.runner import pool_key

    model = tiny("opt")
    eng = engine(keep_graphs_across_release=keep)
    eng.load_weights(model)
    eng.generate(*batch(model, [5, 8], seed=9), SamplingParams(max_new_tokens=3))
    runner, pool = eng.runner, eng.storage
    runner.graphs[("stand-in",)] = object()
    runner._graphs_pool_key = pool_key(pool)
    eng.release()
    assert eng.storage is None and bool(runner.graphs) == keep  # kept idle only with the option
    runner.set_storage(pool)  # the same pool object again: same address and shape
    assert bool(runner.graphs) == keep and runner.graphs_reused == int(keep)
    other = KVCacheStorage(model.config.num_hidden_layers, pool.num_blocks + 1, pool.block_size,
                           eng.model.num_kv_heads, eng.model.head_dim, pool.kv.dtype, "cpu")
    runner.set_storage(None)
    runner.set_storage(other)  # elsewhere (and larger): never replays a graph captured on the old pool
    assert not runner.graphs and runner._graphs_pool_key is None
    eng.runner.set_storage(eng.storage)
    # generate() still works and says whether it reused graphs (never on the CPU)
    eng.generate(*batch(model, [5, 8], seed=9), SamplingParams(max_new_tokens=3))
    assert eng.stats.graphs_reused is False
