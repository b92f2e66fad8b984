"""Reward data (ChatUIE §3.2): preference pairs ``(prompt, chosen, rejected)`` from two sources.

* **confusing negatives** (:mod:`chatuie.reward.negatives`): the gold answer of a training instruction
  against the same answer with one plausible mistake;
* **judge-scored predictions**: the SFT model samples ``k`` grounded answers per prompt
  (:func:`chatuie.decoding.constrained_generate` with sampling) on records it did not train
  on (:mod:`chatuie.data.splits`), a judge (:mod:`chatuie.reward.judge`) scores each, and the best and
  worst answers make a pair when their scores differ by at least ``margin``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import torch

from chatuie.data.answers import render
from chatuie.data.prompts import ChatOptions, ie_user_prompt, instruction_schemas, messages_for
from chatuie.data.records import IE_TASKS, Record, Schema
from chatuie.data.splits import stable_unit
from chatuie.progress import Progress
from chatuie.reward.judge_types import JudgeItem, JudgeResult
from chatuie.reward.negatives import ConfusionTable, NegativeSettings, make_negatives

log = logging.getLogger(__name__)
T = TypeVar("T")

_TASK_INSTRUCTION = {
    "ner": "Extract the named entities of the listed types.",
    "re": "Extract the entities of the listed types and the relations of the listed types between them.",
    "ee": "Extract the events of the listed types: their triggers and their arguments by role.",
}


# ------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class JudgedSettings:
    """``reward_data.judged``: sampled SFT answers scored by the judge."""

    enabled: bool = True
    # Records to sample on: "heldout" (train records the sft stage leaves out) or a split name (dev, ...).
    split: str = "heldout"
    max_prompts_per_dataset: int = 16  # instructions per dataset (0 = all)
    samples_per_prompt: int = 4  # k answers sampled per instruction
    temperature: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    batch_size: int = 16
    margin: float = 2.0  # judge scores are 0-10: best/worst make a pair when they differ by this much
    seed: int = 13

    def __post_init__(self) -> None:
        if self.enabled and self.samples_per_prompt < 2:
            raise ValueError("judged.samples_per_prompt must be >= 2 (a pair needs two answers)")


@dataclass(frozen=True)
class RewardDataConfig:
    """``reward_data`` section."""

    datasets: list[str] = field(default_factory=lambda: ["resume", "conll04", "fewfc"])
    max_records_per_dataset: int = 200  # train records negatives are made from (0 = all)
    negatives: NegativeSettings = field(default_factory=NegativeSettings)
    judged: JudgedSettings = field(default_factory=JudgedSettings)
    eval_fraction: float = 0.15  # share of records whose pairs are kept out of RM training (its accuracy)
    confusions_from: str = "reports/eval/sft"  # SFT predictions that weight label swaps ("" = uniform)
    threads: int = 0
    seed: int = 13


# --------------------------------------------------------------------------------------------- pairs


class Instruction(NamedTuple):
    """One IE instruction: a record, the index of its instruction, that instruction's schema, and
    the chat options its prompt is built with (system turn, format hint: as the SFT samples)."""

    record: Record
    index: int
    schema: Schema
    chat: ChatOptions = ChatOptions()

    @property
    def id(self) -> str:
        return f"{self.record.id}#{self.index}"

    def messages(self) -> list[dict[str, str]]:
        """The prompt turns (system if configured, user): the SFT sample of this instruction's."""
        user = ie_user_prompt(self.record.task, self.record.text, self.schema, self.chat)
        return messages_for(user, None, self.chat.system_prompt)

    def gold(self) -> str:
        return render(self.record, self.schema)


def instructions(records: Iterable[Record], chat: ChatOptions) -> Iterator[Instruction]:
    """Every instruction of every IE record, schemas as the SFT samples split and order them."""
    for record in records:
        if record.task not in IE_TASKS:
            continue
        for index, schema in enumerate(instruction_schemas(record, chat, train=True)):
            yield Instruction(record, index, schema, chat)


def pair_split(record_id: str, eval_fraction: float, seed: int) -> str:
    """``eval`` for about ``eval_fraction`` of records (all their pairs), else ``train``."""
    return "eval" if stable_unit("rm-eval", seed, record_id) < eval_fraction else "train"


def sample_records(rows: Sequence[T], limit: int, seed: int, salt: str = "") -> list[T]:
    """A seeded subset of ``limit`` rows (all if ``limit`` is 0), in their original order."""
    if not limit or len(rows) <= limit:
        return list(rows)
    keep = set(random.Random(f"{seed}:{salt}").sample(range(len(rows)), limit))
    return [r for i, r in enumerate(rows) if i in keep]


def negative_pairs(
    records: Iterable[Record],
    chat: ChatOptions,
    settings: NegativeSettings,
    confusion: ConfusionTable | None = None,
    *,
    eval_fraction: float = 0.0,
    seed: int = 13,
) -> list[dict[str, Any]]:
    """Gold-vs-negative pairs for every instruction of ``records``."""
    pairs = []
    for inst in instructions(records, chat):
        gold = inst.gold()
        for negative in make_negatives(inst.record, inst.schema, settings, confusion, instruction=inst.index):
            pairs.append(_pair(inst, "negative", negative.type, gold, negative.answer, eval_fraction, seed))
    return pairs


def _pair(
    inst: Instruction,
    source: str,
    kind: str,
    chosen: str,
    rejected: str,
    eval_fraction: float,
    seed: int,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "id": f"{inst.id}:{kind}",
        "record_id": inst.record.id,
        "dataset": inst.record.dataset,
        "task": inst.record.task,
        "source": source,
        "type": kind,
        "split": pair_split(inst.record.id, eval_fraction, seed),
        "prompt": inst.messages(),
        "chosen": chosen,
        "rejected": rejected,
        **extra,
    }


# ---------------------------------------------------------------------------- judge-scored predictions


def sample_answers(
    model, tokenizer, jobs: Sequence[Instruction], settings: JudgedSettings
) -> list[list[str]]:
    """``settings.samples_per_prompt`` constrained, sampled answers per instruction (seeded)."""
    from chatuie.decoding import IERequest, constrained_generate

    k = settings.samples_per_prompt
    prompts, requests = [], []
    for inst in jobs:
        prompt = tokenizer.apply_chat_template(inst.messages(), tokenize=False, add_generation_prompt=True)
        request = IERequest(task=inst.record.task, text=inst.record.text, schema=inst.schema)
        prompts.extend([prompt] * k)
        requests.extend([request] * k)
    shown = Progress("reward_data: sampled answers", len(prompts), unit="answer")
    with torch.random.fork_rng(devices=[]), shown:
        torch.manual_seed(settings.seed)
        answers = constrained_generate(
            model,
            tokenizer,
            prompts,
            requests,
            max_new_tokens=settings.max_new_tokens,
            do_sample=True,
            temperature=settings.temperature,
            top_k=settings.top_k,
            batch_size=settings.batch_size,
            progress=shown,
        )
    return [answers[i * k : (i + 1) * k] for i in range(len(jobs))]


def judge_items(jobs: Sequence[Instruction], answers: Sequence[Sequence[str]]) -> list[JudgeItem]:
    """One judge item per sampled answer (``gold`` is the instruction's gold, for the reference judge)."""
    items = []
    for inst, candidates in zip(jobs, answers, strict=True):
        gold = inst.gold()
        for j, candidate in enumerate(candidates):
            items.append(
                JudgeItem(
                    id=f"{inst.id}/{j}",
                    task=inst.record.task,
                    text=inst.record.text,
                    candidate=candidate,
                    schema=inst.schema.to_dict(),
                    instruction=_TASK_INSTRUCTION[inst.record.task],
                    gold=gold,
                )
            )
    return items


def judged_pairs(
    jobs: Sequence[Instruction],
    answers: Sequence[Sequence[str]],
    results: Sequence[JudgeResult],
    margin: float,
    *,
    eval_fraction: float = 0.0,
    seed: int = 13,
) -> list[dict[str, Any]]:
    """Best vs worst scored answer of each instruction, when the scores differ by >= ``margin``."""
    pairs = []
    flat = iter(results)
    for inst, candidates in zip(jobs, answers, strict=True):
        scored = []
        for answer in candidates:
            result = next(flat)
            if result.score is not None:  # failed / unparseable / over budget: no evidence either way
                scored.append((result.score, answer))
        if len(scored) < 2:
            continue
        best = max(scored, key=lambda x: x[0])
        worst = min(scored, key=lambda x: x[0])
        if best[0] - worst[0] >= margin and best[1] != worst[1]:
            pairs.append(
                _pair(
                    inst,
                    "judge",
                    "judge",
                    best[1],
                    worst[1],
                    eval_fraction,
                    seed,
                    chosen_score=best[0],
                    rejected_score=worst[0],
                )
            )
    return pairs
