"""LoRA: conversion is exact, merging equals the factored form, unmerge restores bit for bit,
only the adapters train, the HF-format save (merged, adapters stripped) reloads to the same model —
in plain PyTorch and under a ZeRO-3 engine."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.lora import (LoRALinear, convert_linear_layer_to_lora, has_lora, lora_merged, merge_lora,
                       only_optimize_lora_parameters, optimizer_param_groups, unmerge_lora)
from rlhf.models import load_causal_lm
from rlhf.ppo.run import save_hf


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, 9), generator=g)


def _randomise_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_left_weight.copy_(torch.randn(m.lora_left_weight.shape, generator=g) * 0.5)


def test_convert_merge_unmerge_and_groups():
    model = load_causal_lm("tiny-opt", seed=3).eval()
    x = _inputs()
    base_logits = model(x).logits
    convert_linear_layer_to_lora(model, "decoder.layers.", lora_dim=4, lora_scaling=2.0)
    assert has_lora(model)
    n_lora = sum(isinstance(m, LoRALinear) for m in model.modules())
    assert n_lora == 2 * 6  # q, k, v, out_proj, fc1, fc2 per layer
    torch.testing.assert_close(model(x).logits, base_logits)  # left adapter starts at zero
    _randomise_adapters(model)
    lora_logits = model(x).logits
    assert (lora_logits - base_logits).abs().max() > 1e-3
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with lora_merged(model):
        torch.testing.assert_close(model(x).logits, lora_logits, rtol=1e-5, atol=1e-5)
        q = model.model.decoder.layers[0].self_attn.q_proj
        assert not torch.equal(q.weight, before["model.decoder.layers.0.self_attn.q_proj.weight"])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # restored exactly, not W + d - d
    merge_lora(model)
    merge_lora(model)  # idempotent
    unmerge_lora(model)
    torch.testing.assert_close(model(x).logits, lora_logits)

    only_optimize_lora_parameters(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    groups = optimizer_param_groups(model, weight_decay=0.1, lora_lr=5e-4)
    assert [g.get("lr") for g in groups] == [5e-4]
    assert sum(len(g["params"]) for g in groups) == len(trainable)


def test_lora_training_then_hf_save_reloads_merged(tmp_path):
    model = load_causal_lm("tiny-opt", seed=4)
    convert_linear_layer_to_lora(model, "self_attn.q_proj,fc1", lora_dim=2)
    only_optimize_lora_parameters(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    frozen = model.model.decoder.layers[1].fc1.weight.detach().clone()
    x = _inputs(5)
    for _ in range(3):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(model.model.decoder.layers[1].fc1.weight, frozen)
    assert model.model.decoder.layers[1].fc1.lora_left_weight.abs().sum() > 0
    model.eval()
    expected = model(x).logits
    save_hf(model, None, str(tmp_path / "actor"), zero_stage=0)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "actor")).eval()
    assert not has_lora(reloaded)
    torch.testing.assert_close(reloaded(x).logits, expected, rtol=1e-5, atol=1e-5)


def test_lora_under_zero3_engine_saves_merged(tmp_path):
    import deepspeed

    from rlhf import deepspeed_utils as dsu
    from rlhf.config import DeepSpeedConfig

    dsu.init_distributed()
    ds_cfg = dsu.get_train_ds_config(DeepSpeedConfig(zero_stage=3, per_device_train_batch_size=2))
    model = load_causal_lm("tiny-opt", ds_config=ds_cfg, seed=6)
    convert_linear_layer_to_lora(model, "decoder.layers.", lora_dim=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg, dist_init_required=False)
    x = _inputs(7)
    for _ in range(2):
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
    engine.eval()
    with torch.no_grad():
        expected = engine(input_ids=x).logits
        with lora_merged(engine.module):
            merged = engine(input_ids=x).logits
        after = engine(input_ids=x).logits
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, expected)
    save_hf(engine, None, str(tmp_path / "actor"), zero_stage=3)
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # else from_pretrained would build the reloaded copy partitioned too
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "actor")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, expected, rtol=1e-5, atol=1e-5)


def test_unknown_module_name_is_an_error():
    model = load_causal_lm("tiny-opt")
    with pytest.raises(ValueError, match="no nn.Linear"):
        convert_linear_layer_to_lora(model, "not_a_layer", lora_dim=2)
