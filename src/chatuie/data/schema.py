"""Extraction schema files (``docs/schema.md``): entity types, relation types (optionally with
head/tail entity types), event types with their roles.

One file may ask for several tasks; it maps to the project's ``(task, Schema)`` requests: ``re``
when relations are asked (its answer carries the entity block too), else ``ner``; ``ee`` for events.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatuie.data.prompts import (
    ChatOptions,
    instruction_schemas,
)
from chatuie.data.records import Record, Schema
from chatuie.data.text import read_utf8, text_problem
from chatuie.errors import ExtractError

MAX_LABEL_CHARS = 100
SCHEMA_KEYS = ("entities", "relations", "events", "description")


class SchemaError(ExtractError):
    """An invalid schema (``where`` locates it: a file name or ``schema`` in a request)."""


@dataclass(frozen=True)
class RelationType:
    """A relation type; ``head`` / ``tail`` optionally name the entity type of each argument."""

    name: str
    head: str | None = None
    tail: str | None = None


@dataclass
class ExtractionSchema:
    entities: list[str] = field(default_factory=list)
    relations: list[RelationType] = field(default_factory=list)
    events: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, where: str = "schema") -> ExtractionSchema:
        """Validate and build; every error names ``where`` and the offending field."""
        if not isinstance(data, dict):
            raise SchemaError(f"{where}: expected a JSON object, got {type(data).__name__}")
        unknown = [key for key in data if key not in SCHEMA_KEYS]
        if unknown:
            raise SchemaError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(SCHEMA_KEYS)})")
        entities = _label_list(data.get("entities", []), f"{where}.entities")
        relations = _relations(data.get("relations", []), f"{where}.relations", entities)
        events = _events(data.get("events", {}), f"{where}.events")
        if not (entities or relations or events):
            raise SchemaError(f"{where}: asks for nothing (give entities, relations and/or events)")
        return cls(entities=entities, relations=relations, events=events)

    @classmethod
    def load(cls, path: str | Path) -> ExtractionSchema:
        path = Path(path)
        text = read_utf8(path, SchemaError, "cannot read schema file")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SchemaError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        relations: list[Any] = [
            r.name if r.head is None and r.tail is None else {"type": r.name, "head": r.head, "tail": r.tail}
            for r in self.relations
        ]
        return {"entities": list(self.entities), "relations": relations, "events": dict(self.events)}

    def tasks(self) -> list[tuple[str, Schema]]:
        """The project's (task, schema) requests this schema asks for."""
        out: list[tuple[str, Schema]] = []
        if self.relations:
            names = [r.name for r in self.relations]
            out.append(("re", Schema(entities=list(self.entities), relations=names)))
        elif self.entities:
            out.append(("ner", Schema(entities=list(self.entities))))
        if self.events:
            out.append(("ee", Schema(events={k: list(v) for k, v in self.events.items()})))
        return out

    def instructions(self, max_labels: int) -> list[tuple[str, Schema]]:
        """Every instruction asked per window: large schemas split as the model was taught."""
        options = ChatOptions(max_labels_per_instruction=max_labels)
        out: list[tuple[str, Schema]] = []
        for task, schema in self.tasks():
            probe = Record(id="", dataset="", split="", task=task, text="", schema=schema)
            out.extend((task, sub) for sub in instruction_schemas(probe, options, train=False))
        return out


def _label(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise SchemaError(f"{where}: expected a string label, got {json.dumps(value, ensure_ascii=False)}")
    problem = text_problem(value)
    if problem is not None:
        raise SchemaError(f"{where}: label has an {problem}")
    if not value.strip():
        raise SchemaError(f"{where}: empty label")
    if value != value.strip():
        raise SchemaError(f"{where}: label {value!r} has leading/trailing spaces")
    if len(value) > MAX_LABEL_CHARS:
        raise SchemaError(f"{where}: label longer than {MAX_LABEL_CHARS} characters")
    if any(ord(c) < 0x20 for c in value):
        raise SchemaError(f"{where}: label {value!r} contains a control character")
    return value


def _label_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list):
        raise SchemaError(f"{where}: expected a list of labels")
    labels = [_label(item, f"{where}[{i}]") for i, item in enumerate(value)]
    seen: set[str] = set()
    for i, label in enumerate(labels):
        if label in seen:
            raise SchemaError(f"{where}[{i}]: duplicate label {label!r}")
        seen.add(label)
    return labels


def _relations(value: Any, where: str, entities: list[str]) -> list[RelationType]:
    """A list of names / {"type", "head", "tail"} objects, or a mapping name -> {head, tail} | null."""
    items: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        for name, spec in value.items():
            at = f"{where}.{name}"
            if spec is None:
                items.append((at, name))
            elif isinstance(spec, dict) and "type" not in spec:
                items.append((at, {"type": name, **spec}))
            else:
                raise SchemaError(f"{at}: expected null or an object with head/tail entity types")
    elif isinstance(value, list):
        items = [(f"{where}[{i}]", item) for i, item in enumerate(value)]
    else:
        raise SchemaError(f"{where}: expected a list of relation types or a mapping type -> {{head, tail}}")
    out: list[RelationType] = []
    seen: set[str] = set()
    for at, item in items:
        if isinstance(item, str):
            relation = RelationType(_label(item, at))
        elif isinstance(item, dict):
            extra = sorted(set(item) - {"type", "head", "tail"})
            if extra:
                raise SchemaError(f"{at}: unknown key {extra[0]!r} (known: type, head, tail)")
            if "type" not in item:
                raise SchemaError(f"{at}: missing 'type'")
            name = _label(item["type"], f"{at}.type")
            ends = {}
            for end in ("head", "tail"):
                kind = item.get(end)
                if kind is not None:
                    kind = _label(kind, f"{at}.{end}")
                    if kind not in entities:
                        raise SchemaError(
                            f"{at}.{end}: entity type {kind!r} is not in entities "
                            f"({json.dumps(entities, ensure_ascii=False)})"
                        )
                ends[end] = kind
            relation = RelationType(name, ends["head"], ends["tail"])
        else:
            raise SchemaError(f"{at}: expected a relation type name or an object with type/head/tail")
        if relation.name in seen:
            raise SchemaError(f"{at}: duplicate relation type {relation.name!r}")
        seen.add(relation.name)
        out.append(relation)
    if out and not entities:
        # The re answer format lists the entities first; relations hang on them.
        raise SchemaError(f"{where}: relations need an 'entities' list (the entity types they connect)")
    return out


def _events(value: Any, where: str) -> dict[str, list[str]]:
    if not isinstance(value, dict):
        raise SchemaError(f"{where}: expected a mapping event type -> list of roles")
    out: dict[str, list[str]] = {}
    for name, roles in value.items():
        _label(name, f"{where}.{name}")
        out[name] = _label_list(roles, f"{where}.{name}")
    return out
