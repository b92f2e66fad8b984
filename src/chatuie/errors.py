"""The user-facing error family: bad input, params or environment.

:class:`ChatuieError` is the base of every error a user can fix from its message alone (a params
key, a file and line, a request field): stage entry points and the ``chatuie`` command print it as
one line, ``error: <message>``, and exit with status 1; anything else is a bug and keeps its
traceback. Messages are always encodable text (:func:`printable`), so they can be printed or sent
as JSON.
"""

from __future__ import annotations


def printable(text: str) -> str:
    """``text`` with unpaired surrogates as ``\\udXXX`` escapes: always encodable as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class ChatuieError(Exception):
    """An error the user fixes from its message; the message names the file, line or field."""

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(printable(str(message)), *args)


class ExtractError(ChatuieError, ValueError):
    """Bad extraction input or configuration (a schema, a text, an input file, a model reference).

    An unpaired surrogate quoted from the input is written as a ``\\udXXX`` escape.
    """
