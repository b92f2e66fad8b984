"""Evaluation: IE F1 with the generation constraint on and off, and chat ability.

* IE: each test record is asked with the same instructions the model was taught (schema split
  as in ``samples.chat``), answers are parsed, grounded to offsets and merged per record, then
  scored by :class:`chatuie.eval.metrics.IEScorer`. Reported beside F1: the JSON-validity rate and the
  invented-span rate (predicted spans that are not substrings of the input).
* WebQA (held-back part): greedy answers, exact match and character-level ROUGE-1 F1.
* C-Eval val: the log-likelihood of the option letters A/B/C/D after the prompt, per category.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from chatuie.config import ConfigError
from chatuie.data.answers import ground
from chatuie.data.prompts import (
    ChatOptions,
    ie_user_prompt,
    instruction_schemas,
    mcq_user_prompt,
    messages_for,
    qa_user_prompt,
)
from chatuie.data.records import Record, Schema
from chatuie.eval.metrics import HEADLINE, IEScorer, char_rouge1_f1, exact_match
from chatuie.progress import Progress, track

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSettings:
    """``evaluate`` section of params.yaml."""

    max_records_per_dataset: int = 200  # 0 = the whole test split
    max_new_tokens: int = 256
    batch_size: int = 16
    webqa_max_new_tokens: int = 32
    max_chat_examples: int = 500  # per chat dataset, 0 = all
    # Constrained spans: "word" = substrings that cut no word (CJK: any characters) | "char" = any
    # substring (the paper's constraint). Both guarantee that no span is invented.
    span_boundaries: str = "word"
    # >1 discourages text tokens the answer already wrote (AnswerRepetitionPenalty: not the
    # prompt, not JSON punctuation): a weak model otherwise lists one span dozens of times.
    # Same value for both modes.
    repetition_penalty: float = 1.0
    # Weights the model is decoded in (LoRA merged first). bfloat16 is about twice as fast on a CPU
    # with AMX-BF16 (bench/decoding.py); float32 is the reference.
    dtype: str = "float32"
    seed: int = 13


# Bumped when the code changes what a model scores under the same params (decoding rules, scoring).
# 2: constrained answers list every schema label in order; lists name a mention once per
# occurrence; relation heads and tails come from the answer's entity block.
# 3: the repetition penalty counts only text tokens the answer wrote (AnswerRepetitionPenalty).
# 4: a constrained relation list names each head/tail pair once.
# 5: IE prompts are batched by length (other padding); F1 carries a bootstrap interval.
# 6: chat prompts are batched by length; free answers come from the decoding loop (in bfloat16
# other padding and kernels can move a score's last bits; in float32 the answers are the same).
# 7: continuous batching (rows join as others finish): other batch company, the same in float32.
PROTOCOL_VERSION = 7


def protocol_digest(
    datasets: list[str],
    constraint_modes: list[str],
    settings: EvalSettings,
    full_split_modes: list[str] | None = None,
) -> str:
    """A short digest of what decides the scores (datasets, modes, records, decoding, the protocol
    version): two models' metrics are comparable only under the same digest (the promotion gate
    checks it). ``full_split_modes``: the modes scored on whole test splits, whatever
    ``settings.max_records_per_dataset`` says."""
    described = {
        "datasets": datasets,
        "constraint_modes": constraint_modes,
        **asdict(settings),
        "protocol_version": PROTOCOL_VERSION,
    }
    if full_split_modes:  # absent when unused: digests made before the setting existed still match
        described["full_split_modes"] = sorted(full_split_modes)
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:12]


def _subsample(records: list[Record], limit: int, seed: int) -> list[Record]:
    """A fixed, seeded subset (the same records for every model), kept in corpus order."""
    if not limit or len(records) <= limit:
        return records
    import random

    keep = set(random.Random(seed).sample(range(len(records)), limit))
    return [r for i, r in enumerate(records) if i in keep]


def _prompt(tokenizer, user: str, chat: ChatOptions) -> str:
    """The request exactly as training samples pose it (same system turn, same template)."""
    messages = messages_for(user, None, chat.system_prompt)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _length_order(tokenizer, prompts: list[str], groups: list[str] | None = None) -> list[int]:
    """Indices of ``prompts``, by group (prompts of one instruction schema begin alike: a batch
    of them prefills that beginning once), then longest (in tokens) first; ties keep their order."""
    if not prompts:
        return []
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    group = groups or [""] * len(prompts)
    return sorted(range(len(prompts)), key=lambda i: (group[i], -lengths[i]))


def _starts(count: int, size: int, desc: str, unit: str = "record") -> Iterator[int]:
    """Batch starts over ``count`` items, with progress counted in items (rate and ETA)."""
    weight = lambda start: min(size, count - start)  # noqa: E731
    return track(range(0, count, size), f"evaluate {desc}", total=count, unit=unit, weight=weight)


def _spans_in(answer: Any) -> Iterable[str]:
    """Every span string of a parsed answer, whatever its shape (for the invented-span rate)."""
    if isinstance(answer, str):
        yield answer
    elif isinstance(answer, list):
        for item in answer:
            yield from _spans_in(item)
    elif isinstance(answer, dict):
        for key, value in answer.items():
            if key in ("head", "tail", "trigger") or isinstance(value, (list, dict)):
                yield from _spans_in(value)


def _merge(task: str, parts: list[dict[str, list]]) -> dict[str, list]:
    merged: dict[str, list] = {"entities": [], "relations": [], "events": []}
    for index, part in enumerate(parts):
        # re instructions repeat the whole entity block: count it once.
        if task != "re" or index == 0:
            merged["entities"].extend(part["entities"])
        merged["relations"].extend(part["relations"])
        merged["events"].extend(part["events"])
    return merged


def evaluate_ie(
    model,
    tokenizer,
    records: list[Record],
    chat: ChatOptions,
    settings: EvalSettings,
    constrained: bool,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Returns (metrics, per-label rows, predictions) for one dataset's test records."""
    task = records[0].task
    jobs: list[tuple[Record, Schema]] = [
        (r, schema) for r in records for schema in instruction_schemas(r, chat, train=False)
    ]
    # Grouped by instruction schema (a batch shares its prompts' beginning, prefilled once), then
    # longest first, so each batch holds prompts of about one length (little padding: the prefill
    # and every decode step cost per padded position); answers go back to job order.
    prompts = [_prompt(tokenizer, ie_user_prompt(task, r.text, s, chat), chat) for r, s in jobs]
    order = _length_order(tokenizer, prompts, groups=[json.dumps(asdict(s), sort_keys=True) for _, s in jobs])
    by_length = [jobs[i] for i in order]
    prompts = [prompts[i] for i in order]
    if constrained:
        from chatuie.decoding import IERequest, constrained_generate

        requests = [
            IERequest(task=task, text=r.text, schema=s, span_boundaries=settings.span_boundaries)
            for r, s in by_length
        ]
        with Progress(f"evaluate {records[0].dataset} constrained", len(prompts), unit="record") as shown:
            answers = constrained_generate(
                model,
                tokenizer,
                prompts,
                requests,
                max_new_tokens=settings.max_new_tokens,
                batch_size=settings.batch_size,
                repetition_penalty=settings.repetition_penalty,
                progress=shown,
            )
    else:
        from chatuie.decoding import free_generate

        with Progress(f"evaluate {records[0].dataset} free", len(prompts), unit="record") as shown:
            answers = free_generate(
                model,
                tokenizer,
                prompts,
                settings.max_new_tokens,
                settings.batch_size,
                repetition_penalty=settings.repetition_penalty,
                progress=shown,
            )

    in_job_order: list[str] = [""] * len(jobs)
    for position, answer in zip(order, answers, strict=True):
        in_job_order[position] = answer
    answers = in_job_order

    valid = spans = invented = 0
    parts: dict[str, list[dict]] = defaultdict(list)
    raw: dict[str, list[str]] = defaultdict(list)
    for (record, schema), answer in zip(jobs, answers, strict=True):
        raw[record.id].append(answer)
        try:
            parsed = json.loads(answer)
            grounded = ground(task, parsed, record.text, schema)
            valid += isinstance(parsed, dict)
        except (ValueError, TypeError, AttributeError):
            parts[record.id].append({"entities": [], "relations": [], "events": []})
            continue
        for span in _spans_in(parsed):
            spans += 1
            invented += span not in record.text
        parts[record.id].append(grounded)

    scorer = IEScorer(task)
    predictions = []
    for record in records:
        merged = _merge(task, parts[record.id])
        gold = {"entities": record.entities, "relations": record.relations, "events": record.events}
        scorer.add(gold, merged)
        predictions.append(
            {
                "id": record.id,
                "text": record.text,
                "answers": raw[record.id],
                "gold": _plain(gold),
                "pred": _plain(merged),
            }
        )
    metrics: dict[str, Any] = scorer.result()
    metrics["f1"] = metrics[HEADLINE[task]]["f1"]
    metrics["json_validity"] = round(100 * valid / len(jobs), 2) if jobs else 0.0
    metrics["invented_span_rate"] = round(100 * invented / spans, 2) if spans else 0.0
    metrics["spans"] = spans
    metrics["instructions"] = len(jobs)
    metrics["records"] = len(records)
    return metrics, scorer.per_label_rows(), predictions


def test_records(records: list[Record], settings: EvalSettings) -> list[Record]:
    """The records a dataset is scored on: a large test split is seeded-sampled, the same for
    every model (the pipeline and ``chatuie evaluate`` alike)."""
    return _subsample(records, settings.max_records_per_dataset, settings.seed)


def evaluate_dataset(
    model,
    tokenizer,
    records: list[Record],
    chat: ChatOptions,
    settings: EvalSettings,
    constraint_modes: list[str],
) -> dict[str, tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]]:
    """``{mode: (metrics, per-label rows, predictions)}`` of one dataset's (sampled) test records."""
    chosen = test_records(records, settings)
    return {
        mode: evaluate_ie(model, tokenizer, chosen, chat, settings, constrained=mode == "constrained")
        for mode in constraint_modes
    }


def _plain(structure: dict[str, list]) -> dict[str, list]:
    from dataclasses import asdict

    return {key: [asdict(x) for x in value] for key, value in structure.items()}


def evaluate_webqa(
    model, tokenizer, records: list[Record], chat: ChatOptions, settings: EvalSettings
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, one row per question: its answer and scores, what paired comparisons resample)."""
    prompts = [_prompt(tokenizer, qa_user_prompt(r), chat) for r in records]
    order = _length_order(tokenizer, prompts)  # batches of about one length: little padding
    prompts = [prompts[i] for i in order]
    from chatuie.decoding import free_generate

    with Progress("evaluate webqa", len(prompts), unit="question") as shown:
        by_length = free_generate(
            model, tokenizer, prompts, settings.webqa_max_new_tokens, settings.batch_size, progress=shown
        )
    answers = [""] * len(records)
    for position, answer in zip(order, by_length, strict=True):
        answers[position] = answer
    rows = [
        {
            "id": r.id,
            "answer": a,
            "reference": r.answer or "",
            "exact_match": float(exact_match(a, r.answer or "")),
            "rouge1_char_f1": round(char_rouge1_f1(a, r.answer or ""), 6),
        }
        for a, r in zip(answers, records, strict=True)
    ]
    n = max(len(records), 1)
    metrics = {
        "exact_match": round(100 * sum(row["exact_match"] for row in rows) / n, 2),
        "rouge1_char_f1": round(100 * sum(row["rouge1_char_f1"] for row in rows) / n, 2),
        "examples": len(records),
    }
    return metrics, rows


@torch.no_grad()
def evaluate_ceval(
    model, tokenizer, records: list[Record], chat: ChatOptions, settings: EvalSettings
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Accuracy by the next-token log-likelihood of each option letter after the prompt; with one
    row per question (its choice, and whether it is right)."""
    letters = ["A", "B", "C", "D"]
    letter_ids = [tokenizer.encode(x, add_special_tokens=False)[0] for x in letters]
    tokenizer.padding_side = "left"
    correct: Counter[str] = Counter()
    total: Counter[str] = Counter()
    rows: list[dict[str, Any]] = []
    prompts = [_prompt(tokenizer, mcq_user_prompt(r), chat) for r in records]
    order = _length_order(tokenizer, prompts)  # batches of about one length: little padding
    choices: list[int] = [0] * len(records)
    for start in _starts(len(records), settings.batch_size, "ceval", unit="question"):
        positions = order[start : start + settings.batch_size]
        batch = [prompts[i] for i in positions]
        encoded = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        # Only the last position's logits: the whole sequence's would be batch x length x vocab.
        logits = model(**encoded, logits_to_keep=1).logits[:, -1, :]
        for position, index in zip(positions, logits[:, letter_ids].argmax(dim=-1).tolist(), strict=True):
            choices[position] = index
    for record, index in zip(records, choices, strict=True):
        category = record.meta.get("category", "all")
        hit = letters[index] == record.answer
        rows.append({"id": record.id, "choice": letters[index], "correct": float(hit)})
        for key in {category, "all"}:
            total[key] += 1
            correct[key] += hit
    metrics = {
        "accuracy": round(100 * correct["all"] / max(total["all"], 1), 2),
        "per_category": {k: round(100 * correct[k] / total[k], 2) for k in sorted(total) if k != "all"},
        "examples": total["all"],
    }
    return metrics, rows


@dataclass(frozen=True)
class EvaluateStageConfig:
    """``evaluate`` section."""

    settings: EvalSettings = field(default_factory=EvalSettings)
    datasets: list[str] = field(default_factory=lambda: ["resume", "conll04", "fewfc"])
    # Datasets never taught (prepare refuses one in sft.datasets): metrics/<model>.json "zero_shot",
    # the report's zero-shot table; not in mean_ie_f1 nor in the protocol digest.
    zero_shot: list[str] = field(default_factory=list)
    constraint_modes: list[str] = field(default_factory=lambda: ["constrained", "free"])
    # Per model, modes instead of constraint_modes (the first is the headline): the ablation where
    # it is read, e.g. {base: [constrained], rl: [constrained]} evaluates "free" on sft alone.
    model_constraint_modes: dict[str, list[str]] = field(default_factory=dict)
    # Per model, the modes scored on the whole test splits (the paper's protocol); the others on
    # settings.max_records_per_dataset seeded records, e.g. {sft: [constrained], rl: [constrained]}.
    full_split_modes: dict[str, list[str]] = field(default_factory=dict)
    threads: int = 0

    def __post_init__(self) -> None:
        both = sorted(set(self.datasets) & set(self.zero_shot))
        if both:
            raise ConfigError(f"params.yaml: evaluate.zero_shot: {both[0]!r} is also in evaluate.datasets")
        for model, modes in self.full_split_modes.items():
            unknown = sorted(set(modes) - {"constrained", "free"})
            if unknown:
                raise ConfigError(
                    f"params.yaml: evaluate.full_split_modes.{model}: {unknown[0]!r}; "
                    "expected 'constrained' / 'free'"
                )
        for model, modes in {"": self.constraint_modes, **self.model_constraint_modes}.items():
            where = "constraint_modes" if not model else f"model_constraint_modes.{model}"
            unknown = sorted(set(modes) - {"constrained", "free"})
            if not modes or unknown:
                raise ConfigError(
                    f"params.yaml: evaluate.{where}: {unknown[0] if unknown else 'empty'!r}; "
                    "expected a non-empty list of 'constrained' / 'free'"
                )

    def modes_for(self, model: str) -> list[str]:
        """The constraint modes ``model`` is evaluated in; the first is its headline."""
        return self.model_constraint_modes.get(model, self.constraint_modes)

    def settings_for(self, model: str, mode: str) -> EvalSettings:
        """The settings ``model`` is scored with in ``mode``: whole test splits where
        ``full_split_modes`` says so, else the seeded sample of ``settings``."""
        if mode in self.full_split_modes.get(model, []):
            return replace(self.settings, max_records_per_dataset=0)
        return self.settings
