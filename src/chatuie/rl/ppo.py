"""PPO (the paper's, ChatUIE §3.3): TRL's ``trl.experimental.ppo.PPOTrainer``.

Policy and frozen reference are the SFT model, the reward is the reward model's score of
``prompt + answer + <|im_end|>``, the value model starts from the reward model; the per-token reward
is ``-kl_coef * KL`` with the score added on the last token (``kl_coef`` is the paper's β).
Rollouts sample freely, or with ``rl.ppo.constrained_rollouts`` under the grounding constraint
(:class:`chatuie.rl.rollouts.ConstrainedPPOGeneration`: TRL's PPO generation takes no logits
processor, so the policy's ``generate`` is wrapped). Answers without ``<|im_end|>`` lose
``missing_eos_penalty``; ``rl.ppo.f1_weight`` adds F1 against gold to the score
(:class:`RewardModelWithF1`). Checkpoints: :mod:`chatuie.rl.checkpoints`.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from chatuie.reward.model import PairTokenizer
from chatuie.rl.checkpoints import PPOCheckpoints
from chatuie.rl.config import RLConfig
from chatuie.rl.rewards import F1Reward, RewardModelWithF1
from chatuie.rl.rollouts import ConstrainedPPOGeneration
from chatuie.rl.trainer import (
    RLResult,
    checkpoint_plan,
    experimental_ok,
    pick,
    restore_generation,
    trainer_args,
)
from chatuie.train.trainer import freeze_input_embeddings


class _F1Log(TrainerCallback):
    """Puts each update's mean F1 term (:class:`RewardModelWithF1`) on that update's log entry, so
    it is in the trainer state a checkpoint keeps."""

    def __init__(self, scored: RewardModelWithF1) -> None:
        self.scored, self.seen = scored, 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        part, self.seen = self.scored.f1[self.seen :], len(self.scored.f1)
        if part and state.log_history:
            state.log_history[-1]["objective/f1"] = sum(part) / len(part)


def ppo_config(config: RLConfig, output_dir: str | Path, **overrides: Any):
    experimental_ok()
    from trl.experimental.ppo import PPOConfig

    s = config.ppo
    kwargs = {
        **trainer_args(config, output_dir),
        "per_device_train_batch_size": s.per_device_batch_size,
        "gradient_accumulation_steps": s.gradient_accumulation,
        "num_mini_batches": s.num_mini_batches,
        "num_ppo_epochs": s.num_ppo_epochs,
        "total_episodes": s.total_episodes,
        "learning_rate": s.learning_rate,
        "response_length": s.response_length,
        "temperature": s.temperature,
        "stop_token": "eos",  # <|im_end|>: responses are cut after it, the score is read on it
        "missing_eos_penalty": s.missing_eos_penalty,
        "kl_coef": config.kl_coef,
        "kl_estimator": s.kl_estimator,
        "local_rollout_forward_batch_size": s.local_rollout_forward_batch_size,
        "vf_coef": s.vf_coef,
        "cliprange": s.cliprange,
        "cliprange_value": s.cliprange_value,
        "gamma": s.gamma,
        "lam": s.lam,
        "whiten_rewards": s.whiten_rewards,
        "num_sample_generations": 0,  # debugging generations cost a full extra rollout each on CPU
        "logging_steps": 1,  # PPOTrainer logs every update anyway
    }
    kwargs.update(overrides)
    return PPOConfig(**kwargs)


def train_ppo(
    policy,
    ref_policy,
    reward_model,
    value_model,
    tokenizer,
    prompts: Sequence[dict[str, Any]],
    config: RLConfig,
    output_dir: str | Path | None = None,
    *,
    resume: bool = True,
    callbacks: Sequence[TrainerCallback] = (),
    **config_overrides: Any,
) -> RLResult:
    """PPO with TRL 1.12's experimental ``PPOTrainer``; returns the trained policy and the log.

    With ``output_dir`` (and ``config.save_steps``), the run is checkpointed there at update boundaries
    and, if it holds a complete checkpoint (and ``resume``), continues from the newest one as the
    uninterrupted run would have (:mod:`chatuie.rl.checkpoints`); ``resume=False`` starts afresh.
    The policy, reference and value model passed in must be as the run started (SFT / reward model).
    """
    experimental_ok()
    from datasets import Dataset
    from trl.experimental.ppo import PPOTrainer

    from chatuie.models.modeling import is_peft

    if is_peft(policy):
        raise ValueError("PPO here trains a full model: set sft.merge_lora: true")
    if ref_policy is policy:
        raise ValueError("the reference policy must be a separate copy of the SFT model")
    batch = config.ppo.per_device_batch_size * config.ppo.gradient_accumulation
    if len(prompts) < batch:
        raise ValueError(f"PPO needs at least one full batch of prompts ({batch}), got {len(prompts)}")
    if config.freeze_embeddings:
        freeze_input_embeddings(policy, value_model)
    encode = PairTokenizer(tokenizer)
    dataset = Dataset.from_dict({"input_ids": [encode.prompt_ids(p["prompt"]) for p in prompts]})
    tokenizer.padding_side = "left"  # queries are left-padded; TRL masks the pad token out
    scored = reward_model
    ours: list[TrainerCallback] = []
    if config.ppo.f1_weight > 0:
        by_part = config.ppo.f1_reward == "parts"
        scored = RewardModelWithF1(reward_model, tokenizer, prompts, config.ppo.f1_weight, F1Reward(by_part))
        ours.append(_F1Log(scored))
    saving, checkpoint = checkpoint_plan(config, output_dir, resume)
    checkpoints = PPOCheckpoints(output_dir, config.save_steps, checkpoint) if saving else None
    if checkpoints is not None:
        ours.append(checkpoints)  # after _F1Log (the update's log entry is complete when saved)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ppo-") as scratch:
        args = ppo_config(config, output_dir or scratch, **config_overrides)
        trainer = PPOTrainer(
            args=args,
            processing_class=tokenizer,
            model=policy,
            ref_model=ref_policy,
            reward_model=scored,
            train_dataset=dataset,
            value_model=value_model,
            # Never sampled from (num_sample_generations=0), but PPOTrainer builds a loader on it.
            eval_dataset=dataset.select(range(min(len(dataset), batch))),
            callbacks=[*ours, *callbacks],  # the caller's see each update saved
        )
        if checkpoints is not None:
            checkpoints.bind(trainer)
        constrained = None
        if config.ppo.constrained_rollouts:
            constrained = ConstrainedPPOGeneration(policy, tokenizer, prompts, config.ppo.response_length)
        with constrained or contextlib.nullcontext():
            trainer.train()
    rows = []
    for entry in trainer.state.log_history:
        if "objective/scores" not in entry:
            continue
        rows.append(
            {
                "step": len(rows) + 1,
                "episode": int(entry.get("episode", 0)),
                "reward": pick(entry, "objective/scores"),
                "kl": pick(entry, "objective/kl"),
                "rlhf_reward": pick(entry, "objective/rlhf_reward"),
                "entropy": pick(entry, "policy/entropy_avg"),
                "policy_loss": pick(entry, "loss/policy_avg"),
                "value_loss": pick(entry, "loss/value_avg"),
                "eos_tokens": pick(entry, "val/num_eos_tokens"),
            }
        )
        if isinstance(scored, RewardModelWithF1):  # the verifiable term's share of the update
            f1 = pick(entry, "objective/f1")
            rows[-1]["f1"] = round(f1, 4) if f1 is not None else None
    policy.eval()
    restore_generation(policy, tokenizer)
    seconds = round(time.monotonic() - started, 1)
    resumed_from = str(checkpoint) if checkpoint else None
    return RLResult(policy, rows, trainer.state.global_step, seconds, resumed_from)
