"""The reward model: the SFT model with a one-logit sequence-classification head, trained by TRL's
``RewardTrainer`` (Bradley-Terry loss) on pre-tokenized pairs (:mod:`chatuie.reward.pairs`).

A sequence is tokenized exactly as the RL trainers present it to the reward model: the chat prompt
with the generation prompt, the answer's tokens and the end-of-turn token (no trailing newline), so
the score is read on ``<|im_end|>`` both in training and in PPO/GRPO rollouts.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch

from chatuie.models.modeling import load_saved, merge_lora, save_model
from chatuie.models.precision import resolve_autocast
from chatuie.train.launch import LaunchSettings
from chatuie.train.trainer import (
    TrainerSettings,
    TrainingProgress,
    freeze_input_embeddings,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RewardTrainSettings(TrainerSettings):
    """``rm.train``: one reward-model run (TRL ``RewardTrainer``, CPU-safe). ``per_device_batch_size``
    counts pairs per step (twice as many sequences); longer pairs than ``max_length`` are left out."""

    max_steps: int = 100
    learning_rate: float = 1e-4
    lr_scheduler: str = "linear"
    # The score head's own rate (None: learning_rate). The head starts at zero and is one vector;
    # at the backbone's rate it moved so little in 20 steps that pairs stayed near ties.
    head_learning_rate: float | None = None
    # Pulls rewards toward zero mean (Eisenstein et al. 2023): PPO adds the score to a KL penalty.
    center_rewards_coefficient: float | None = 0.01
    eval_batch_size: int = 16
    # The input embedding stays as SFT left it: on Gemma it is 170 M of the 268 M parameters, and
    # its gradient and Adam state cost more than what a few hundred pairs can teach it.
    freeze_embeddings: bool = False
    # The lowest decoder layers that keep their SFT weights: backward stops above them (time a step).
    frozen_layers: int = 0
    # bf16 autocast around fp32 weights and Adam state (Trainer's mixed precision): the matmuls run
    # in bf16, updates stay fp32; scoring after training stays fp32. auto: on where this machine
    # computes bfloat16 natively (AVX-512 BF16 / AMX / CUDA; chatuie.models.precision), off elsewhere.
    bf16: bool | str = False

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"rm.train.learning_rate must be > 0, got {self.learning_rate}")
        if self.frozen_layers < 0:
            raise ValueError(f"rm.train.frozen_layers must be >= 0, got {self.frozen_layers}")
        if self.head_learning_rate is not None and self.head_learning_rate <= 0:
            raise ValueError(f"rm.train.head_learning_rate: > 0 or null, got {self.head_learning_rate}")
        if not isinstance(self.bf16, bool) and self.bf16 != "auto":
            raise ValueError(f"rm.train.bf16: expected true, false or auto, got {self.bf16!r}")


class RewardTrainResult(NamedTuple):
    model: Any
    loss_log: list[dict[str, float]]
    global_step: int
    too_long: int  # pairs left out: a sequence longer than max_length


def load_reward_base(sft_dir: str | Path):
    """(sequence classifier with one logit, tokenizer) on the SFT model's weights.

    The ``score`` head is new (zeros, so no seed is involved); ``lm_head`` is dropped.
    ``pad_token_id`` goes into the config because the classifier reads the score at the last
    non-pad token.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(sft_dir)
    with contextlib.ExitStack() as stack:
        if (path / "adapter_config.json").exists():
            # A LoRA SFT model: its adapter folded into the base, the merged weights under the head.
            merged, tokenizer = load_saved(path, dtype="float32")
            path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rm-base-")))
            save_model(merge_lora(merged), tokenizer, path)
            del merged
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(
            f"{type(model).__name__} has no linear `score` head: the reward model needs a "
            "transformers sequence classifier with one"
        )
    # A zero head: every pair starts at the Bradley-Terry loss ln 2 and the first steps learn
    # what tells the answers apart. The seeded random head gave Gemma's large final hidden
    # states scores several units apart (first loss 7.8), and 20 steps went into shrinking it
    # (margins ~0.01, accuracy at chance).
    torch.nn.init.zeros_(head.weight)
    if head.bias is not None:
        torch.nn.init.zeros_(head.bias)
    return model, tokenizer


def load_reward_model(rm_dir: str | Path):
    """A trained reward model (or a value model initialised from it) and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def save_reward_model(model, tokenizer, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


class PairTokenizer:
    """Token ids of ``prompt + answer + <|im_end|>`` (prompt ids cached: instructions repeat)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.end_id = tokenizer.eos_token_id  # <|im_end|>: the token PPO stops on and scores at
        self._prompts: dict[str, list[int]] = {}

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        key = "\x00".join(f"{m['role']}\x01{m['content']}" for m in messages)
        ids = self._prompts.get(key)
        if ids is None:
            ids = self._prompts[key] = list(
                self.tokenizer.apply_chat_template(
                    [dict(m) for m in messages], add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
        return ids

    def __call__(self, messages: Sequence[dict[str, str]], answer: str) -> list[int]:
        answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        return self.prompt_ids(messages) + list(answer_ids) + [self.end_id]


def tokenize_pairs(
    tokenizer, pairs: Sequence[dict[str, Any]], max_length: int | None
) -> tuple[list[dict[str, list[int]]], list[int]]:
    """``[{chosen_ids, rejected_ids}]`` for the pairs that fit ``max_length``, and their indices."""
    encode = PairTokenizer(tokenizer)
    rows, kept = [], []
    for index, pair in enumerate(pairs):
        chosen = encode(pair["prompt"], pair["chosen"])
        rejected = encode(pair["prompt"], pair["rejected"])
        if max_length is not None and max(len(chosen), len(rejected)) > max_length:
            continue
        rows.append({"chosen_ids": chosen, "rejected_ids": rejected})
        kept.append(index)
    return rows, kept


def reward_config(settings: RewardTrainSettings, output_dir: str | Path, **overrides: Any):
    """TRL ``RewardConfig`` for a CPU-safe run without checkpoints (``overrides`` win)."""
    from trl import RewardConfig

    kwargs: dict[str, Any] = {
        **settings.trainer_kwargs(output_dir),
        "center_rewards_coefficient": settings.center_rewards_coefficient,
        "save_strategy": "no",  # minutes-long run: a checkpoint costs more than a rerun
        "eval_strategy": "no",
        "bf16": resolve_autocast(settings.bf16, where="rm.train.bf16"),
    }
    kwargs.update(overrides)
    return RewardConfig(**kwargs)


def freeze_lower_layers(model, count: int) -> None:
    """No gradient for the first ``count`` decoder layers (with a frozen input embedding, the
    backward pass then stops above them: less time a step, the lower features stay as SFT left them)."""
    if count <= 0:
        return
    layers = getattr(model.base_model, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder `layers` to freeze")
    if count > len(layers):
        raise ValueError(f"cannot freeze {count} layers: {type(model).__name__} has {len(layers)}")
    for layer in layers[:count]:
        layer.requires_grad_(False)


def head_rate_optimizer(model, settings: RewardTrainSettings) -> torch.optim.Optimizer | None:
    """AdamW with the ``score`` head in its own group at ``head_learning_rate``; None when the head
    trains at the backbone's rate (the Trainer then builds its optimizer as usual).

    The Trainer's schedule scales each group from its own rate, so warmup and decay apply to both.
    """
    if settings.head_learning_rate is None or settings.head_learning_rate == settings.learning_rate:
        return None
    head, backbone = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if name.split(".")[0] == "score" else backbone).append(param)
    if not head:
        raise ValueError(f"{type(model).__name__} has no trainable `score` head for head_learning_rate")
    groups = [{"params": head, "lr": settings.head_learning_rate}]
    if backbone:
        groups.insert(0, {"params": backbone, "lr": settings.learning_rate})
    return torch.optim.AdamW(groups, lr=settings.learning_rate, weight_decay=settings.weight_decay)


def train_reward_model(
    model,
    tokenizer,
    pairs: Sequence[dict[str, Any]],
    settings: RewardTrainSettings,
    output_dir: str | Path | None = None,
    **config_overrides: Any,
) -> RewardTrainResult:
    """Bradley-Terry training of ``model`` on ``pairs`` (``prompt``/``chosen``/``rejected``)."""
    from datasets import Dataset
    from trl import RewardTrainer

    rows, kept = tokenize_pairs(tokenizer, pairs, settings.max_length)
    too_long = len(pairs) - len(kept)
    if not rows:
        raise ValueError(f"no reward pair fits max_length={settings.max_length} (of {len(pairs)})")
    if too_long:
        log.warning(
            "%d of %d pairs exceed max_length=%d tokens: left out", too_long, len(pairs), settings.max_length
        )
    if settings.freeze_embeddings:
        freeze_input_embeddings(model)
    freeze_lower_layers(model, settings.frozen_layers)
    optimizer = head_rate_optimizer(model, settings)
    with tempfile.TemporaryDirectory(prefix="rm-") as scratch:
        args = reward_config(settings, output_dir or scratch, **config_overrides)
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            optimizers=(optimizer, None),  # None: the Trainer's own (AdamW) / its warmup-decay schedule
            callbacks=[TrainingProgress("rm")],
        )
        trainer.train()
    loss_log = [
        {"step": int(e["step"]), "loss": float(e["loss"]), "accuracy": float(e.get("accuracy", float("nan")))}
        for e in trainer.state.log_history
        if "loss" in e and "step" in e
    ]
    model = trainer.model
    model.eval()
    return RewardTrainResult(model, loss_log, trainer.state.global_step, too_long)


@torch.no_grad()
def score_sequences(
    model, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16
) -> list[float]:
    """The reward model's score of each token sequence (right-padded; read at its last token)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # Length-sorted batches: little padding; results go back to the input order.
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = [0.0] * len(sequences)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(sequences[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            seq = torch.as_tensor(list(sequences[i]), dtype=torch.long)
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0]
        for row, i in enumerate(chunk):
            out[i] = float(logits[row])
    if was_training:
        model.train()
    return out


def pairwise_accuracy(
    model, tokenizer, pairs: Sequence[dict[str, Any]], batch_size: int = 16, max_length: int | None = None
) -> dict[str, Any]:
    """Share of pairs where the chosen answer out-scores the rejected one: overall, by type, by dataset."""
    rows, kept = tokenize_pairs(tokenizer, pairs, max_length)
    sequences = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    scores = score_sequences(model, sequences, tokenizer.pad_token_id, batch_size)
    n = len(rows)
    # A tie (an untrained zero head scores every answer alike) counts half: chance is 50 %.
    margins = [scores[i] - scores[n + i] for i in range(n)]
    wins = [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins]

    def summary(indices: list[int]) -> dict[str, Any]:
        if not indices:
            return {"accuracy": None, "pairs": 0}
        return {
            "accuracy": round(100 * sum(wins[i] for i in indices) / len(indices), 2),
            "pairs": len(indices),
            "mean_margin": round(sum(margins[i] for i in indices) / len(indices), 4),
        }

    by_type: dict[str, list[int]] = defaultdict(list)
    by_dataset: dict[str, list[int]] = defaultdict(list)
    for i, index in enumerate(kept):
        pair = pairs[index]
        by_type[pair["type"]].append(i)
        by_dataset[pair["dataset"]].append(i)
    return {
        **summary(list(range(n))),
        "too_long": len(pairs) - n,
        "by_type": {k: summary(v) for k, v in sorted(by_type.items())},
        "by_dataset": {k: summary(v) for k, v in sorted(by_dataset.items())},
        "mean_chosen_reward": round(sum(scores[:n]) / n, 4) if n else None,
        "mean_rejected_reward": round(sum(scores[n:]) / n, 4) if n else None,
    }


@dataclass(frozen=True)
class RMStageConfig:
    """``rm`` section."""

    train: RewardTrainSettings = field(default_factory=RewardTrainSettings)
    train_accuracy_pairs: int = 200  # training pairs re-scored after training (fit check; 0 = none)
    threads: int = 0
    launch: LaunchSettings = field(default_factory=LaunchSettings)  # data-parallel (chatuie.train.launch)
