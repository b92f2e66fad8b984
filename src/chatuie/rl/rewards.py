"""The rewards RL trains on: the reward model's score, F1 of an answer against gold, validity.

* :class:`RewardModelReward` (GRPO): the reward model's score of ``prompt + completion``.
* :class:`F1Reward` (GRPO, and PPO through :class:`RewardModelWithF1`): the verifiable reward.
* :func:`validity_reward` (GRPO): parses, spans in the text, labels in the schema.
* :class:`RewardModelWithF1` (PPO): the reward model's score + ``weight`` x F1, in the shape TRL's
  PPOTrainer reads a reward model in.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from chatuie.data.answers import flatten_answer, ground
from chatuie.data.records import Schema
from chatuie.eval.metrics import f1_score
from chatuie.reward.judge import reference_score
from chatuie.reward.judge_types import JudgeItem
from chatuie.reward.model import PairTokenizer, score_sequences

F1_REWARDS = ("items", "parts")
# The parts of each task's answer, as chatuie.data.answers.flatten_answer names its items' kinds.
TASK_PARTS = {"ner": ("entity",), "re": ("entity", "relation"), "ee": ("trigger", "argument")}


def _completion_text(completion: Any) -> str:
    """A GRPO completion: a string, or (conversational) ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"] if completion else ""


class F1Reward:
    """Verifiable GRPO reward (0-1) of each answer against gold: F1 over its (label, span) items, or
    (``by_part``) the mean over the task's parts of each part's F1 (a part empty in both counts 1).
    """

    __name__ = "f1_reward"  # TRL logs rewards under the callable's name

    def __init__(self, by_part: bool = False) -> None:
        self.by_part = by_part

    def score(self, task: str, text: str, answer: str, gold: str) -> float:
        if not self.by_part:
            item = JudgeItem(id="", task=task, text=text, candidate=answer, gold=gold)
            return reference_score(item)[0] / 10.0
        try:
            predicted = flatten_answer(task, answer)
        except ValueError:  # includes json.JSONDecodeError: an unreadable answer earns nothing
            return 0.0
        expected = flatten_answer(task, gold)
        parts = TASK_PARTS[task]
        return sum(
            f1_score({i for i in predicted if i[0] == part}, {i for i in expected if i[0] == part})
            for part in parts
        ) / len(parts)

    def __call__(
        self, completions: list, task: list[str], text: list[str], gold: list[str], **_: Any
    ) -> list[float]:
        return [
            self.score(t, x, _completion_text(c), g)
            for c, t, x, g in zip(completions, task, text, gold, strict=True)
        ]


f1_reward = F1Reward()


def validity(task: str, answer: str, text: str, schema: Schema) -> float:
    """0 if ``answer`` is not a JSON object; else 0.5 + 0.5 x the share of its parts that ground
    (spans found in ``text``, labels in ``schema``, well-formed items)."""
    try:
        parsed = json.loads(answer)
        grounded = ground(task, parsed, text, schema)
    except (ValueError, TypeError, AttributeError):
        return 0.0
    kept = len(grounded["entities"]) + len(grounded["relations"]) + len(grounded["events"])
    kept += sum(len(e.arguments) for e in grounded["events"])
    dropped = grounded["dropped"]
    return 0.5 + 0.5 * (kept / (kept + dropped) if kept + dropped else 1.0)


def validity_reward(
    completions: list, task: list[str], text: list[str], schema: list[str], **_: Any
) -> list[float]:
    """Validity reward (0-1): parses, spans in the text, labels in the schema."""
    return [
        validity(t, _completion_text(c), x, Schema.from_dict(json.loads(s)))
        for c, t, x, s in zip(completions, task, text, schema, strict=True)
    ]


class RewardModelReward:
    """GRPO reward function: the reward model's score of ``prompt + completion (+ <|im_end|>)``.

    Tokenized as in reward-model training and in PPO (prompt ids + the completion's own ids), so
    the score is read on the end-of-turn token; a completion cut at the length limit is scored as is.
    """

    __name__ = "reward_model"  # TRL logs rewards under the callable's name

    def __init__(self, model, tokenizer, batch_size: int = 16) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.encode = PairTokenizer(tokenizer)
        self.batch_size = batch_size

    def __call__(
        self, prompts: list, completions: list, completion_ids: list[list[int]], **_: Any
    ) -> list[float]:
        sequences = [
            self.encode.prompt_ids(prompt) + list(ids)
            for prompt, ids in zip(prompts, completion_ids, strict=True)
        ]
        return score_sequences(self.model, sequences, self.tokenizer.pad_token_id, self.batch_size)


class RewardModelWithF1(torch.nn.Module):
    """PPO's reward with a verifiable term: the reward model's score + ``weight`` x F1 against gold.

    TRL's PPOTrainer reads a reward as ``model.score(backbone(...).hidden_states[-1])`` at the last
    response token, with ``backbone = getattr(model, model.base_model_prefix)``; this module is such a
    model. Its backbone call finds, for each row, the RL prompt the (unpadded) ids start with and
    scores the answer after it (:class:`F1Reward`); its ``score`` adds that to the row's every
    position, so the term lands on whichever token TRL reads. ``f1`` keeps each row's F1, in order.
    """

    base_model_prefix = "backbone"

    def __init__(
        self, reward_model, tokenizer, prompts: Sequence[dict[str, Any]], weight: float, f1: F1Reward
    ) -> None:
        super().__init__()
        self.reward_model, self.tokenizer, self.weight, self.f1_reward = reward_model, tokenizer, weight, f1
        encode = PairTokenizer(tokenizer)
        self.prompts = {tuple(encode.prompt_ids(p["prompt"])): p for p in prompts}
        self.lengths = sorted({len(k) for k in self.prompts}, reverse=True)
        self.f1: list[float] = []
        self._bonus: torch.Tensor | None = None

    def _row_f1(self, ids: list[int]) -> float:
        for length in self.lengths:
            prompt = self.prompts.get(tuple(ids[:length]))
            if prompt is not None:
                break
        else:
            raise ValueError("PPO reward: a rollout does not start with one of the RL prompts")
        answer = ids[length:]
        if self.tokenizer.eos_token_id in answer:
            answer = answer[: answer.index(self.tokenizer.eos_token_id)]
        text = self.tokenizer.decode(answer, skip_special_tokens=True).strip()
        return self.f1_reward.score(prompt["task"], prompt["text"], text, prompt["gold"])

    def backbone(self, *, input_ids, attention_mask, **kwargs: Any):
        pairs = zip(input_ids.cpu(), attention_mask.cpu(), strict=True)
        f1 = [self._row_f1(ids[mask.bool()].tolist()) for ids, mask in pairs]
        self.f1.extend(f1)
        self._bonus = self.weight * torch.tensor(f1, device=input_ids.device)
        inner = getattr(self.reward_model, self.reward_model.base_model_prefix)
        return inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def score(self, hidden_states: torch.Tensor) -> torch.Tensor:
        scores = self.reward_model.score(hidden_states)
        return scores + self._bonus.to(scores.dtype)[:, None, None]
