"""FLOP / byte accounting (bench/flops.py) and the epoch cost projection (bench/cost.py)."""
from __future__ import annotations

import math
import random

import pytest

from bench import cost, flops
from bench.hardware import CARDS, card_spec


def _shape(L=2, h=4, V=10, params=1000, kv_heads=2, head_dim=2):
    return flops.ModelShape(num_layers=L, hidden_size=h, vocab_size=V, num_params=params,
                            num_kv_heads=kv_heads, head_dim=head_dim)


def test_megatron_flops_hand_computed():
    # 24 * 3 * B3 * s5 * L2 * h^2=16 = 34560; times (1 + 5/24 + 10/(16*2*4)) = 34560 + 7200 + 2700
    assert flops.megatron_flops(_shape(), 3.0, batch=3, seq_len=5) == pytest.approx(44460.0, rel=1e-12)


def test_checkpoint_factor_as_deepspeed_chat():
    assert flops.checkpoint_activations_factor(False) == 3.0
    assert flops.checkpoint_activations_factor(True) == 4.0
    # LoRA r=8 on h=64: 3 - (1 - 16/64) = 2.25
    assert flops.checkpoint_activations_factor(False, lora_dim=8, hidden_size=64) == pytest.approx(2.25)


def test_step3_flops_matches_print_throughput_step3():
    rng = random.Random(0)
    actor = _shape(L=rng.randint(2, 40), h=rng.choice([512, 2048, 5120]), V=50272)
    critic = _shape(L=rng.randint(2, 24), h=rng.choice([512, 1024]), V=50272)
    B, gpus, P, G = rng.randint(1, 64), rng.randint(1, 8), 256, 256
    f = flops.step3_flops(actor, critic, B, gpus, P, G, actor_gradient_checkpointing=True)
    s = P + G

    def ds_formula(shape, factor, batch):  # written out as in dschat/utils/perf.py
        L, h, V = shape.num_layers, shape.hidden_size, shape.vocab_size
        return (24 * factor * batch * s * L * h**2) * (1.0 + s / (6.0 * h) + V / (16.0 * L * h))

    assert f.training == pytest.approx(ds_formula(actor, 4, B * gpus) + ds_formula(critic, 3, B * gpus), rel=1e-12)
    assert f.generation == pytest.approx(ds_formula(actor, 1, B * gpus), rel=1e-12)
    assert f.total == pytest.approx(f.training + f.generation)
    # per GPU: divided by seconds and GPU count
    assert flops.tflops_per_gpu(f.total, 2.0, gpus) == pytest.approx(f.total / (2.0 * gpus * 1e12))


def test_decode_bytes_hand_computed():
    shape = _shape(L=2, params=1000, kv_heads=2, head_dim=2)  # kv bytes/token = 2*2*2*2*2 = 32
    assert shape.kv_bytes_per_token == 32
    # gen 3 -> 2 decode steps reading contexts P+1, P+2 with P=4: weights 2*2000 + batch 5 * 32 * (5 + 6)
    assert flops.decode_bytes(shape, batch=5, prompt_len=4, gen_len=3, bytes_per_param=2) == 4000 + 5 * 32 * 11
    assert flops.decode_mbu(1e12, 1.0, 2e12) == pytest.approx(0.5)
    assert math.isnan(flops.decode_mbu(1.0, 0.0, 1.0))


def test_decode_floor_matches_device_readme_for_opt_1_3b():
    """../shared/device/README.md: OPT-1.3B, prompt 256 + 256 new, weights + live KV over 4.27 TB/s
    = 0.90 / 1.75 / 2.88 / 5.14 ms per decode step at batch 16 / 64 / 128 / 256."""
    from rlhf.models import count_parameters, resolve_config

    cfg = resolve_config("opt-1.3b")
    shape = flops.ModelShape.from_config(cfg, count_parameters(cfg))
    for batch, ms in ((16, 0.90), (64, 1.75), (128, 2.88), (256, 5.14)):
        per_step = flops.decode_bytes(shape, batch, 256, 256) / 255 / 4.27e12 * 1e3
        assert per_step == pytest.approx(ms, rel=0.03), batch


def test_epoch_projection_arithmetic():
    p = cost.project_epoch(tokens_per_s_per_gpu=1000.0, gpus=8, usd_per_gpu_hour=2.0)
    assert p.hours == pytest.approx(135.3e6 / 8000 / 3600)
    assert p.gpu_hours == pytest.approx(p.hours * 8)
    assert p.usd == pytest.approx(p.gpu_hours * 2.0)
    # doubling the GPUs at the same per-GPU rate halves the time, keeps the cost
    q = cost.project_epoch(1000.0, 16, 2.0)
    assert q.hours == pytest.approx(p.hours / 2) and q.usd == pytest.approx(p.usd)
    assert cost.project_epoch(1000.0, 1, None).usd is None
    with pytest.raises(ValueError):
        cost.project_epoch(0.0, 1, 1.0)


def test_card_table_resolves_torch_names():
    assert card_spec("NVIDIA H100 80GB HBM3").name == "H100-SXM"
    assert card_spec("NVIDIA H100 PCIe").name == "H100-PCIe"
    assert card_spec("NVIDIA H200").name == "H200"
    assert card_spec("NVIDIA A100-SXM4-80GB").name == "A100-80G"
    assert card_spec("cpu") is None
    assert all(c.peak_bf16_tflops > 0 and c.hbm_tb_s > 0 and c.usd_per_gpu_hour > 0 for c in CARDS)


def test_git_commit_from_environment_outside_a_checkout(monkeypatch, tmp_path):
    """The device machine's copy of the tree has no .git: the launcher names the commit."""
    from bench.rows import git_commit

    monkeypatch.chdir(tmp_path)  # not a git checkout
    monkeypatch.delenv("HYBRID_RLHF_GIT_COMMIT", raising=False)
    assert git_commit() == (None, None)
    monkeypatch.setenv("HYBRID_RLHF_GIT_COMMIT", "abc123")
    monkeypatch.setenv("HYBRID_RLHF_GIT_DIRTY", "1")
    assert git_commit() == ("abc123", True)
    monkeypatch.setenv("HYBRID_RLHF_GIT_DIRTY", "0")
    assert git_commit() == ("abc123", False)
