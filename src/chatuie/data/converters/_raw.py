"""Shared raw-file reading: strict UTF-8 with the line number of any bad byte."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chatuie.data.records import ConversionError


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` without the line ending; CRLF and LF both accepted."""
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ConversionError(
                    path, lineno, f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
                ) from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            yield lineno, line.rstrip("\r\n")


def read_text(path: Path) -> str:
    """The whole file as text, failing with the line of the first non-UTF-8 byte."""
    return "\n".join(line for _, line in iter_lines(path))


def load_json_document(path: Path) -> Any:
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConversionError(path, err.lineno, f"invalid JSON: {err.msg} (column {err.colno})") from None


def iter_json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConversionError(path, lineno, f"invalid JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(obj, dict):
            raise ConversionError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def require(obj: dict, key: str, kind: type | tuple[type, ...], path: Path, line: int | None) -> Any:
    if key not in obj:
        raise ConversionError(path, line, f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ConversionError(path, line, f"field {key!r} must be {names}, got {type(value).__name__}")
    return value


def check_span(text: str, start: Any, end: Any, path: Path, line: int | None, what: str) -> None:
    if not (isinstance(start, int) and isinstance(end, int)):
        raise ConversionError(path, line, f"{what}: offsets must be integers, got [{start!r}, {end!r}]")
    if not (0 <= start < end <= len(text)):
        raise ConversionError(
            path, line, f"{what}: offsets [{start}, {end}) out of range for text of length {len(text)}"
        )
