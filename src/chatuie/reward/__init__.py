"""The reward model: confusing negatives, the judge, pairs and the reward model's training."""
