"""The unified record: one type for every task, spans as character offsets into ``text``.

A record is stored as one JSON object per line::

    {id, dataset, split, task, text, schema, entities, relations, events,
     question, options, answer, meta}

* ``task`` is one of ``ner | re | ee | qa | mcq``.
* Spans are ``[start, end)`` character offsets with ``text[start:end] == span text``.
* ``relations[*].head`` / ``.tail`` are full entity objects (self-describing entity refs).
* ``qa`` records put the evidence in ``text`` and carry ``question`` / ``answer``;
  ``mcq`` records carry ``question``, ``options`` ({"A": ..., ...}) and ``answer`` (a letter,
  or ``None`` where the split has no answers).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chatuie.errors import ChatuieError

TASKS = ("ner", "re", "ee", "qa", "mcq")
IE_TASKS = ("ner", "re", "ee")


class ConversionError(ChatuieError, ValueError):
    """A malformed raw input, located as ``file:line: what is wrong``."""

    def __init__(self, path: object, line: int | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Entity:
    type: str
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class Relation:
    type: str
    head: Entity
    tail: Entity


@dataclass(frozen=True)
class Trigger:
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class Argument:
    role: str
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class Event:
    type: str
    trigger: Trigger
    arguments: tuple[Argument, ...] = ()


@dataclass
class Schema:
    """The labels a request may use. ``events`` maps each event type to its argument roles."""

    entities: list[str] = field(default_factory=list)
    relations: list[str] = field(default_factory=list)
    events: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "entities": list(self.entities),
            "relations": list(self.relations),
            "events": {k: list(v) for k, v in self.events.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Schema:
        return cls(
            entities=list(data.get("entities", [])),
            relations=list(data.get("relations", [])),
            events={k: list(v) for k, v in data.get("events", {}).items()},
        )


@dataclass
class Record:
    id: str
    dataset: str
    split: str
    task: str
    text: str
    schema: Schema = field(default_factory=Schema)
    entities: list[Entity] = field(default_factory=list)
    relations: list[Relation] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    question: str | None = None
    options: dict[str, str] | None = None
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["schema"] = self.schema.to_dict()
        for event in out["events"]:
            event["arguments"] = list(event["arguments"])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        return cls(
            id=data["id"],
            dataset=data["dataset"],
            split=data["split"],
            task=data["task"],
            text=data["text"],
            schema=Schema.from_dict(data.get("schema", {})),
            entities=[Entity(**e) for e in data.get("entities", [])],
            relations=[
                Relation(type=r["type"], head=Entity(**r["head"]), tail=Entity(**r["tail"]))
                for r in data.get("relations", [])
            ],
            events=[
                Event(
                    type=ev["type"],
                    trigger=Trigger(**ev["trigger"]),
                    arguments=tuple(Argument(**a) for a in ev.get("arguments", [])),
                )
                for ev in data.get("events", [])
            ],
            question=data.get("question"),
            options=data.get("options"),
            answer=data.get("answer"),
            meta=dict(data.get("meta", {})),
        )


def make_entity(text: str, label: str, start: int, end: int, *, where: str) -> Entity:
    """Build an entity, checking its offsets against ``text`` (``where`` locates the raw input)."""
    if not (0 <= start < end <= len(text)):
        raise ValueError(f"{where}: span [{start}, {end}) out of range for text of length {len(text)}")
    return Entity(type=label, start=start, end=end, text=text[start:end])


def load_records(path: str | Path) -> list[Record]:
    """The records of one JSONL file (``data/records/<dataset>/<split>.jsonl``)."""
    from chatuie.io import read_jsonl

    return [Record.from_dict(row) for row in read_jsonl(path)]
