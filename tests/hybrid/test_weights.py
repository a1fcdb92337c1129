"""load_weights: the inference copy equals the training model's effective weights, whatever wraps
them (peft LoRA, DeepSpeed-Chat style LoRA, a DeepSpeed ZeRO-3 engine), and never modifies it."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from hybrid.models import build_model
from hybrid.weights import load_weights, unwrap_model


def tiny_opt(seed=0):
    torch.manual_seed(seed)
    return OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                                    vocab_size=61, max_position_embeddings=64, word_embed_proj_dim=32)).eval()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=48,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=61,
                                        max_position_embeddings=64)).eval()


def expected_buffers(inf, hf):
    """The fused inference layout, built independently from an (already merged) HF state dict."""
    sd = hf.state_dict()
    out = {}
    if hf.config.model_type == "opt":
        for i in range(inf.num_layers):
            p = f"model.decoder.layers.{i}."
            out[f"layers.{i}.qkv_w"] = torch.cat([sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
            out[f"layers.{i}.qkv_b"] = torch.cat([sd[p + f"self_attn.{x}_proj.bias"] for x in "qkv"])
            out[f"layers.{i}.o_w"] = sd[p + "self_attn.out_proj.weight"]
            out[f"layers.{i}.fc1_w"] = sd[p + "fc1.weight"]
            out[f"layers.{i}.fc2_w"] = sd[p + "fc2.weight"]
            out[f"layers.{i}.ln2_b"] = sd[p + "final_layer_norm.bias"]
        out["embed_tokens"] = sd["model.decoder.embed_tokens.weight"]
        out["embed_positions"] = sd["model.decoder.embed_positions.weight"]
    else:
        for i in range(inf.num_layers):
            p = f"model.layers.{i}."
            out[f"layers.{i}.qkv_w"] = torch.cat([sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
            out[f"layers.{i}.gate_up_w"] = torch.cat([sd[p + f"mlp.{x}_proj.weight"] for x in ("gate", "up")])
            out[f"layers.{i}.down_w"] = sd[p + "mlp.down_proj.weight"]
            out[f"layers.{i}.o_w"] = sd[p + "self_attn.o_proj.weight"]
            out[f"layers.{i}.ln1_w"] = sd[p + "input_layernorm.weight"]
        out["lm_head"] = sd["lm_head.weight"]
        out["norm_w"] = sd["model.norm.weight"]
    return out


def assert_matches(inf, merged_hf, atol=1e-6):
    bufs = dict(inf.named_buffers())
    for name, want in expected_buffers(inf, merged_hf).items():
        torch.testing.assert_close(bufs[name].float(), want.float(), atol=atol, rtol=1e-5, msg=name)


@pytest.mark.parametrize("make", [tiny_opt, tiny_llama])
def test_plain_model_fused_layout(make):
    hf = make()
    inf = build_model(hf.config, torch.float32, "cpu")
    load_weights(inf, hf)
    assert_matches(inf, hf, atol=0)


def test_bf16_copy_rounds_once():
    hf = tiny_llama()
    inf = build_model(hf.config, torch.bfloat16, "cpu")
    load_weights(inf, hf)
    qkv = inf.layers[1].qkv_w
    want = torch.cat([getattr(hf.model.layers[1].self_attn, f"{x}_proj").weight for x in "qkv"]).bfloat16()
    assert qkv.dtype == torch.bfloat16 and torch.equal(qkv, want)


def test_peft_lora_is_merged_on_the_fly_without_touching_the_model():
    peft = pytest.importorskip("peft")
    hf = tiny_llama()
    lora = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "gate_proj", "o_proj"]))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_()
    before = {n: p.clone() for n, p in lora.named_parameters()}
    inf = build_model(hf.config, torch.float32, "cpu")
    info = load_weights(inf, lora)
    assert info["lora"] and info["wrapped"] == "peft" and not info["zero3"]
    assert all(torch.equal(p, before[n]) for n, p in lora.named_parameters()), "training model modified"
    merged = lora.merge_and_unload()
    assert_matches(inf, merged, atol=1e-5)


def test_deepspeed_chat_style_lora_merged_or_not():
    lora_mod = pytest.importorskip("rlhf.lora")
    hf = tiny_opt()
    lora_mod.convert_linear_layer_to_lora(hf, "decoder.layers.", lora_dim=4, lora_scaling=2.0)
    with torch.no_grad():
        for m in lora_mod.lora_modules(hf):
            m.lora_left_weight.normal_()
    inf = build_model(hf.config, torch.float32, "cpu")
    assert load_weights(inf, hf)["lora"]
    merged_ref = tiny_opt()
    with torch.no_grad():
        for (name, m) in hf.named_modules():
            if isinstance(m, lora_mod.LoRALinear):
                merged_ref.get_submodule(name).weight.copy_(m.weight + m.delta_weight())
    assert_matches(inf, merged_ref, atol=1e-5)
    lora_mod.merge_lora(hf)  # merged in place: the delta must not be added twice
    load_weights(inf, hf)
    assert_matches(inf, merged_ref, atol=1e-5)


@pytest.mark.slow
def test_zero3_partitions_are_gathered_layer_by_layer():
    deepspeed = pytest.importorskip("deepspeed")
    from transformers.integrations import HfDeepSpeedConfig

    dsu = pytest.importorskip("rlhf.deepspeed_utils")
    dsu.init_distributed()  # idempotent 1-process group (gloo on CPU), shared with rlhf's tests
    ds_cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    ref = tiny_opt(seed=3)
    keep = HfDeepSpeedConfig(ds_cfg)  # noqa: F841  (must stay alive while the model is built)
    model = OPTForCausalLM._from_config(ref.config)
    ds_engine, *_ = deepspeed.initialize(model=model, config=ds_cfg, model_parameters=model.parameters())
    sd = ref.state_dict()
    for name, p in ds_engine.module.named_parameters():  # load the reference weights into partitions
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            with torch.no_grad():
                p.copy_(sd[name])
    assert all(p.numel() == 0 or hasattr(p, "ds_id") for p in ds_engine.module.parameters())
    hf, kind = unwrap_model(ds_engine)
    assert hf is ds_engine.module and kind == "deepspeed"
    inf = build_model(ref.config, torch.float32, "cpu")
    info = load_weights(inf, ds_engine)
    assert info["zero3"]
    assert_matches(inf, ref, atol=0)
    assert all(p.numel() == 0 for p in ds_engine.module.parameters()), "partitions must be released again"
