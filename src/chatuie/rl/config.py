"""The ``rl`` section: which algorithm, the KL coefficient (β), the prompts and each algorithm's
settings (:class:`RLConfig`, with :class:`PPOSettings` and :class:`GRPOSettings`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from chatuie.rl.rewards import F1_REWARDS

ALGORITHMS = ("ppo", "grpo")


# ------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class PPOSettings:
    """``rl.ppo``: TRL ``PPOConfig`` fields that matter here (one update = one rollout batch)."""

    total_episodes: int = 64  # prompts rolled out in all (updates = total_episodes / batch)
    per_device_batch_size: int = 8  # rollouts per update
    gradient_accumulation: int = 1
    num_mini_batches: int = 1
    num_ppo_epochs: int = 2  # optimisation passes over each rollout batch
    learning_rate: float = 1e-5
    response_length: int = 96  # max new tokens per rollout
    temperature: float = 0.7
    missing_eos_penalty: float | None = 1.0  # subtracted from the score of answers that never stop
    local_rollout_forward_batch_size: int = 8
    vf_coef: float = 0.1
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    kl_estimator: str = "k1"  # "k1" (TRL's default) | "k3"
    constrained_rollouts: bool = False  # sample with the grounding constraint (ConstrainedPPOGeneration)
    # score = reward model + f1_weight x F1 of the answer against gold (RewardModelWithF1); 0: the paper's
    f1_weight: float = 0.0
    f1_reward: str = "items"  # as rl.grpo.f1_reward

    def __post_init__(self) -> None:
        if self.f1_reward not in F1_REWARDS:
            raise ValueError(f"rl.ppo.f1_reward must be one of {F1_REWARDS}, not {self.f1_reward!r}")
        if self.f1_weight < 0:
            raise ValueError("rl.ppo.f1_weight must be >= 0")


@dataclass(frozen=True)
class RewardWeights:
    """``rl.grpo.reward_weights``: how the GRPO rewards add up (0 drops one)."""

    reward_model: float = 1.0
    f1: float = 1.0
    validity: float = 0.5


@dataclass(frozen=True)
class GRPOSettings:
    """``rl.grpo``: TRL ``GRPOConfig`` fields that matter here."""

    max_steps: int = 16
    per_device_batch_size: int = 8  # completions per step: prompts x num_generations
    num_generations: int = 4  # completions per prompt (the group advantages are computed in)
    max_completion_length: int = 96
    learning_rate: float = 1e-5
    temperature: float = 1.0
    num_iterations: int = 1
    loss_type: str = "dapo"  # TRL 1.12's default
    scale_rewards: str = "group"
    reward_weights: RewardWeights = field(default_factory=RewardWeights)
    # "items": F1 over all of an answer's items; "parts": the mean of each part's F1 (entities and
    # relations; triggers and arguments), so a part with few, mostly wrong items (CoNLL04's
    # relations) is not dropped to buy precision on the whole.
    f1_reward: str = "items"
    constrained_rollouts: bool = False  # sample with the grounding constraint (GRPO rollout_func)

    def __post_init__(self) -> None:
        if self.f1_reward not in F1_REWARDS:
            raise ValueError(f"rl.grpo.f1_reward must be one of {F1_REWARDS}, not {self.f1_reward!r}")


@dataclass(frozen=True)
class RLConfig:
    """``rl`` section: one RL run - the prompts, the algorithm, the KL coefficient (β) and each
    algorithm's settings."""

    algorithm: str = "ppo"  # ppo (the paper's) | grpo
    kl_coef: float = 0.05  # β, the KL coefficient to the SFT model: PPO's kl_coef, GRPO's beta
    datasets: list[str] = field(default_factory=lambda: ["resume", "conll04", "fewfc"])
    max_prompts_per_dataset: int = 64  # instructions sampled per dataset (0 = all)
    max_prompt_length: int = 448  # tokens; longer prompts are left out
    ppo: PPOSettings = field(default_factory=PPOSettings)
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    logging_steps: int = 1
    # The input embedding (and a head tied to it) stays as SFT left it, in the policy and the value
    # model: on Gemma it is 170 M of 268 M parameters, ~4 GB of gradients and Adam state for PPO.
    freeze_embeddings: bool = False
    # Checkpoint every N PPO updates / GRPO steps (and after the last) into the run's output_dir, so
    # a killed run resumes (0: none). Only the newest checkpoint is kept.
    save_steps: int = 1
    seed: int = 13
    threads: int = 0
    device: str = "cpu"  # "cpu" | "auto" (GPU if any)

    def __post_init__(self) -> None:
        if self.save_steps < 0:
            raise ValueError("rl.save_steps must be >= 0")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"rl.algorithm must be one of {ALGORITHMS}, not {self.algorithm!r}")
        if self.kl_coef < 0:
            raise ValueError("rl.kl_coef must be >= 0")
        if self.device not in ("cpu", "auto"):
            raise ValueError(f"rl.device: expected 'cpu' or 'auto', got {self.device!r}")
