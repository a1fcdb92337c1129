"""Stage 3: PPO with four DeepSpeed engines (actor, reference, critic, reward)."""
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.trainer import PPOTrainer, run_ppo

__all__ = ["PPOConfig", "PPOTrainer", "run_ppo"]
