"""Label Studio JSON exports for NER: a JSON array of tasks::

    [{"id": 1, "data": {"text": "..."},
      "annotations": [{"result": [{"type": "labels",
                                   "value": {"start": 0, "end": 4, "text": "John", "labels": ["PER"]}}]}]}]

The first annotation that is not cancelled is used (``was_cancelled``); a task without one is an
error. The text is ``data.text``, or the only string in ``data``. ``value.text``, when present,
must be ``text[start:end]``.
"""

from __future__ import annotations

from pathlib import Path

from chatuie.data.converters.formats._common import (
    Conversion,
    FormatOptions,
    iter_json_items,
    label_field,
    offsets,
    require_object,
    source,
)
from chatuie.data.records import ConversionError, Entity, Record


def _text(task: dict, path: Path, line: int) -> str:
    data = task.get("data")
    if not isinstance(data, dict):
        raise ConversionError(path, line, "missing object 'data' (the task's text)")
    text = data.get("text")
    if text is None:
        strings = [v for v in data.values() if isinstance(v, str)]
        text = strings[0] if len(strings) == 1 else None
    if not isinstance(text, str) or not text.strip():
        raise ConversionError(path, line, "data.text must be a non-empty string")
    return text


def read(path: Path, split: str, options: FormatOptions) -> Conversion:
    out = Conversion()
    for line, item in iter_json_items(path):
        task = require_object(item, path, line)
        text = _text(task, path, line)
        annotations = [
            a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")
        ]
        if not annotations:
            raise ConversionError(path, line, "task has no (uncancelled) annotation")
        entities = []
        for k, result in enumerate(annotations[0].get("result") or []):
            result = require_object(result, path, line)
            if result.get("type") not in ("labels", None):
                continue  # choices, relations, ...: not NER spans
            value = require_object(result.get("value"), path, line)
            what = f"result {k}"
            start, end = offsets(text, value.get("start"), value.get("end"), path, line, what)
            if "text" in value and value["text"] != text[start:end]:
                raise ConversionError(
                    path,
                    line,
                    f"{what}: {value['text']!r} is not in the text at [{start}, {end}) "
                    f"(found {text[start:end]!r})",
                )
            labels = value.get("labels")
            if not (isinstance(labels, list) and len(labels) == 1):
                raise ConversionError(
                    path, line, f"{what}: 'labels' must hold exactly one label, got {labels!r}"
                )
            entities.append(Entity(label_field(labels[0], path, line, what), start, end, text[start:end]))
        meta = {"source": source(path, line)}
        if isinstance(task.get("id"), str | int):
            meta["original_id"] = str(task["id"])
        out.records.append(
            Record(
                id="",
                dataset="",
                split=split,
                task="ner",
                text=text,
                entities=sorted(entities, key=lambda e: (e.start, e.end, e.type)),
                meta=meta,
            )
        )
    return out
