"""The unified record JSONL itself (what ``prepare`` writes to ``data/records/<dataset>/<split>.jsonl``).

Every span is checked against its text; ids, dataset and split are the declared dataset's (the
original id is kept in ``meta.original_id``); the records' own schemas join the dataset schema.
"""

from __future__ import annotations

from pathlib import Path

from chatuie.data.converters._raw import iter_json_lines
from chatuie.data.converters.formats._common import Conversion, FormatOptions, offsets, source
from chatuie.data.records import ConversionError, Record


def read(path: Path, split: str, options: FormatOptions, task: str) -> Conversion:
    out = Conversion()
    for line, obj in iter_json_lines(path):
        try:
            record = Record.from_dict({"id": "", "dataset": "", "split": split, **obj})
        except (KeyError, TypeError) as err:
            raise ConversionError(path, line, f"not a unified record: {err}") from None
        if record.task != task:
            raise ConversionError(path, line, f"task {record.task!r}, the dataset is declared as {task!r}")
        if not isinstance(record.text, str) or not record.text.strip():
            raise ConversionError(path, line, "empty 'text'")
        spans = [(f"entity {k}", e) for k, e in enumerate(record.entities)]
        for k, r in enumerate(record.relations):
            spans += [(f"relation {k} head", r.head), (f"relation {k} tail", r.tail)]
        for k, ev in enumerate(record.events):
            spans.append((f"event {k} trigger", ev.trigger))
            spans += [(f"event {k} argument {m}", a) for m, a in enumerate(ev.arguments)]
        for what, span in spans:
            start, end = offsets(record.text, span.start, span.end, path, line, what)
            if record.text[start:end] != span.text:
                raise ConversionError(
                    path,
                    line,
                    f"{what}: {span.text!r} is not in the text at [{start}, {end}) "
                    f"(found {record.text[start:end]!r})",
                )
        meta = {**record.meta, "source": source(path, line)}
        if isinstance(obj.get("id"), str):
            meta["original_id"] = obj["id"]
        record.meta = meta
        out.records.append(record)
    return out
