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
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from chatuie.data.records import Entity, Event, Relation


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
        # Per record, per metric: (tp, pred, gold); what bootstrap intervals resample.
        self.record_counts: list[dict[str, tuple[int, int, int]]] = []

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
        before = {name: (c.tp, c.pred, c.gold) for name, c in self.totals.items()}
        self._add_record(gold, pred)
        self.record_counts.append(
            {
                name: (c.tp - was[0], c.pred - was[1], c.gold - was[2])
                for name, c in self.totals.items()
                for was in [before.get(name, (0, 0, 0))]
            }
        )

    def _add_record(self, gold: dict[str, list], pred: dict[str, list]) -> None:
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

    def result(self, *, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
        """Every metric's P/R/F1 and counts, with the 95 % bootstrap interval of its F1 over records
        (``f1_ci95``: the records resampled with replacement, micro F1 recomputed each time)."""
        out = {}
        for name, counts in sorted(self.totals.items()):
            rows = [record.get(name, (0, 0, 0)) for record in self.record_counts]
            out[name] = {**counts.as_dict(), "f1_ci95": bootstrap_f1_interval(rows, resamples, seed)}
        return out

    def per_label_rows(self) -> list[dict[str, Any]]:
        rows = []
        for name, labels in sorted(self.per_label.items()):
            for label, counts in sorted(labels.items()):
                rows.append({"metric": name, "label": label, **counts.as_dict()})
        return rows


def _micro_f1(tp, pred, gold):
    """Micro F1 in percent from count arrays (numpy, vectorised over resamples)."""
    import numpy as np

    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nan_to_num(200.0 * tp / (pred + gold))


def percentile_interval(values, level: float = 0.95) -> list[float]:
    """The ``level`` percentile interval of bootstrap ``values``, rounded to 2 decimals."""
    import numpy as np

    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return [round(float(low), 2), round(float(high), 2)]


def bootstrap_f1_interval(
    rows: Sequence[tuple[int, int, int]], resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> list[float]:
    """The ``level`` percentile interval of micro F1 (percent) over ``resamples`` bootstrap samples of
    the records; ``rows`` holds each record's (tp, pred, gold). F1 = 2 tp / (pred + gold)."""
    import numpy as np

    if not rows:
        return [0.0, 0.0]
    counts = np.asarray(rows, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(counts), size=(resamples, len(counts)))
    sums = counts[picks].sum(axis=1)
    return percentile_interval(_micro_f1(sums[:, 0], sums[:, 1], sums[:, 2]), level)


def paired_bootstrap_deltas(
    rows_a: Sequence[tuple[int, int, int]],
    rows_b: Sequence[tuple[int, int, int]],
    resamples: int = 1000,
    seed: int = 0,
):
    """(F1(b) - F1(a) on all records, the same difference on each of ``resamples`` bootstrap samples)
    in points; paired: one resample of record indices serves both. Rows must be non-empty."""
    import numpy as np

    if len(rows_a) != len(rows_b):
        raise ValueError(f"paired bootstrap needs the same records: {len(rows_a)} vs {len(rows_b)}")
    a, b = np.asarray(rows_a, dtype=np.float64), np.asarray(rows_b, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    sa, sb = a[picks].sum(axis=1), b[picks].sum(axis=1)
    deltas = _micro_f1(sb[:, 0], sb[:, 1], sb[:, 2]) - _micro_f1(sa[:, 0], sa[:, 1], sa[:, 2])
    ta, tb = a.sum(axis=0), b.sum(axis=0)
    return float(_micro_f1(tb[0], tb[1], tb[2]) - _micro_f1(ta[0], ta[1], ta[2])), deltas


def paired_bootstrap_delta(
    rows_a: Sequence[tuple[int, int, int]],
    rows_b: Sequence[tuple[int, int, int]],
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """F1(b) - F1(a) in points on the same records (paired: one resample of record indices serves
    both), with its ``level`` percentile interval."""
    if not rows_a and not rows_b:
        return {"delta": 0.0, "ci95": [0.0, 0.0]}
    point, deltas = paired_bootstrap_deltas(rows_a, rows_b, resamples, seed)
    return {"delta": round(point, 2), "ci95": percentile_interval(deltas, level)}


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


def f1_score(predicted: set[tuple[str, ...]], gold: set[tuple[str, ...]]) -> float:
    """F1 of two item sets (:func:`chatuie.data.answers.flatten_answer`); both empty: 1."""
    if not predicted and not gold:
        return 1.0  # both say "nothing here": a perfect answer
    if not predicted or not gold:
        return 0.0
    tp = len(predicted & gold)
    if tp == 0:
        return 0.0
    precision, recall = tp / len(predicted), tp / len(gold)
    return 2 * precision * recall / (precision + recall)
