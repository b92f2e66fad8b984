"""doccano JSONL exports.

* sequence labelling: ``{"text": ..., "label": [[start, end, "TYPE"], ...]}`` (older exports:
  ``labels``);
* relation export: ``{"text": ..., "entities": [{"id", "label", "start_offset", "end_offset"}],
  "relations": [{"id", "from_id", "to_id", "type"}]}``.

Offsets are character offsets into ``text``, end-exclusive.
"""

from __future__ import annotations

from pathlib import Path

from chatuie.data.converters._raw import iter_json_lines
from chatuie.data.converters.formats._common import (
    Conversion,
    FormatOptions,
    label_field,
    offsets,
    require_object,
    source,
    text_field,
)
from chatuie.data.records import ConversionError, Entity, Record, Relation


def read(path: Path, split: str, options: FormatOptions, task: str = "ner") -> Conversion:
    out = Conversion()
    for line, obj in iter_json_lines(path):
        text = text_field(obj, "text", path, line)
        entities: list[Entity] = []
        relations: list[Relation] = []
        if "entities" in obj:
            raw_entities = obj["entities"]
            if not isinstance(raw_entities, list):
                raise ConversionError(path, line, "field 'entities' must be a list")
            by_id: dict[object, Entity] = {}
            for k, ent in enumerate(raw_entities):
                ent = require_object(ent, path, line)
                label = label_field(ent.get("label"), path, line, f"entity {k}")
                start, end = offsets(
                    text, ent.get("start_offset"), ent.get("end_offset"), path, line, f"entity {k}"
                )
                entity = Entity(label, start, end, text[start:end])
                entities.append(entity)
                by_id[ent.get("id", k)] = entity
            raw_relations = obj.get("relations") or []
            if not isinstance(raw_relations, list):
                raise ConversionError(path, line, "field 'relations' must be a list")
            for k, rel in enumerate(raw_relations):
                rel = require_object(rel, path, line)
                label = label_field(rel.get("type"), path, line, f"relation {k}")
                head, tail = by_id.get(rel.get("from_id")), by_id.get(rel.get("to_id"))
                if head is None or tail is None:
                    raise ConversionError(
                        path,
                        line,
                        f"relation {k}: from_id/to_id {rel.get('from_id')!r}/{rel.get('to_id')!r} "
                        "is not an entity id of this line",
                    )
                relations.append(Relation(label, head, tail))
        else:
            key = "label" if "label" in obj else "labels" if "labels" in obj else None
            if key is None:
                raise ConversionError(
                    path, line, "missing field 'label' (or 'entities' for a relation export)"
                )
            spans = obj[key]
            if not isinstance(spans, list):
                raise ConversionError(path, line, f"field {key!r} must be a list of [start, end, type]")
            for k, span in enumerate(spans):
                if not (isinstance(span, list) and len(span) == 3):
                    raise ConversionError(path, line, f"{key} {k}: expected [start, end, type], got {span!r}")
                start, end = offsets(text, span[0], span[1], path, line, f"{key} {k}")
                entities.append(
                    Entity(label_field(span[2], path, line, f"{key} {k}"), start, end, text[start:end])
                )
        if task == "ner" and relations:
            raise ConversionError(
                path, line, "relations in a dataset declared as task ner (declare task: re)"
            )
        meta = {"source": source(path, line)}
        if isinstance(obj.get("id"), str | int):
            meta["original_id"] = str(obj["id"])
        out.records.append(
            Record(
                id="",
                dataset="",
                split=split,
                task=task,
                text=text,
                entities=sorted(entities, key=lambda e: (e.start, e.end, e.type)),
                relations=relations,
                meta=meta,
            )
        )
    return out
