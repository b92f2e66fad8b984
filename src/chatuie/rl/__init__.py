"""Reinforcement learning against the reward model: PPO and GRPO, their rewards and checkpoints."""
