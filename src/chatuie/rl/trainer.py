"""RL on IE instructions under a KL penalty to the SFT model: PPO (ChatUIE §3.3) or GRPO.

* ``ppo`` (the paper's): :mod:`chatuie.rl.ppo`, TRL's ``trl.experimental.ppo.PPOTrainer``.
* ``grpo`` (beyond the paper): :mod:`chatuie.rl.grpo`, TRL's ``GRPOTrainer``.

Prompts are the SFT instructions of training records (system + user turns), with their gold
(:mod:`chatuie.rl.prompts`). The rewards are :mod:`chatuie.rl.rewards`. Both trainers checkpoint
into ``output_dir`` every ``save_steps`` and resume a killed run: PPO through
:mod:`chatuie.rl.checkpoints`, GRPO (a regular Trainer) from its own checkpoints. The ``rl``
section is :class:`chatuie.rl.config.RLConfig`.

Here what both trainers share: the training arguments, whether a run checkpoints, reading TRL's log,
the generation config restored after training, and the result (:class:`RLResult`) and its summary.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

from chatuie.rl.config import RLConfig
from chatuie.train.trainer import resume_point, trainer_safety_args

log = logging.getLogger(__name__)


class RLResult(NamedTuple):
    model: Any  # the trained policy (same object as passed in)
    log: list[dict[str, float]]  # one row per optimizer update: step, reward, kl, ... (resumed ones too)
    steps: int
    seconds: float  # this process's training time
    resumed_from: str | None = None  # the checkpoint a killed run continued from


# -------------------------------------------------------------------------------------------- common


def trainer_args(config: RLConfig, output_dir: str | Path) -> dict[str, Any]:
    """TrainingArguments shared by both trainers: CPU-safe, no Trainer checkpoints, no trackers."""
    return {
        "output_dir": str(output_dir),
        "logging_steps": config.logging_steps,
        "save_strategy": "no",
        **trainer_safety_args(config.device, config.seed),
    }


def checkpoint_plan(
    config: RLConfig, output_dir: str | Path | None, resume: bool
) -> tuple[bool, Path | None]:
    """Whether this run checkpoints (into ``output_dir``), and the checkpoint it resumes from."""
    if output_dir is None or config.save_steps == 0:
        return False, None
    return True, resume_point(output_dir, resume)


def pick(entry: dict[str, Any], *names: str) -> float | None:
    for name in names:
        if name in entry:
            return float(entry[name])
    return None


def experimental_ok() -> None:
    """TRL 1.12 keeps PPO (and rollout_func) under trl.experimental; we pin the version, so say it once."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def restore_generation(model, tokenizer) -> None:
    """PPOTrainer sets ``generation_config.eos_token_id`` to the stop token alone: stop on all again."""
    from chatuie.models.modeling import stop_token_ids

    stops = stop_token_ids(tokenizer)
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id


# ------------------------------------------------------------------------------------------- summary


def summarize(result: RLResult, config: RLConfig) -> dict[str, Any]:
    """metrics/rl_train.json: algorithm, steps, reward at the start and end, KL, seconds, the log."""
    rewards = [r["reward"] for r in result.log if r.get("reward") is not None]
    kls = [r["kl"] for r in result.log if r.get("kl") is not None]
    window = max(1, min(3, len(rewards) // 2))  # start/end averaged over a few updates: rollouts are noisy

    def mean(values: list[float]) -> float | None:
        finite = [v for v in values if v is not None and math.isfinite(v)]
        return round(sum(finite) / len(finite), 4) if finite else None

    return {
        "algorithm": config.algorithm,
        "kl_coef": config.kl_coef,
        "steps": result.steps,
        "resumed_from_step": int(result.resumed_from.rsplit("-", 1)[1]) if result.resumed_from else 0,
        "reward_start": mean(rewards[:window]),
        "reward_end": mean(rewards[-window:]),
        "reward_first": mean(rewards[:1]),
        "reward_last": mean(rewards[-1:]),
        "kl_mean": mean(kls),
        "kl_last": mean(kls[-1:]),
        "seconds": result.seconds,
        "log": result.log,
    }
