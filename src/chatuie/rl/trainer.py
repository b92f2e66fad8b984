"""RL on IE instructions under a KL penalty to the SFT model: PPO (ChatUIE §3.3) or GRPO.

* ``ppo`` (the paper's): TRL's ``trl.experimental.ppo.PPOTrainer``. Policy and frozen reference are
  the SFT model, the reward is the reward model's score of ``prompt + answer + <|im_end|>``, the
  value model starts from the reward model; the per-token reward is ``-kl_coef * KL`` with the
  score added on the last token (``kl_coef`` is the paper's β). Rollouts sample freely, or with
  ``rl.ppo.constrained_rollouts`` under the grounding constraint (:class:`ConstrainedPPOGeneration`:
  TRL's PPO generation takes no logits processor, so the policy's ``generate`` is wrapped).
  Answers without ``<|im_end|>`` lose ``missing_eos_penalty``; ``rl.ppo.f1_weight`` adds F1
  against gold to the score (:class:`RewardModelWithF1`).
* ``grpo`` (beyond the paper): TRL's ``GRPOTrainer`` with three rewards - the reward model, a
  verifiable one (F1 of the answer against gold, :func:`chatuie.reward.judge.reference_score`) and a
  validity one (parses, spans in the text, labels in the schema) - and ``beta = kl_coef``.
  ``constrained_rollouts`` samples with the grounding constraint through GRPO's ``rollout_func``:
  every rollout is a valid answer, the loss still uses the unconstrained policy's log-probs.

Prompts are the SFT instructions of training records (system + user turns), with their gold. The
rewards are :mod:`chatuie.rl.rewards`. Both trainers checkpoint into ``output_dir`` every
``save_steps`` and resume a killed run: PPO through :mod:`chatuie.rl.checkpoints`, GRPO (a regular
Trainer) from its own checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import TrainerCallback

from chatuie.data.prompts import ChatOptions
from chatuie.data.records import Record, Schema
from chatuie.models.modeling import is_peft
from chatuie.reward.model import PairTokenizer
from chatuie.reward.pairs import instructions, sample_records
from chatuie.rl.checkpoints import PPOCheckpoints
from chatuie.rl.rewards import F1_REWARDS, F1Reward, RewardModelReward, RewardModelWithF1, validity_reward
from chatuie.train.trainer import finished_state, freeze_input_embeddings, resume_point, trainer_safety_args

log = logging.getLogger(__name__)

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


class RLResult(NamedTuple):
    model: Any  # the trained policy (same object as passed in)
    log: list[dict[str, float]]  # one row per optimizer update: step, reward, kl, ... (resumed ones too)
    steps: int
    seconds: float  # this process's training time
    resumed_from: str | None = None  # the checkpoint a killed run continued from


# ------------------------------------------------------------------------------------------- prompts


def rl_prompts(
    records: Sequence[Record], chat: ChatOptions, max_prompts_per_dataset: int, seed: int
) -> list[dict[str, Any]]:
    """RL prompts: SFT instructions of ``records`` (a seeded sample per dataset), with their gold.

    Each row: ``id, dataset, task, text, schema`` (JSON string: Arrow wants one column type),
    ``gold`` (the answer string) and ``prompt`` (system + user messages).
    """
    by_dataset: dict[str, list[Record]] = {}
    for record in records:
        by_dataset.setdefault(record.dataset, []).append(record)
    rows = []
    for dataset, group in by_dataset.items():
        found = [
            {
                "id": inst.id,
                "dataset": dataset,
                "task": inst.record.task,
                "text": inst.record.text,
                "schema": json.dumps(inst.schema.to_dict(), ensure_ascii=False),
                "gold": inst.gold(),
                "prompt": inst.messages(),
            }
            for inst in instructions(group, chat)
        ]
        rows.extend(sample_records(found, max_prompts_per_dataset, seed, dataset))
    return rows


def prompt_lengths(tokenizer, prompts: Sequence[dict[str, Any]]) -> list[int]:
    encode = PairTokenizer(tokenizer)
    return [len(encode.prompt_ids(p["prompt"])) for p in prompts]


# -------------------------------------------------------------------------------- rollouts


def _generation_stops(model, tokenizer) -> list[int]:
    """The token ids ``model`` stops generating on now (a trainer may have narrowed them)."""
    eos = model.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [tokenizer.eos_token_id])


class ConstrainedRollout:
    """GRPO ``rollout_func``: sample each prompt's completion under the grounding constraint.

    Prompts are recognised by their user turn (it holds the task, schema and text); the completion
    ids end at the first end-of-turn token (kept) or at ``max_new_tokens``.
    """

    def __init__(self, prompts: Sequence[dict[str, Any]], max_new_tokens: int, temperature: float) -> None:
        self.requests = {p["prompt"][-1]["content"]: _ie_request(p) for p in prompts}
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature

    def __call__(self, prompts: list, trainer: Any) -> dict[str, Any]:
        from transformers import LogitsProcessorList

        from chatuie.decoding import IEConstraintProcessor

        tokenizer = trainer.processing_class
        model = trainer.accelerator.unwrap_model(trainer.model)
        encode = PairTokenizer(tokenizer)
        prompt_ids = [encode.prompt_ids(p) for p in prompts]
        width = max(len(ids) for ids in prompt_ids)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompt_ids])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids])
        device = next(model.parameters()).device
        requests = [self.requests[p[-1]["content"]] for p in prompts]
        stops = _generation_stops(model, tokenizer)
        processor = IEConstraintProcessor(
            tokenizer, requests, prompt_length=width, max_new_tokens=self.max_new_tokens, eos_token_ids=stops
        )
        with torch.no_grad():
            sequences = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=self.max_new_tokens,
                do_sample=True,
                temperature=self.temperature,
                top_k=0,
                top_p=1.0,
                pad_token_id=pad,
                eos_token_id=stops,
                logits_processor=LogitsProcessorList([processor]),
            )
        completion_ids = []
        for row in sequences[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), None)
            completion_ids.append(row[: cut + 1] if cut is not None else row)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}


def _ie_request(prompt: dict[str, Any]):
    """The constraint's view of an RL prompt: its task, text and schema."""
    from chatuie.decoding import IERequest

    return IERequest(prompt["task"], prompt["text"], Schema.from_dict(json.loads(prompt["schema"])))


class ConstrainedPPOGeneration:
    """PPO rollouts under the grounding constraint, while the ``with`` block runs.

    TRL's PPOTrainer samples with ``policy.generate`` and takes the rollout log-probs from the scores
    it returns, which are the *processed* scores. The wrapper adds the constraint as a logits
    processor and hands back the raw logits / temperature instead, so the rollout log-probs, the KL
    to the reference and the PPO ratio all come from the same unconstrained policy (as GRPO's
    constrained rollouts do); only which tokens get sampled is constrained. Prompts are recognised
    by their token ids (TRL left-pads them and masks the padding).
    """

    def __init__(self, policy, tokenizer, prompts: Sequence[dict[str, Any]], max_new_tokens: int) -> None:
        encode = PairTokenizer(tokenizer)
        self.requests = {tuple(encode.prompt_ids(p["prompt"])): _ie_request(p) for p in prompts}
        self.policy, self.tokenizer, self.max_new_tokens = policy, tokenizer, max_new_tokens
        self.calls = 0  # constrained generate calls (a test checks the wrapper was used)

    def generate(self, *, input_ids, attention_mask, generation_config, **kwargs: Any):
        from transformers import LogitsProcessorList

        from chatuie.decoding import IEConstraintProcessor

        try:
            requests = [
                self.requests[tuple(ids[mask.bool()].tolist())]
                for ids, mask in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)
            ]
        except KeyError:
            raise ValueError("constrained PPO rollout: a query is not one of the RL prompts") from None
        stops = _generation_stops(self.policy, self.tokenizer)
        processor = IEConstraintProcessor(
            self.tokenizer,
            requests,
            prompt_length=input_ids.shape[1],
            max_new_tokens=self.max_new_tokens,
            eos_token_ids=stops,
        )
        output = self._original(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=generation_config,
            logits_processor=LogitsProcessorList([processor]),
            output_logits=True,
            **kwargs,
        )
        temperature = generation_config.temperature or 1.0
        output.scores = tuple(logits / temperature for logits in output.logits)
        self.calls += 1
        return output

    def __enter__(self) -> ConstrainedPPOGeneration:
        self._original = self.policy.generate
        self.policy.generate = self.generate  # an instance attribute: shadows the class's method
        return self

    def __exit__(self, *exc: object) -> None:
        del self.policy.generate


# -------------------------------------------------------------------------------------------- common


def _trainer_args(config: RLConfig, output_dir: str | Path) -> dict[str, Any]:
    """TrainingArguments shared by both trainers: CPU-safe, no Trainer checkpoints, no trackers."""
    return {
        "output_dir": str(output_dir),
        "logging_steps": config.logging_steps,
        "save_strategy": "no",
        **trainer_safety_args(config.device, config.seed),
    }


def _checkpoints(config: RLConfig, output_dir: str | Path | None, resume: bool) -> tuple[bool, Path | None]:
    """Whether this run checkpoints (into ``output_dir``), and the checkpoint it resumes from."""
    if output_dir is None or config.save_steps == 0:
        return False, None
    return True, resume_point(output_dir, resume)


class _F1Log(TrainerCallback):
    """Puts each update's mean F1 term (:class:`RewardModelWithF1`) on that update's log entry, so
    it is in the trainer state a checkpoint keeps."""

    def __init__(self, scored: RewardModelWithF1) -> None:
        self.scored, self.seen = scored, 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        part, self.seen = self.scored.f1[self.seen :], len(self.scored.f1)
        if part and state.log_history:
            state.log_history[-1]["objective/f1"] = sum(part) / len(part)


def _pick(entry: dict[str, Any], *names: str) -> float | None:
    for name in names:
        if name in entry:
            return float(entry[name])
    return None


# ----------------------------------------------------------------------------------------------- PPO


def _experimental_ok() -> None:
    """TRL 1.12 keeps PPO (and rollout_func) under trl.experimental; we pin the version, so say it once."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def ppo_config(config: RLConfig, output_dir: str | Path, **overrides: Any):
    _experimental_ok()
    from trl.experimental.ppo import PPOConfig

    s = config.ppo
    kwargs = {
        **_trainer_args(config, output_dir),
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
    _experimental_ok()
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
    saving, checkpoint = _checkpoints(config, output_dir, resume)
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
                "reward": _pick(entry, "objective/scores"),
                "kl": _pick(entry, "objective/kl"),
                "rlhf_reward": _pick(entry, "objective/rlhf_reward"),
                "entropy": _pick(entry, "policy/entropy_avg"),
                "policy_loss": _pick(entry, "loss/policy_avg"),
                "value_loss": _pick(entry, "loss/value_avg"),
                "eos_tokens": _pick(entry, "val/num_eos_tokens"),
            }
        )
        if isinstance(scored, RewardModelWithF1):  # the verifiable term's share of the update
            f1 = _pick(entry, "objective/f1")
            rows[-1]["f1"] = round(f1, 4) if f1 is not None else None
    policy.eval()
    _restore_generation(policy, tokenizer)
    seconds = round(time.monotonic() - started, 1)
    resumed_from = str(checkpoint) if checkpoint else None
    return RLResult(policy, rows, trainer.state.global_step, seconds, resumed_from)


def _restore_generation(model, tokenizer) -> None:
    """PPOTrainer sets ``generation_config.eos_token_id`` to the stop token alone: stop on all again."""
    from chatuie.models.modeling import stop_token_ids

    stops = stop_token_ids(tokenizer)
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id


# ---------------------------------------------------------------------------------------------- GRPO


def grpo_config(config: RLConfig, output_dir: str | Path, **overrides: Any):
    from trl import GRPOConfig

    s = config.grpo
    weights = s.reward_weights
    kwargs = {
        **_trainer_args(config, output_dir),
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
        _experimental_ok()
        rollout = ConstrainedRollout(prompts, s.max_completion_length, s.temperature)
    if config.freeze_embeddings:
        freeze_input_embeddings(policy)
    tokenizer.padding_side = "left"
    saving, checkpoint = _checkpoints(config, output_dir, resume)
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
                "reward": _pick(entry, "reward"),
                "kl": _pick(entry, "kl"),
                "reward_model": _pick(entry, "rewards/reward_model/mean"),
                "f1": _pick(entry, "rewards/f1_reward/mean"),
                "validity": _pick(entry, "rewards/validity_reward/mean"),
                "completion_length": _pick(entry, "completions/mean_length"),
                "loss": _pick(entry, "loss"),
            }
        )
    model = trainer.model
    if is_peft(model) and "ref" in model.peft_config:
        # TRL's frozen copy of the SFT adapter (the KL reference when a LoRA SFT model trains on):
        # not part of the policy, and save_pretrained would write it beside the adapter.
        model.delete_adapter("ref")
    model.eval()
    _restore_generation(model, tokenizer)
    seconds = round(time.monotonic() - started, 1)
    return RLResult(model, rows, global_step, seconds, str(checkpoint) if checkpoint else None)


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
