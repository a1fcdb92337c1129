"""Checkpoints and --resume: atomic save, half-written checkpoints ignored, a run killed after
step 3 and resumed from its step-2 checkpoint replays exactly what an uninterrupted run does
(same prompts in the same order, same sampled answers, same metrics, same final weights)."""
import json
import os

import pytest
import torch

from rlhf.metrics import read_metrics
from rlhf.ppo.checkpoint import COMPLETE, CheckpointManager, complete_checkpoints, latest_checkpoint
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.run import run_ppo


def test_latest_checkpoint_ignores_incomplete(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in [("step_00000002", True), ("step_00000010", False), ("step_00000004", True),
                           (".tmp-step_00000006", True), ("notes", True)]:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / COMPLETE).write_text("{}")
    assert [s for s, _ in complete_checkpoints(str(root))] == [2, 4]
    assert latest_checkpoint(str(root)) == str(root / "step_00000004")
    assert latest_checkpoint(str(tmp_path / "missing")) is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        CheckpointManager(str(root)).load(str(root / "step_00000010"), None, None)


def _cfg(out, **kw):
    from rlhf.config import DataConfig

    base = dict(data=DataConfig(data_output_path=str(out.parent / "data-cache")),actor_model_name_or_path="tiny-opt", critic_model_name_or_path="tiny-opt", output_dir=str(out),
                per_device_generation_batch_size=4, per_device_training_batch_size=2, max_answer_seq_len=8,
                max_prompt_seq_len=48, max_steps=4, save_steps=2, save_total_limit=3, eval_prompts=4,
                do_sample=True, enable_ema=True, actor_zero_stage=2, num_warmup_steps=1,
                actor_learning_rate=2e-3, critic_learning_rate=2e-3, dtype="fp32", progress_bar=False)
    base.update(kw)
    return PPOConfig(**base)


def _train_rows(out):
    return [r for r in read_metrics(str(out), split="train")]


def _weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def test_resume_after_kill_replays_the_uninterrupted_run(tmp_path):
    full = run_ppo(_cfg(tmp_path / "full"))
    ref_rows = _train_rows(tmp_path / "full")
    assert [r["step"] for r in ref_rows] == [1, 2, 3, 4]

    killed = tmp_path / "killed"
    out = run_ppo(_cfg(killed), stop_after=3)  # "killed" during step 4: step 3 is lost, step 2 is saved
    assert out.metrics == {"stopped_at": 3}
    ckpts = killed / "checkpoints"
    assert [s for s, _ in complete_checkpoints(str(ckpts))] == [2]
    (ckpts / ".tmp-step_00000004" / "actor").mkdir(parents=True)  # a save cut off half way
    (ckpts / "step_00000005").mkdir()  # a folder without the COMPLETE marker
    state = json.loads((ckpts / "step_00000002" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch"]) == (2, 0, 2)

    resumed = run_ppo(_cfg(killed, resume=True))
    rows = _train_rows(killed)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # history up to the checkpoint, then the redone steps
    for got, want in zip(rows[2:], ref_rows[2:]):
        assert (got["epoch"], got["batch"], got["data_crc"]) == (want["epoch"], want["batch"], want["data_crc"])
        for k in ("reward_mean", "kl", "actor_loss", "critic_loss", "answer_len", "actor_lr"):
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), k
    assert not (ckpts / ".tmp-step_00000004").exists()  # the next save cleaned the leftover
    assert resumed.metrics["reward_before"] == pytest.approx(full.metrics["reward_before"])
    assert resumed.metrics["reward_after"] == pytest.approx(full.metrics["reward_after"], rel=1e-4, abs=1e-6)
    for sub in ("actor", "actor_ema", "critic"):
        a, b = _weights(tmp_path / "full" / sub), _weights(killed / sub)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    # EMA is its own model: it differs from the final actor
    ema, actor = _weights(killed / "actor_ema"), _weights(killed / "actor")
    assert any(not torch.allclose(ema[k], actor[k]) for k in actor)
