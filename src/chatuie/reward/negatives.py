"""Confusing negatives: gold answers with one plausible mistake, for the reward model (ChatUIE §3.2).

A negative is the gold record of one instruction with a single edit, rendered through the same
output format (:func:`chatuie.data.answers.render`), so it is always well-formed JSON whose spans
are substrings of the text and whose labels come from the instruction's schema. It only differs
from gold in *what* it says:

=====================  =======  ================================================================
type                   tasks    edit
=====================  =======  ================================================================
``label_swap``         ner, re  an entity's type -> another type of the schema (confusion-weighted)
``boundary_shift``     all      an entity / argument edge moved by 1..``max_shift`` characters
``missing``            all      one entity, relation, event or argument left out
``invented``           all      an in-text span that is not gold, with a schema label
``relation_direction`` re       a relation's head and tail swapped
``relation_type``      re       a relation's type -> another type of the schema
``spurious_relation``  re       a relation gold does not state, between two of the record's entities
                                (half the time a gold pair under another type, confusion-weighted)
``role_swap``          ee       an argument's role -> another role of its event type
``trigger_shift``      ee       an event trigger's edge moved by 1..``max_shift`` characters
``emptied``            all      every item left out: each label answers ``[]`` (gold has >= 2
                                items; with one, that is ``missing``)
=====================  =======  ================================================================

``emptied`` is there because a policy can learn to answer nothing: an earlier PPO model answered
every Resume record with empty lists under a reward model that had never seen gold next to an
empty answer. ``spurious_relation`` is there for the opposite: another PPO model listed one
entity pair under every relation type (232 CoNLL04 relations for 64 gold) under a reward model whose
negatives only ever dropped or changed relations, never added one.

Every negative is checked to differ from gold as a *set* of (label, span) items
(:func:`chatuie.data.answers.flatten_answer`), not just as a string, so a scorer cannot call it right.
Label choices prefer the pairs the SFT model actually confuses (:class:`ConfusionTable`, read from
its evaluation predictions) and fall back to uniform. Everything is seeded per record and
instruction: the same inputs give the same negatives in any order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatuie.data.answers import flatten_answer, render
from chatuie.data.records import Argument, Entity, Event, Record, Relation, Schema, Trigger
from chatuie.io import read_jsonl

_SPAN_TYPES = ("label_swap", "boundary_shift", "missing", "invented")  # what ner and re share
# Each tuple's order seeds which types an instruction draws: reordering changes the negatives.
TYPES_BY_TASK: dict[str, tuple[str, ...]] = {
    "ner": (*_SPAN_TYPES, "emptied"),
    "re": (*_SPAN_TYPES, "relation_direction", "relation_type", "emptied", "spurious_relation"),
    "ee": ("boundary_shift", "missing", "invented", "role_swap", "trigger_shift", "emptied"),
}
# Every type, in first-seen order (make_negatives draws from its task's tuple, so order is cosmetic).
NEGATIVE_TYPES: tuple[str, ...] = tuple(dict.fromkeys(t for types in TYPES_BY_TASK.values() for t in types))
_ATTEMPTS = 12  # random tries per edit before giving up on that type for this instruction


@dataclass(frozen=True)
class NegativeSettings:
    """``reward_data.negatives``: how confusing negatives are made."""

    per_instruction: int = 2  # negatives per instruction, each of a different type
    types: list[str] = field(default_factory=lambda: list(NEGATIVE_TYPES))
    max_shift: int = 3  # boundary / trigger shifts move an edge by 1..max_shift characters
    max_invented_length: int = 8  # invented spans are 1..this many characters
    confusion_smoothing: float = 1.0  # added to every confusion count (0: only observed confusions)
    # How often a type is drawn first, relative to 1 (unnamed types): the hard, rarely applicable
    # edits (a relation's type, an argument's role) get more pairs. Empty: a uniform shuffle.
    type_weights: dict[str, float] = field(default_factory=dict)
    seed: int = 13

    def __post_init__(self) -> None:
        unknown = sorted(set(self.types) - set(NEGATIVE_TYPES))
        if unknown:
            raise ValueError(f"unknown negative types {unknown} (known: {', '.join(NEGATIVE_TYPES)})")
        unknown = sorted(set(self.type_weights) - set(NEGATIVE_TYPES))
        if unknown:
            known = ", ".join(NEGATIVE_TYPES)
            raise ValueError(f"negatives.type_weights: unknown types {unknown} (known: {known})")
        bad = {k: w for k, w in self.type_weights.items() if not w > 0}
        if bad:
            raise ValueError(f"negatives.type_weights: weights must be > 0, got {bad}")
        if self.max_shift < 1 or self.max_invented_length < 1 or self.per_instruction < 0:
            raise ValueError("negatives: max_shift and max_invented_length >= 1, per_instruction >= 0")

    def draw_order(self, types: Sequence[str], rng: random.Random) -> list[str]:
        """``types`` in the order an instruction tries them: a shuffle, weighted when weights are set.

        Weighted sampling without replacement (Efraimidis-Spirakis: sort by ``u ** (1 / w)``).
        """
        if not self.type_weights:
            order = list(types)
            rng.shuffle(order)  # unweighted: the draws of the runs before type_weights existed
            return order
        keys = {t: rng.random() ** (1.0 / self.type_weights.get(t, 1.0)) for t in types}
        return sorted(types, key=lambda t: -keys[t])


@dataclass(frozen=True)
class Negative:
    type: str
    record: Record  # the edited copy of the gold record
    answer: str  # its rendering under the instruction's schema


# ----------------------------------------------------------------------------------------- confusions


class ConfusionTable:
    """Counts of (gold label -> predicted label) on the same span, by kind.

    Kinds: ``entity`` (same span text), ``relation`` (same head and tail), ``event`` (same trigger),
    ``role`` (same event type and argument span). Read from the evaluation predictions of a model
    (``predictions.<dataset>.<mode>.jsonl``: ``gold`` / ``pred`` structures).
    """

    def __init__(self, counts: Counter[tuple[str, str, str]] | None = None) -> None:
        self.counts: Counter[tuple[str, str, str]] = counts or Counter()

    def __bool__(self) -> bool:
        return bool(self.counts)

    def add(self, kind: str, gold: str, pred: str, n: int = 1) -> None:
        if gold != pred:
            self.counts[(kind, gold, pred)] += n

    def add_prediction(self, row: dict[str, Any]) -> None:
        """Count one predictions row (``{"gold": {...}, "pred": {...}}``)."""
        gold, pred = row.get("gold") or {}, row.get("pred") or {}
        self._pairs("entity", gold.get("entities", []), pred.get("entities", []), lambda e: e["text"])
        self._pairs(
            "relation",
            gold.get("relations", []),
            pred.get("relations", []),
            lambda r: (r["head"]["text"], r["tail"]["text"]),
        )
        self._pairs("event", gold.get("events", []), pred.get("events", []), lambda e: e["trigger"]["text"])
        gold_args = [
            {**a, "event": e["type"]} for e in gold.get("events", []) for a in e.get("arguments", [])
        ]
        pred_args = [
            {**a, "event": e["type"]} for e in pred.get("events", []) for a in e.get("arguments", [])
        ]
        self._pairs("role", gold_args, pred_args, lambda a: (a["event"], a["text"]), label="role")

    def _pairs(
        self, kind: str, gold: list, pred: list, key: Callable[[dict], Any], label: str = "type"
    ) -> None:
        by_key: dict[Any, list[str]] = {}
        for item in pred:
            by_key.setdefault(key(item), []).append(item[label])
        for item in gold:
            for predicted in by_key.get(key(item), []):
                self.add(kind, item[label], predicted)

    @classmethod
    def from_predictions(cls, paths: Iterable[str | Path]) -> ConfusionTable:
        table = cls()
        for path in paths:
            for row in read_jsonl(path):
                table.add_prediction(row)
        return table

    @classmethod
    def from_eval_dir(cls, eval_dir: str | Path) -> ConfusionTable:
        """From every ``predictions.*.jsonl`` of an evaluation report directory (empty if none)."""
        directory = Path(eval_dir)
        paths = sorted(directory.glob("predictions.*.jsonl")) if directory.is_dir() else []
        return cls.from_predictions(paths)

    def pick(
        self, kind: str, gold: str, candidates: Sequence[str], rng: random.Random, smoothing: float
    ) -> str:
        """A candidate label, weighted by how often ``gold`` was predicted as it (+ ``smoothing``)."""
        weights = [self.counts.get((kind, gold, c), 0) + smoothing for c in candidates]
        if sum(weights) <= 0:
            weights = [1.0] * len(candidates)  # nothing observed and no smoothing: uniform
        return rng.choices(list(candidates), weights=weights, k=1)[0]

    def top(self, n: int = 10) -> list[dict[str, Any]]:
        return [
            {"kind": kind, "gold": gold, "pred": pred, "count": count}
            for (kind, gold, pred), count in self.counts.most_common(n)
        ]


# ------------------------------------------------------------------------------------------ helpers


def record_rng(seed: int, *parts: object) -> random.Random:
    """A generator seeded by ``seed`` and ``parts`` only (independent of call order)."""
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _span_ok(text: str, start: int, end: int) -> bool:
    """A span the constrained decoder could write: inside the text, not blank, no control characters."""
    if not 0 <= start < end <= len(text):
        return False
    span = text[start:end]
    return bool(span.strip()) and all(ord(ch) >= 0x20 for ch in span)


def _shifted(text: str, start: int, end: int, max_shift: int, rng: random.Random) -> tuple[int, int] | None:
    """A span with one or both edges moved by 1..max_shift characters (a different, valid span)."""
    for _ in range(_ATTEMPTS):
        delta = rng.randint(1, max_shift) * rng.choice((-1, 1))
        mode = rng.choice(("start", "end", "both"))
        new_start = start + delta if mode in ("start", "both") else start
        new_end = end + delta if mode in ("end", "both") else end
        if (new_start, new_end) != (start, end) and _span_ok(text, new_start, new_end):
            return new_start, new_end
    return None


def _random_span(
    text: str, max_length: int, rng: random.Random, lengths: Sequence[int]
) -> tuple[int, int] | None:
    """A random valid span; its length follows the gold spans' lengths when there are any."""
    for _ in range(_ATTEMPTS):
        length = rng.choice(lengths) if lengths else rng.randint(1, max_length)
        length = max(1, min(length + rng.randint(-1, 1), max_length, len(text)))
        start = rng.randint(0, len(text) - length) if len(text) >= length else 0
        if _span_ok(text, start, start + length):
            return start, start + length
    return None


def _entities_in(record: Record, schema: Schema) -> list[int]:
    return [i for i, e in enumerate(record.entities) if e.type in schema.entities]


def _relations_in(record: Record, schema: Schema) -> list[int]:
    return [i for i, r in enumerate(record.relations) if r.type in schema.relations]


def _events_in(record: Record, schema: Schema) -> list[int]:
    return [i for i, e in enumerate(record.events) if e.type in schema.events]


def _arguments_in(record: Record, schema: Schema) -> list[tuple[int, int]]:
    return [
        (i, j)
        for i in _events_in(record, schema)
        for j, a in enumerate(record.events[i].arguments)
        if a.role in schema.events[record.events[i].type]
    ]


def _replace_entity(record: Record, index: int, new: Entity) -> Record:
    """``record`` with entity ``index`` replaced; relations pointing at it follow (same offsets)."""
    old = record.entities[index]
    entities = list(record.entities)
    entities[index] = new

    def follow(e: Entity) -> Entity:
        return new if (e.start, e.end, e.type) == (old.start, old.end, old.type) else e

    relations = [Relation(r.type, follow(r.head), follow(r.tail)) for r in record.relations]
    return dataclasses.replace(record, entities=entities, relations=relations)


def _replace_event(record: Record, index: int, new: Event) -> Record:
    events = list(record.events)
    events[index] = new
    return dataclasses.replace(record, events=events)


# -------------------------------------------------------------------------------------------- edits


class _Editor:
    """The edits of one instruction (record + schema); each returns an edited record or None."""

    def __init__(
        self,
        record: Record,
        schema: Schema,
        settings: NegativeSettings,
        confusion: ConfusionTable,
        gold_items: set[tuple[str, ...]],
    ) -> None:
        self.record = record
        self.schema = schema
        self.gold_items = gold_items  # flatten_answer of the gold rendering
        self.settings = settings
        self.confusion = confusion

    def pick_label(self, kind: str, gold: str, candidates: Sequence[str], rng: random.Random) -> str:
        return self.confusion.pick(kind, gold, candidates, rng, self.settings.confusion_smoothing)

    def label_swap(self, rng: random.Random) -> Record | None:
        choices = _entities_in(self.record, self.schema)
        if not choices or len(self.schema.entities) < 2:
            return None
        index = rng.choice(choices)
        entity = self.record.entities[index]
        candidates = [label for label in self.schema.entities if label != entity.type]
        label = self.pick_label("entity", entity.type, candidates, rng)
        return _replace_entity(self.record, index, dataclasses.replace(entity, type=label))

    def boundary_shift(self, rng: random.Random) -> Record | None:
        text = self.record.text
        if self.record.task == "ee":
            args = _arguments_in(self.record, self.schema)
            if not args:
                return None
            i, j = rng.choice(args)
            event = self.record.events[i]
            arg = event.arguments[j]
            where = _shifted(text, arg.start, arg.end, self.settings.max_shift, rng)
            if where is None:
                return None
            arguments = list(event.arguments)
            arguments[j] = Argument(arg.role, where[0], where[1], text[where[0] : where[1]])
            return _replace_event(self.record, i, dataclasses.replace(event, arguments=tuple(arguments)))
        choices = _entities_in(self.record, self.schema)
        if not choices:
            return None
        index = rng.choice(choices)
        entity = self.record.entities[index]
        where = _shifted(text, entity.start, entity.end, self.settings.max_shift, rng)
        if where is None:
            return None
        new = Entity(entity.type, where[0], where[1], text[where[0] : where[1]])
        return _replace_entity(self.record, index, new)

    def missing(self, rng: random.Random) -> Record | None:
        record = self.record
        if record.task == "ee":
            args = _arguments_in(record, self.schema)
            events = _events_in(record, self.schema)
            if args and rng.random() < 0.7:  # arguments are the common omission
                i, j = rng.choice(args)
                event = record.events[i]
                arguments = tuple(a for k, a in enumerate(event.arguments) if k != j)
                return _replace_event(record, i, dataclasses.replace(event, arguments=arguments))
            if not events:
                return None
            drop = rng.choice(events)
            return dataclasses.replace(record, events=[e for k, e in enumerate(record.events) if k != drop])
        entities = _entities_in(record, self.schema)
        relations = _relations_in(record, self.schema) if record.task == "re" else []
        if relations and (not entities or rng.random() < 0.5):
            drop = rng.choice(relations)
            return dataclasses.replace(
                record, relations=[r for k, r in enumerate(record.relations) if k != drop]
            )
        if not entities:
            return None
        drop = rng.choice(entities)
        return dataclasses.replace(record, entities=[e for k, e in enumerate(record.entities) if k != drop])

    def invented(self, rng: random.Random) -> Record | None:
        record, text, settings = self.record, self.record.text, self.settings
        if record.task == "ee":
            lengths = [a.end - a.start for e in record.events for a in e.arguments]
            where = _random_span(text, settings.max_invented_length, rng, lengths)
            if where is None or not self.schema.events:
                return None
            span = text[where[0] : where[1]]
            events = _events_in(record, self.schema)
            if events:  # an invented argument of an existing event
                i = rng.choice(events)
                event = record.events[i]
                roles = self.schema.events[event.type]
                if roles:
                    argument = Argument(rng.choice(roles), where[0], where[1], span)
                    new_event = dataclasses.replace(event, arguments=(*event.arguments, argument))
                    return _replace_event(record, i, new_event)
            # otherwise an invented event: a random in-text trigger (short, like real triggers)
            where = _random_span(text, 2, rng, [2])
            if where is None:
                return None
            event_type = rng.choice(list(self.schema.events))
            trigger = Trigger(where[0], where[1], text[where[0] : where[1]])
            return dataclasses.replace(record, events=[*record.events, Event(event_type, trigger, ())])
        if not self.schema.entities:
            return None
        lengths = [e.end - e.start for e in record.entities]
        where = _random_span(text, settings.max_invented_length, rng, lengths)
        if where is None:
            return None
        entity = Entity(rng.choice(self.schema.entities), where[0], where[1], text[where[0] : where[1]])
        return dataclasses.replace(record, entities=[*record.entities, entity])

    def relation_direction(self, rng: random.Random) -> Record | None:
        choices = [i for i in _relations_in(self.record, self.schema) if self._directed(i)]
        if not choices:
            return None
        index = rng.choice(choices)
        relations = list(self.record.relations)
        rel = relations[index]
        relations[index] = Relation(rel.type, rel.tail, rel.head)
        return dataclasses.replace(self.record, relations=relations)

    def _directed(self, index: int) -> bool:
        rel = self.record.relations[index]
        return rel.head.text != rel.tail.text

    def relation_type(self, rng: random.Random) -> Record | None:
        choices = _relations_in(self.record, self.schema)
        if not choices or len(self.schema.relations) < 2:
            return None
        index = rng.choice(choices)
        relations = list(self.record.relations)
        rel = relations[index]
        candidates = [label for label in self.schema.relations if label != rel.type]
        relations[index] = Relation(
            self.pick_label("relation", rel.type, candidates, rng), rel.head, rel.tail
        )
        return dataclasses.replace(self.record, relations=relations)

    def spurious_relation(self, rng: random.Random) -> Record | None:
        if not self.schema.relations:
            return None
        record = self.record
        stated = {(r.type, r.head.text, r.tail.text) for r in record.relations}
        gold = [record.relations[i] for i in _relations_in(record, self.schema)]
        for _ in range(_ATTEMPTS):
            if gold and rng.random() < 0.5:  # a gold pair under another type
                rel = rng.choice(gold)
                head, tail = rel.head, rel.tail
                others = [label for label in self.schema.relations if label != rel.type]
                if not others:
                    continue
                label = self.pick_label("relation", rel.type, others, rng)
            elif len(record.entities) >= 2:  # any two of the record's entities
                head, tail = rng.sample(list(record.entities), 2)
                label = rng.choice(self.schema.relations)
            else:
                return None
            if head.text != tail.text and (label, head.text, tail.text) not in stated:
                return dataclasses.replace(record, relations=[*record.relations, Relation(label, head, tail)])
        return None

    def role_swap(self, rng: random.Random) -> Record | None:
        choices = [
            (i, j)
            for i, j in _arguments_in(self.record, self.schema)
            if len(self.schema.events[self.record.events[i].type]) >= 2
        ]
        if not choices:
            return None
        i, j = rng.choice(choices)
        event = self.record.events[i]
        arg = event.arguments[j]
        candidates = [role for role in self.schema.events[event.type] if role != arg.role]
        arguments = list(event.arguments)
        arguments[j] = dataclasses.replace(arg, role=self.pick_label("role", arg.role, candidates, rng))
        return _replace_event(self.record, i, dataclasses.replace(event, arguments=tuple(arguments)))

    def trigger_shift(self, rng: random.Random) -> Record | None:
        choices = _events_in(self.record, self.schema)
        if not choices:
            return None
        index = rng.choice(choices)
        event = self.record.events[index]
        text = self.record.text
        where = _shifted(text, event.trigger.start, event.trigger.end, self.settings.max_shift, rng)
        if where is None:
            return None
        trigger = Trigger(where[0], where[1], text[where[0] : where[1]])
        return _replace_event(self.record, index, dataclasses.replace(event, trigger=trigger))

    def emptied(self, rng: random.Random) -> Record | None:
        del rng  # nothing to choose: every item goes
        if len(self.gold_items) < 2:
            return None
        return dataclasses.replace(self.record, entities=[], relations=[], events=[])


def make_negatives(
    record: Record,
    schema: Schema,
    settings: NegativeSettings,
    confusion: ConfusionTable | None = None,
    *,
    instruction: int | str = 0,
) -> list[Negative]:
    """Up to ``settings.per_instruction`` negatives of distinct types for one instruction.

    ``instruction`` tells the instructions of one record apart in the seed. Types that cannot
    apply (no relation to swap, a one-label schema, ...) are skipped for the next applicable one.
    """
    if record.task not in TYPES_BY_TASK:
        raise ValueError(f"record {record.id}: task {record.task!r} has no negatives")
    gold_items = flatten_answer(record.task, render(record, schema))
    editor = _Editor(record, schema, settings, confusion or ConfusionTable(), gold_items)
    rng = record_rng(settings.seed, "negatives", record.id, instruction)
    types = settings.draw_order([t for t in TYPES_BY_TASK[record.task] if t in settings.types], rng)
    out: list[Negative] = []
    for kind in types:
        if len(out) >= settings.per_instruction:
            break
        for _ in range(3):  # an edit may land on gold again (a swap to a label gold also has)
            edited = getattr(editor, kind)(rng)
            if edited is None:
                break
            answer = render(edited, schema)
            if flatten_answer(record.task, answer) != gold_items:
                out.append(Negative(kind, edited, answer))
                break
    return out
