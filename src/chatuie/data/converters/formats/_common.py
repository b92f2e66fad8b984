"""What the generic formats share: JSON items located by line, span checks, the conversion result.

A format's ``read(path, split, options)`` returns a :class:`Conversion`: records without a
dataset name or schema yet (the declared dataset supplies both), each carrying
``meta["source"] = "file:line"`` so later checks (labels against a given schema) still point at
the raw line, plus ``notes``: located remarks (an ambiguous span, a skipped record) that are
counted and reported, never silently dropped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatuie.data.converters._raw import iter_json_lines, read_text
from chatuie.data.records import ConversionError, Record


@dataclass(frozen=True)
class FormatOptions:
    """The per-format knobs of a declared dataset (see docs/datasets.md)."""

    tag_scheme: str = "auto"  # tagging: auto | bio | iob1 | bioes | bmes
    text_join: str = "auto"  # tagging: auto | none (Chinese: no spaces) | space
    ambiguous_spans: str = "first"  # triples: first | skip | error (a span found more than once)
    missing_spans: str = "error"  # triples: error | skip (a span not in its text)
    entity_type: str = "entity"  # triples: type of a head/tail the schema does not type


@dataclass(frozen=True)
class Note:
    kind: str  # ambiguous_span | skipped_record
    where: str  # file:line
    detail: str


@dataclass
class Conversion:
    records: list[Record] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)


def source(path: Path, line: int) -> str:
    return f"{path}:{line}"


def line_of(record: Record) -> tuple[str, int | None]:
    """(file, line) a record came from (its ``meta.source``)."""
    where = str(record.meta.get("source", ""))
    path, _, line = where.rpartition(":")
    return (path, int(line)) if line.isdigit() else (where, None)


def iter_json_items(path: Path) -> Iterator[tuple[int, Any]]:
    """Every item of a JSON array (pretty-printed or not), or every line of a JSON-lines file,
    with the line it starts on."""
    text = read_text(path)
    stripped = text.lstrip()
    if not stripped.startswith("["):
        yield from iter_json_lines(path)
        return
    decoder = json.JSONDecoder()
    line_starts = [0]
    for index, char in enumerate(text):
        if char == "\n":
            line_starts.append(index + 1)

    def line_at(offset: int) -> int:
        import bisect

        return bisect.bisect_right(line_starts, offset)

    def fail(offset: int, message: str) -> ConversionError:
        return ConversionError(path, line_at(offset), message)

    pos = len(text) - len(stripped) + 1
    n = len(text)

    def skip(pos: int) -> int:
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        return pos

    pos = skip(pos)
    if pos < n and text[pos] == "]":
        return
    while True:
        pos = skip(pos)
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise fail(err.pos, f"invalid JSON: {err.msg}") from None
        yield line_at(pos), item
        pos = skip(end)
        if pos < n and text[pos] == ",":
            pos += 1
            continue
        if pos < n and text[pos] == "]":
            if skip(pos + 1) != n:
                raise fail(skip(pos + 1), "invalid JSON: extra data after the array")
            return
        raise fail(min(pos, n - 1), "invalid JSON: expected ',' or ']' between array items")


def require_object(item: Any, path: Path, line: int) -> dict:
    if not isinstance(item, dict):
        raise ConversionError(path, line, f"expected a JSON object, got {type(item).__name__}")
    return item


def text_field(obj: dict, key: str, path: Path, line: int) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ConversionError(path, line, f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ConversionError(path, line, f"empty {key!r}")
    return value


def label_field(value: Any, path: Path, line: int, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConversionError(path, line, f"{what}: label must be a non-empty string, got {value!r}")
    return value


def offsets(text: str, start: Any, end: Any, path: Path, line: int, what: str) -> tuple[int, int]:
    """``[start, end)`` checked against ``text`` (a span outside its text is an error)."""
    if (
        isinstance(start, bool)
        or isinstance(end, bool)
        or not (isinstance(start, int) and isinstance(end, int))
    ):
        raise ConversionError(path, line, f"{what}: offsets must be integers, got [{start!r}, {end!r}]")
    if not (0 <= start < end <= len(text)):
        raise ConversionError(
            path, line, f"{what}: span [{start}, {end}) is not in the text (length {len(text)})"
        )
    return start, end
