"""Event JSON lines in the LIC / DuEE convention::

    {"id": "a1", "text": "...", "event_list": [{"event_type": "财经/交易-出售/收购",
     "trigger": "收购", "trigger_start_index": 5,
     "arguments": [{"role": "收购方", "argument": "...", "argument_start_index": 0}]}]}

Offsets are character indices; ``text[start:start + len(span)]`` must be the span. The schema
file of the release (``duee_event_schema.json``: one ``{"event_type", "role_list": [{"role"}]}``
per line) is read by :func:`read_event_schema`.
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
from chatuie.data.records import Argument, ConversionError, Event, Record, Trigger


def _span(
    obj: dict, key: str, start_key: str, text: str, path: Path, line: int, what: str
) -> tuple[int, int, str]:
    span = obj.get(key)
    if not isinstance(span, str) or not span:
        raise ConversionError(path, line, f"{what}: field {key!r} must be a non-empty string, got {span!r}")
    start = obj.get(start_key)
    if start is None:
        raise ConversionError(path, line, f"{what}: missing field {start_key!r}")
    begin, end = offsets(
        text, start, start + len(span) if isinstance(start, int) else start, path, line, what
    )
    if text[begin:end] != span:
        raise ConversionError(
            path,
            line,
            f"{what}: {span!r} is not in the text at {start_key} {start} (found {text[begin:end]!r})",
        )
    return begin, end, span


def read(path: Path, split: str, options: FormatOptions) -> Conversion:
    out = Conversion()
    for line, obj in iter_json_lines(path):
        text = text_field(obj, "text", path, line)
        raw_events = obj.get("event_list")
        if not isinstance(raw_events, list):
            raise ConversionError(path, line, "field 'event_list' must be a list (an unlabelled test file?)")
        events = []
        for k, raw in enumerate(raw_events):
            raw = require_object(raw, path, line)
            event_type = label_field(raw.get("event_type"), path, line, f"event {k} event_type")
            start, end, word = _span(
                raw, "trigger", "trigger_start_index", text, path, line, f"event {k} trigger"
            )
            arguments = []
            for m, arg in enumerate(raw.get("arguments") or []):
                arg = require_object(arg, path, line)
                what = f"event {k} argument {m}"
                role = label_field(arg.get("role"), path, line, f"{what} role")
                a_start, a_end, a_word = _span(
                    arg, "argument", "argument_start_index", text, path, line, what
                )
                arguments.append(Argument(role, a_start, a_end, a_word))
            events.append(
                Event(
                    event_type,
                    Trigger(start, end, word),
                    tuple(sorted(arguments, key=lambda a: (a.start, a.role))),
                )
            )
        meta = {"source": source(path, line)}
        if isinstance(obj.get("id"), str | int):
            meta["original_id"] = str(obj["id"])
        out.records.append(
            Record(id="", dataset="", split=split, task="ee", text=text, events=events, meta=meta)
        )
    return out


def read_event_schema(path: Path) -> dict[str, list[str]]:
    """A DuEE schema file: event type -> its roles, in file order."""
    events: dict[str, list[str]] = {}
    for line, obj in iter_json_lines(path):
        event_type = label_field(obj.get("event_type"), path, line, "event_type")
        roles = obj.get("role_list")
        if not isinstance(roles, list):
            raise ConversionError(path, line, "field 'role_list' must be a list of {\"role\": ...}")
        names = []
        for k, role in enumerate(roles):
            role = require_object(role, path, line)
            names.append(label_field(role.get("role"), path, line, f"role_list[{k}]"))
        if event_type in events:
            raise ConversionError(path, line, f"event type {event_type!r} listed twice")
        events[event_type] = names
    if not events:
        raise ConversionError(path, None, "no event types")
    return events
