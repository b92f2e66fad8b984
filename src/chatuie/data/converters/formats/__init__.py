"""Generic dataset formats people already have, for datasets declared in params.yaml.

A declared dataset (``prepare.datasets``, :class:`DeclaredDataset`) names its task, its format,
one file per split and optionally a schema file; :func:`convert_declared` turns it into unified
records like the built-in five. Formats (one module each, docs/datasets.md):

==============  =====  ==========================================================================
``tagging``     ner    token/character per line, BIO / IOB1 / BIOES / BMES tags
``triples``     re     ``{"text", "triple_list": [[head, relation, tail]]}`` (CasRel, TPLinker)
``duee``        ee     ``{"text", "event_list": [{event_type, trigger, trigger_start_index, ...}]}``
``doccano``     ner/re doccano JSONL (``label``, or ``entities`` + ``relations``)
``label_studio`` ner   Label Studio JSON export
``records``     any    the unified record JSONL ``prepare`` writes
==============  =====  ==========================================================================

The schema (labels, relation types, event types with roles) is the schema file's
(docs/schema.md; a DuEE ``event_schema`` JSONL for ``duee``), every label checked against it
with the raw line at fault; without one it is inferred from the data (sorted labels).
Either way it is written out (``data/records/<name>/schema.json``) for the user to check.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatuie.config import ConfigError
from chatuie.data.converters._raw import read_text
from chatuie.data.converters.formats import doccano, duee, label_studio, tagging, triples, unified
from chatuie.data.converters.formats._common import Conversion, FormatOptions, Note, line_of
from chatuie.data.records import ConversionError, Record, Schema

__all__ = [
    "FORMATS",
    "DeclaredDataset",
    "DeclaredResult",
    "FormatOptions",
    "Note",
    "convert_declared",
]

# format -> the tasks it can carry (the first is its default).
FORMATS: dict[str, tuple[str, ...]] = {
    "tagging": ("ner",),
    "triples": ("re",),
    "duee": ("ee",),
    "doccano": ("ner", "re"),
    "label_studio": ("ner",),
    "records": ("ner", "re", "ee"),
}
SPLITS = ("train", "dev", "test")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_CHOICES = {
    "tag_scheme": tagging.SCHEMES,
    "text_join": tagging.JOINS,
    "ambiguous_spans": ("first", "skip", "error"),
    "missing_spans": ("error", "skip"),
}


@dataclass(frozen=True)
class DeclaredDataset:
    """One entry of ``prepare.datasets``."""

    name: str
    task: str
    format: str
    files: dict[str, str]  # split (train | dev | test) -> file
    schema: str | None = None  # a schema file (docs/schema.md); None = inferred from the data
    options: FormatOptions = field(default_factory=FormatOptions)

    def __post_init__(self) -> None:
        where = f"dataset {self.name!r}"
        if not _NAME.match(self.name):
            raise ConfigError(f"{where}: name must be letters, digits, '_' or '-'")
        if self.format not in FORMATS:
            raise ConfigError(f"{where}: unknown format {self.format!r} (known: {', '.join(FORMATS)})")
        if self.task not in FORMATS[self.format]:
            raise ConfigError(
                f"{where}: format {self.format} carries task "
                f"{'/'.join(FORMATS[self.format])}, not {self.task!r}"
            )
        if not isinstance(self.files, dict) or not self.files:
            raise ConfigError(f"{where}: files must map a split ({', '.join(SPLITS)}) to a file")
        for split, path in self.files.items():
            if split not in SPLITS:
                raise ConfigError(f"{where}: files.{split}: unknown split (known: {', '.join(SPLITS)})")
            if not isinstance(path, str) or not path:
                raise ConfigError(f"{where}: files.{split}: expected a file path, got {path!r}")
        for key, allowed in _CHOICES.items():
            value = getattr(self.options, key)
            if value not in allowed:
                raise ConfigError(f"{where}: options.{key}: {value!r} is not one of {', '.join(allowed)}")

    def paths(self) -> list[str]:
        return [*self.files.values(), *([self.schema] if self.schema else [])]


@dataclass
class DeclaredResult:
    splits: dict[str, list[Record]]
    schema: dict[str, Any]  # as written to schema.json (docs/schema.md format)
    notes: dict[str, list[Note]]  # per split
    inferred: bool


def _schema_file(path: Path, task: str) -> tuple[Schema, dict[str, tuple[str | None, str | None]]]:
    """(schema, relation -> (head type, tail type)) from a docs/schema.md file or a DuEE schema."""
    from chatuie.data.schema import ExtractionSchema, SchemaError

    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if task == "ee" and text.lstrip().startswith("{"):
            return Schema(events=duee.read_event_schema(path)), {}
        raise ConversionError(path, err.lineno, f"invalid JSON: {err.msg} (column {err.colno})") from None
    if task == "ee" and isinstance(data, dict) and "event_type" in data:
        return Schema(events=duee.read_event_schema(path)), {}
    try:
        parsed = ExtractionSchema.from_dict(data, "schema")
    except SchemaError as err:
        raise ConversionError(path, None, str(err)) from None
    signatures = {r.name: (r.head, r.tail) for r in parsed.relations}
    schema = Schema(
        entities=list(parsed.entities),
        relations=[r.name for r in parsed.relations],
        events={k: list(v) for k, v in parsed.events.items()},
    )
    needs = {"ner": schema.entities, "re": schema.relations, "ee": schema.events}[task]
    if not needs:
        block = {"ner": "entities", "re": "relations", "ee": "events"}[task]
        raise ConversionError(path, None, f"schema has no {block!r} block for task {task}")
    return schema, signatures


def _infer(records: list[Record], task: str) -> Schema:
    entities = sorted({e.type for r in records for e in r.entities})
    entities += sorted(
        {x.type for r in records for rel in r.relations for x in (rel.head, rel.tail)} - set(entities)
    )
    relations = sorted({rel.type for r in records for rel in r.relations})
    events: dict[str, set[str]] = {}
    for r in records:
        for ev in r.events:
            events.setdefault(ev.type, set()).update(a.role for a in ev.arguments)
        for event_type, roles in r.schema.events.items():  # unified records may list more
            events.setdefault(event_type, set()).update(roles)
    for r in records:
        entities += [x for x in r.schema.entities if x not in entities]
        relations += [x for x in r.schema.relations if x not in relations]
    if task == "ner":
        return Schema(entities=sorted(entities))
    if task == "re":
        return Schema(entities=sorted(set(entities)), relations=sorted(set(relations)))
    return Schema(events={k: sorted(v) for k, v in sorted(events.items())})


def _check_labels(record: Record, schema: Schema, schema_path: str) -> None:
    path, line = line_of(record)

    def fail(message: str) -> ConversionError:
        return ConversionError(path, line, f"{message} (not in the schema {schema_path})")

    for e in record.entities:
        if e.type not in schema.entities:
            raise fail(f"unknown entity type {e.type!r}")
    for rel in record.relations:
        if rel.type not in schema.relations:
            raise fail(f"unknown relation type {rel.type!r}")
        for x in (rel.head, rel.tail):
            if x.type not in schema.entities:
                raise fail(f"unknown entity type {x.type!r} (relation {rel.type})")
    for ev in record.events:
        if ev.type not in schema.events:
            raise fail(f"unknown event type {ev.type!r}")
        for a in ev.arguments:
            if a.role not in schema.events[ev.type]:
                raise fail(f"role {a.role!r} is not a role of event type {ev.type!r}")


def _read(
    spec: DeclaredDataset, path: Path, split: str, schema: Schema | None, signatures: dict
) -> Conversion:
    if not path.is_file():
        raise ConversionError(path, None, f"no such file (dataset {spec.name!r}, split {split})")
    options = spec.options
    if spec.format == "tagging":
        return tagging.read(path, split, options, schema)
    if spec.format == "triples":
        return triples.read(path, split, options, signatures)
    if spec.format == "duee":
        return duee.read(path, split, options)
    if spec.format == "doccano":
        return doccano.read(path, split, options, spec.task)
    if spec.format == "label_studio":
        return label_studio.read(path, split, options)
    return unified.read(path, split, options, spec.task)


def schema_document(schema: Schema, task: str, signatures: dict | None = None) -> dict[str, Any]:
    """The schema as a schema file (docs/schema.md): what ``schema:`` accepts back."""
    signatures = signatures or {}
    if task == "ner":
        return {"entities": list(schema.entities)}
    if task == "re":
        relations: list[Any] = []
        for name in schema.relations:
            head, tail = signatures.get(name, (None, None))
            relations.append(
                name if head is None and tail is None else {"type": name, "head": head, "tail": tail}
            )
        return {"entities": list(schema.entities), "relations": relations}
    return {"events": {k: list(v) for k, v in schema.events.items()}}


def convert_declared(spec: DeclaredDataset, root: Path = Path(".")) -> DeclaredResult:
    """Every split of ``spec`` in memory (a bad line raises before anything is written)."""
    schema: Schema | None = None
    signatures: dict = {}
    if spec.schema:
        schema, signatures = _schema_file(root / spec.schema, spec.task)
    converted = {
        split: _read(spec, root / file, split, schema, signatures) for split, file in spec.files.items()
    }
    every = [r for c in converted.values() for r in c.records]
    if not every:
        raise ConversionError(
            root / next(iter(spec.files.values())), None, f"dataset {spec.name!r}: no records"
        )
    inferred = schema is None
    if schema is None:
        schema = _infer(every, spec.task)
    else:
        for record in every:
            _check_labels(record, schema, spec.schema or "")
    splits: dict[str, list[Record]] = {}
    for split, conversion in converted.items():
        rows = []
        for index, record in enumerate(conversion.records):
            record.id = f"{spec.name}-{split}-{index:05d}"
            record.dataset = spec.name
            record.split = split
            record.schema = Schema.from_dict(schema.to_dict())
            rows.append(record)
        splits[split] = rows
    notes = {split: c.notes for split, c in converted.items()}
    return DeclaredResult(splits, schema_document(schema, spec.task, signatures), notes, inferred)


def default_task(fmt: str, path: Path) -> str:
    """The task a file of ``fmt`` carries when none is named (``chatuie evaluate`` without --task):
    the format's own, a doccano export with relations is ``re``, unified records say theirs."""
    tasks = FORMATS.get(fmt, ("ner",))
    if len(tasks) == 1:
        return tasks[0]
    from chatuie.data.converters._raw import iter_json_lines

    for _, obj in iter_json_lines(path):
        if fmt == "records" and obj.get("task") in tasks:
            return str(obj["task"])
        if fmt == "doccano" and obj.get("relations"):
            return "re"
        if fmt == "doccano":
            continue
        break
    return tasks[0]


def notes_summary(notes: list[Note], limit: int = 20) -> dict[str, Any]:
    """Counts per kind and the first ``limit`` located notes (for conversion.json and the log)."""
    counts: dict[str, int] = {}
    for note in notes:
        counts[note.kind] = counts.get(note.kind, 0) + 1
    return {
        "counts": dict(sorted(counts.items())),
        "first": [{"kind": n.kind, "where": n.where, "detail": n.detail} for n in notes[:limit]],
    }
