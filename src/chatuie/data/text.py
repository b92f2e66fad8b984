"""Text at the boundary: what a tokenizer can encode, and where a file is not UTF-8.

A JSON string may hold an unpaired surrogate (``"\\ud800"``), which no tokenizer can encode; it is
refused by name (:func:`text_problem`).
"""

from __future__ import annotations

from pathlib import Path

from chatuie.errors import ExtractError


def text_problem(value: str) -> str | None:
    """Why a tokenizer cannot take ``value``, or None when it can.

    Tokenizers take Unicode text as UTF-8; the one kind of Python string that has no UTF-8 form
    holds an unpaired surrogate (U+D800-U+DFFF), which a JSON file or request may carry as
    ``"\\ud800"`` and a command-line argument as an undecodable byte.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return (
            f"unpaired surrogate U+{ord(value[err.start]):04X} at character {err.start} "
            "(not valid Unicode text: the tokenizer cannot encode it)"
        )
    return None


def check_text(value: str, where: str) -> str:
    """``value`` if a tokenizer can encode it, else an :class:`ExtractError` naming ``where``."""
    problem = text_problem(value)
    if problem is not None:
        raise ExtractError(f"{where}: {problem}")
    return value


def not_utf8(path: Path, data: bytes, err: UnicodeDecodeError) -> str:
    """``file:line: not UTF-8 ...`` for a decoding error at ``err.start`` of ``data``."""
    line = data.count(b"\n", 0, err.start) + 1
    column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
    return f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at byte {column} of the line)"


def read_utf8(path: Path, error: type[ExtractError], unreadable: str = "cannot read") -> str:
    """The text of ``path``; ``error`` (an :class:`ExtractError`) names the file when it cannot be
    read (``<path>: <unreadable>: <why>``) or is not UTF-8 (``<path>:<line>: not UTF-8 ...``)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise error(f"{path}: {unreadable}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(not_utf8(path, data, err)) from None
