"""Strict micro P/R/F1 for entities, relations and events, with per-label breakdowns.

Matching is by **span text** by default (``match="text"``): a generative model emits strings,
not offsets, and when a string occurs twice in a sentence any offset would be the grounder's
guess, not the model's answer. Items are compared as multisets per record, so a string the
gold has twice must be predicted twice. ``match="offset"`` compares character offsets instead
(used to cross-check against seqeval on BIO tags); the two agree whenever no predicted string
repeats within its text.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from chatuie.records import Entity, Event, Relation


@dataclass
class Counts:
    tp: int = 0
    pred: int = 0
    gold: int = 0

    def add(self, pred: Counter, gold: Counter) -> None:
        self.tp += sum((pred & gold).values())
        self.pred += sum(pred.values())
        self.gold += sum(gold.values())

    @property
    def precision(self) -> float:
        return self.tp / self.pred if self.pred else 0.0

    @property
    def recall(self) -> float:
        return self.tp / self.gold if self.gold else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "precision": round(100 * self.precision, 2),
            "recall": round(100 * self.recall, 2),
            "f1": round(100 * self.f1, 2),
            "tp": self.tp,
            "pred": self.pred,
            "gold": self.gold,
        }


def _span(item: Entity | Any, match: str) -> Hashable:
    return item.text if match == "text" else (item.start, item.end)


def entity_items(entities: Iterable[Entity], match: str) -> list[tuple[str, Hashable]]:
    return [(e.type, _span(e, match)) for e in entities]


def relation_items(relations: Iterable[Relation], match: str, strict: bool) -> list[tuple]:
    items = []
    for r in relations:
        head, tail = _span(r.head, match), _span(r.tail, match)
        if strict:
            items.append((r.type, r.head.type, head, r.tail.type, tail))
        else:
            items.append((r.type, head, tail))
    return items


def event_items(events: Iterable[Event], match: str) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = defaultdict(list)
    for ev in events:
        trigger = _span(ev.trigger, match)
        out["trigger_identification"].append((trigger,))
        out["trigger_classification"].append((ev.type, trigger))
        for a in ev.arguments:
            out["argument_identification"].append((ev.type, _span(a, match)))
            out["argument_classification"].append((ev.type, a.role, _span(a, match)))
    return out


class IEScorer:
    """Accumulates gold/predicted structures record by record; ``result()`` gives the metrics."""

    def __init__(self, task: str, match: str = "text") -> None:
        if match not in ("text", "offset"):
            raise ValueError(f"match must be 'text' or 'offset', got {match!r}")
        self.task = task
        self.match = match
        self.totals: dict[str, Counts] = defaultdict(Counts)
        self.per_label: dict[str, dict[str, Counts]] = defaultdict(lambda: defaultdict(Counts))

    def _add(self, name: str, pred: list[tuple], gold: list[tuple], label_of=lambda item: item[0]) -> None:
        self.totals[name].add(Counter(pred), Counter(gold))
        labels = {label_of(x) for x in pred} | {label_of(x) for x in gold}
        for label in labels:
            self.per_label[name][label].add(
                Counter(x for x in pred if label_of(x) == label),
                Counter(x for x in gold if label_of(x) == label),
            )

    def add(self, gold: dict[str, list], pred: dict[str, list]) -> None:
        """``gold``/``pred``: ``{"entities": [...], "relations": [...], "events": [...]}``."""
        m = self.match
        if self.task in ("ner", "re"):
            self._add(
                "entity", entity_items(pred.get("entities", []), m), entity_items(gold.get("entities", []), m)
            )
        if self.task == "re":
            for name, strict in (("relation_strict", True), ("relation_boundary", False)):
                self._add(
                    name,
                    relation_items(pred.get("relations", []), m, strict),
                    relation_items(gold.get("relations", []), m, strict),
                )
        if self.task == "ee":
            p, g = event_items(pred.get("events", []), m), event_items(gold.get("events", []), m)
            for name in (
                "trigger_identification",
                "trigger_classification",
                "argument_identification",
                "argument_classification",
            ):
                label_of = (lambda x: "*") if name == "trigger_identification" else (lambda x: x[0])
                if name == "argument_classification":
                    label_of = lambda x: f"{x[0]}:{x[1]}"  # noqa: E731 - event type + role
                self._add(name, p[name], g[name], label_of)

    def result(self) -> dict[str, Any]:
        return {name: counts.as_dict() for name, counts in sorted(self.totals.items())}

    def per_label_rows(self) -> list[dict[str, Any]]:
        rows = []
        for name, labels in sorted(self.per_label.items()):
            for label, counts in sorted(labels.items()):
                rows.append({"metric": name, "label": label, **counts.as_dict()})
        return rows


# The headline F1 of each task, used for "F1 per dataset".
HEADLINE = {"ner": "entity", "re": "relation_strict", "ee": "argument_classification"}


def char_rouge1_f1(prediction: str, reference: str) -> float:
    """Character-level ROUGE-1 F1 (Chinese answers have no word boundaries)."""
    pred, ref = Counter(prediction.strip()), Counter(reference.strip())
    overlap = sum((pred & ref).values())
    if not overlap:
        return 0.0
    p, r = overlap / sum(pred.values()), overlap / sum(ref.values())
    return 2 * p * r / (p + r)


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()
