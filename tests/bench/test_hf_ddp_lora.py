"""The HF-DDP baseline with PEFT LoRA on the actor (bench.e2e --actor-lora-dim for the baselines)."""
import pytest
import torch

from bench.baselines.hf_ddp import HFDDPConfig, HFDDPTrainer
from bench.measure import random_prompts
from rlhf.models import resolve_config


@pytest.fixture
def single_rank_group():
    import socket

    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_lora_baseline_trains_only_the_adapters(single_rank_group):
    cfg = HFDDPConfig(actor_model_name_or_path="tiny-opt", critic_model_name_or_path="tiny-opt",
                      max_answer_seq_len=6, actor_lora_dim=4, precision="fp32", seed=3)
    tr = HFDDPTrainer(cfg, torch.device("cpu"))
    try:
        named = dict(tr.actor.named_parameters())
        trainable = {n for n, p in named.items() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)
        n_layers = resolve_config("tiny-opt").num_hidden_layers
        assert len(trainable) == 2 * 6 * n_layers  # A and B of q, k, v, out, fc1, fc2 per layer
        before = {n: p.detach().clone() for n, p in named.items()}
        tr.cfg.actor_learning_rate = 1e-2
        for g in tr.actor_opt.param_groups:
            g["lr"] = 1e-2
        stats = tr.step(random_prompts(resolve_config("tiny-opt"), 4, 8, seed=0))
        assert torch.isfinite(torch.tensor(stats["actor_loss"]))
        changed = {n for n, p in named.items() if not torch.equal(p.detach(), before[n])}
        assert changed, "no LoRA weight moved"
        assert changed <= trainable, f"frozen weights changed: {sorted(changed - trainable)[:3]}"
    finally:
        tr.close()
