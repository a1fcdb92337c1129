"""HybridEngine on the GPU: teacher-forced logprobs at OPT-1.3B and LLaMA-7B shapes (random bf16
weights) against HF within bf16 tolerance, greedy equality with HF on tiny fp32 models (Triton /
CUDA kernels, CUDA graphs), and the CUDA-graph path equal to the eager path."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from hybrid import ops
from hybrid.config import CacheConfig, EngineConfig, SamplingParams
from hybrid.engine import HybridEngine

pytestmark = pytest.mark.gpu

SHAPES = {
    "opt-1.3b": lambda: OPTConfig(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                                  vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2048),
    "llama-7b": lambda: LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                    max_position_embeddings=4096),
}


def tiny(family: str, seed=0):
    torch.manual_seed(seed)
    if family == "opt":
        cfg = OPTConfig(hidden_size=128, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4, vocab_size=257,
                        max_position_embeddings=256, word_embed_proj_dim=128, pad_token_id=1, eos_token_id=3)
        return OPTForCausalLM(cfg).cuda().eval()
    cfg = LlamaConfig(hidden_size=128, num_hidden_layers=2, intermediate_size=192, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=257, max_position_embeddings=256, pad_token_id=0,
                      eos_token_id=2)
    return LlamaForCausalLM(cfg).cuda().eval()


def big(name: str):
    torch.manual_seed(0)
    cfg = SHAPES[name]()
    with torch.device("cuda"):
        return type_for(cfg)._from_config(cfg, dtype=torch.bfloat16).eval()


def type_for(cfg):
    return OPTForCausalLM if cfg.model_type == "opt" else LlamaForCausalLM


def batch(model, lens, seed=1):
    g = torch.Generator().manual_seed(seed)
    lp = max(lens)
    ids = torch.randint(4, model.config.vocab_size, (len(lens), lp), generator=g)
    mask = torch.ones(len(lens), lp, dtype=torch.long)
    for i, n in enumerate(lens):
        mask[i, :lp - n] = 0
        ids[i, :lp - n] = model.config.pad_token_id
    return ids.cuda(), mask.cuda()


def hf_greedy(model, ids, mask, new):
    pad = model.config.pad_token_id
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad)
    full = torch.full((ids.shape[0], ids.shape[1] + new), pad, dtype=torch.long, device=ids.device)
    full[:, :out.shape[1]] = out
    return full


def engine(dtype="float32", graphs=True, **kw):
    cache = CacheConfig(block_size=16, num_blocks=kw.pop("num_blocks", None), gpu_memory_utilization=0.9)
    return HybridEngine(EngineConfig(cache=cache, dtype=dtype, device="cuda", enable_cuda_graph=graphs,
                                     max_model_len=kw.pop("max_model_len", 512), **kw))


@pytest.fixture(autouse=True)
def _restore_ops_backend():
    before = ops.get_backend()
    yield
    ops.set_backend(before)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_greedy_equals_hf_tiny_fp32_cuda(family):
    model = tiny(family)
    ids, mask = batch(model, [37, 5, 19, 64, 2, 23])
    eng = engine(max_num_seqs=8)
    eng.load_weights(model)
    out = eng.generate(ids, mask, SamplingParams(max_new_tokens=40))
    want = hf_greedy(model, ids, mask, 40)
    assert torch.equal(out, want), (out[:, ids.shape[1]:] != want[:, ids.shape[1]:]).sum()
    assert eng.stats.capture_s > 0, "the decode steps should have run as CUDA graphs"


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_cuda_graph_path_equals_eager_path(family):
    model = tiny(family).to(torch.bfloat16)
    ids, mask = batch(model, [50, 7, 33, 12, 90], seed=2)  # 5 rows: padded to the graph bucket of 8
    outs = {}
    for graphs in (False, True):
        eng = engine(dtype="bfloat16", graphs=graphs, max_num_seqs=16, decode_steps_per_sync=5)
        eng.load_weights(model)
        outs[graphs] = eng.generate(ids, mask, SamplingParams(max_new_tokens=30))
        assert (eng.stats.capture_s > 0) == graphs
        assert eng.stats.num_decode_chunks > 1
    assert torch.equal(outs[False], outs[True])
    # sampling inside the graph: seeded runs repeat exactly (the first run captures, which draws
    # random numbers in its warm-up, so compare the replays), and differ across seeds
    sampled = [eng.generate(ids, mask, SamplingParams(max_new_tokens=30, temperature=0.8, top_p=0.9, seed=s,
                                                      ignore_eos=True))  # fixed rows: one graph bucket
               for s in (5, 5, 5, 6)]
    assert torch.equal(sampled[1], sampled[2]) and not torch.equal(sampled[2], sampled[3])


@pytest.mark.parametrize("name", ["opt-1.3b", "llama-7b"])
def test_teacher_forced_logprobs_real_shapes_bf16(name):
    model = big(name)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(4, model.config.vocab_size, (n,), generator=g).tolist() for n in (96, 41, 130)]
    prompt_lens = [64, 20, 100]
    eng = engine(dtype="bfloat16", max_num_seqs=8, max_model_len=256)
    eng.load_weights(model)
    prefill = eng.prompt_logprobs(seqs)
    decode = eng.teacher_forced_logprobs([s[:p] for s, p in zip(seqs, prompt_lens)],
                                         [s[p:] for s, p in zip(seqs, prompt_lens)])
    errs = []
    for s, p, lp_prefill, lp_decode in zip(seqs, prompt_lens, prefill, decode):
        with torch.no_grad():
            logits = model(torch.tensor([s], device="cuda")).logits[0].float()  # [L, V]
        ref = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(s[1:], device="cuda")[:, None])[:, 0]
        for got, want in ((lp_prefill, ref), (lp_decode, ref[p - 1:])):
            err = (got - want).abs()
            errs.append((err.mean().item(), err.max().item()))
            assert err.mean() < 0.02 and err.max() < 0.15, (name, err.mean().item(), err.max().item())
            # random weights still give logits with ~1 nat of spread: the match is not trivial
            assert want.std() > 0.2 and torch.corrcoef(torch.stack([got, want]))[0, 1] > 0.98
    print(f"{name}: logprob |engine - HF| mean/max per check: {errs}")
    del model, eng
    torch.cuda.empty_cache()


def test_release_gives_memory_back_and_generate_reallocates():
    model = tiny("llama").to(torch.bfloat16)
    ids, mask = batch(model, [20, 9, 31], seed=4)
    eng = engine(dtype="bfloat16", max_num_seqs=8)
    eng.load_weights(model)
    first = eng.generate(ids, mask, SamplingParams(max_new_tokens=16))
    held = torch.cuda.memory_reserved()
    eng.release()
    assert eng.storage is None and torch.cuda.memory_reserved() < held
    eng.load_weights(model)
    assert torch.equal(eng.generate(ids, mask, SamplingParams(max_new_tokens=16)), first)
