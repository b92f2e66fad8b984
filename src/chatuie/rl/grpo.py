"""GRPO (beyond the paper): TRL's ``GRPOTrainer`` with three rewards and ``beta = kl_coef``.

The rewards: the reward model, a verifiable one (F1 of the answer against gold,
:func:`chatuie.reward.judge.reference_score`) and a validity one (parses, spans in the text, labels
in the schema). ``constrained_rollouts`` samples with the grounding constraint through GRPO's
``rollout_func`` (:class:`chatuie.rl.rollouts.ConstrainedRollout`): every rollout is a valid
answer, the loss still uses the unconstrained policy's log-probs. A killed run resumes from the
Trainer's own checkpoints.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from chatuie.models.modeling import is_peft
from chatuie.rl.config import RLConfig
from chatuie.rl.rewards import F1Reward, RewardModelReward, validity_reward
from chatuie.rl.rollouts import ConstrainedRollout
from chatuie.rl.trainer import (
    RLResult,
    checkpoint_plan,
    experimental_ok,
    pick,
    restore_generation,
    trainer_args,
)
from chatuie.train.trainer import finished_state, freeze_input_embeddings


def grpo_config(config: RLConfig, output_dir: str | Path, **overrides: Any):
    from trl import GRPOConfig

    s = config.grpo
    weights = s.reward_weights
    kwargs = {
        **trainer_args(config, output_dir),
        "max_steps": s.max_steps,
        "per_device_train_batch_size": s.per_device_batch_size,
        "gradient_accumulation_steps": 1,
        "num_generations": s.num_generations,
        "max_completion_length": s.max_completion_length,
        "learning_rate": s.learning_rate,
        "temperature": s.temperature,
        "top_k": 0,
        "num_iterations": s.num_iterations,
        "loss_type": s.loss_type,
        "scale_rewards": s.scale_rewards,
        "beta": config.kl_coef,
        "reward_weights": [weights.reward_model, weights.f1, weights.validity],
        "remove_unused_columns": False,  # task/text/schema/gold reach the reward functions
        "log_completions": False,
        "shuffle_dataset": True,
    }
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def train_grpo(
    policy,
    tokenizer,
    reward_model,
    prompts: Sequence[dict[str, Any]],
    config: RLConfig,
    output_dir: str | Path | None = None,
    *,
    resume: bool = True,
    callbacks: Sequence[TrainerCallback] = (),
    **config_overrides: Any,
) -> RLResult:
    """GRPO with the reward model, F1 against gold and validity as rewards; β = ``config.kl_coef``.

    The reference model (``kl_coef > 0``) is reloaded by TRL from ``policy.config._name_or_path``,
    i.e. the SFT directory the policy was loaded from. With ``output_dir`` (and
    ``config.save_steps``) Trainer checkpoints go there and a killed run resumes from the newest one
    (weights, optimizer, scheduler, random state, data position), as SFT does.
    """
    from datasets import Dataset
    from trl import GRPOTrainer

    s = config.grpo
    if s.per_device_batch_size % s.num_generations:
        raise ValueError("rl.grpo.per_device_batch_size must be a multiple of rl.grpo.num_generations")
    if config.kl_coef > 0 and not Path(getattr(policy.config, "_name_or_path", "") or "").is_dir():
        raise ValueError(
            "GRPO with kl_coef > 0 reloads the reference from the policy's directory: load it from one"
        )
    columns = ("id", "dataset", "task", "text", "schema", "gold", "prompt")
    dataset = Dataset.from_list([{k: p[k] for k in columns} for p in prompts])
    rollout = None
    if s.constrained_rollouts:
        experimental_ok()
        rollout = ConstrainedRollout(prompts, s.max_completion_length, s.temperature)
    if config.freeze_embeddings:
        freeze_input_embeddings(policy)
    tokenizer.padding_side = "left"
    saving, checkpoint = checkpoint_plan(config, output_dir, resume)
    if saving:
        saves = {"save_strategy": "steps", "save_steps": config.save_steps, "save_total_limit": 1}
        config_overrides = {**saves, **config_overrides}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="grpo-") as scratch:
        args = grpo_config(config, output_dir or scratch, **config_overrides)
        trainer = GRPOTrainer(
            model=policy,
            reward_funcs=[
                RewardModelReward(reward_model, tokenizer),
                F1Reward(by_part=s.f1_reward == "parts"),
                validity_reward,
            ],
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            rollout_func=rollout,
            callbacks=list(callbacks),
        )
        finished = finished_state(checkpoint, s.max_steps)
        if finished is not None:  # killed after its last checkpoint: hand back that run's weights
            trainer._load_from_checkpoint(str(checkpoint))
            log_history, global_step = finished["log_history"], int(finished["global_step"])
        else:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            log_history, global_step = trainer.state.log_history, trainer.state.global_step
    rows = []
    for entry in log_history:
        if "reward" not in entry or "step" not in entry:
            continue
        rows.append(
            {
                "step": int(entry["step"]),
                "reward": pick(entry, "reward"),
                "kl": pick(entry, "kl"),
                "reward_model": pick(entry, "rewards/reward_model/mean"),
                "f1": pick(entry, "rewards/f1_reward/mean"),
                "validity": pick(entry, "rewards/validity_reward/mean"),
                "completion_length": pick(entry, "completions/mean_length"),
                "loss": pick(entry, "loss"),
            }
        )
    model = trainer.model
    if is_peft(model) and "ref" in model.peft_config:
        # TRL's frozen copy of the SFT adapter (the KL reference when a LoRA SFT model trains on):
        # not part of the policy, and save_pretrained would write it beside the adapter.
        model.delete_adapter("ref")
    model.eval()
    restore_generation(model, tokenizer)
    seconds = round(time.monotonic() - started, 1)
    return RLResult(model, rows, global_step, seconds, str(checkpoint) if checkpoint else None)
