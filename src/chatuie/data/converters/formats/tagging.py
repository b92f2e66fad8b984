"""Token- or character-per-line tagging files (CoNLL style): ``<token> ... <tag>``, a blank line
between sentences, ``-DOCSTART-`` lines ignored. The token is the first column, the tag the last.

Tag schemes: ``bio`` (IOB2: every entity starts with ``B-``), ``iob1`` (``I-`` starts an entity,
``B-`` only separates two adjacent ones of the same type), ``bioes`` and ``bmes`` (``B``/``I`` or
``M``/``E``, ``S`` for single tokens). ``auto`` reads ``bmes`` when an ``M-`` tag occurs, ``bioes``
when ``E-``/``S-`` do, else ``bio`` (IOB1 cannot be told from a broken IOB2 file: say it).

Text: ``none`` joins tokens without spaces (Chinese, Japanese), ``space`` with single spaces
(offsets mapped to the rebuilt text); ``auto`` picks ``none`` when every token of the file is one
character, else ``space``.
"""

from __future__ import annotations

from pathlib import Path

from chatuie.data.converters._raw import iter_lines
from chatuie.data.converters.formats._common import Conversion, FormatOptions, source
from chatuie.data.records import ConversionError, Entity, Record, Schema

SCHEMES = ("auto", "bio", "iob1", "bioes", "bmes")
JOINS = ("auto", "none", "space")
_PREFIXES = {"bio": "BI", "iob1": "BI", "bioes": "BIES", "bmes": "BMES"}

Sentence = list[tuple[int, str, str]]  # (line, token, tag)


def _sentences(path: Path) -> list[Sentence]:
    sentences: list[Sentence] = []
    current: Sentence = []
    for lineno, line in iter_lines(path):
        if not line.strip():
            if current:
                sentences.append(current)
                current = []
            continue
        fields = line.split()
        if fields[0] == "-DOCSTART-":
            continue
        if len(fields) < 2:
            raise ConversionError(path, lineno, f"expected '<token> <tag>' (2 columns), got {line!r}")
        current.append((lineno, fields[0], fields[-1]))
    if current:
        sentences.append(current)
    return sentences


def _split_tag(
    tag: str, lineno: int, path: Path, scheme: str, labels: list[str] | None
) -> tuple[str, str | None]:
    if tag == "O":
        return "O", None
    prefix, dash, label = tag.partition("-")
    allowed = _PREFIXES[scheme]
    if not dash or len(prefix) != 1 or prefix not in allowed or not label:
        expected = "/".join(f"{p}-" for p in allowed)
        raise ConversionError(
            path, lineno, f"unknown tag {tag!r} (expected {expected}<TYPE> or O, scheme {scheme})"
        )
    if labels is not None and label not in labels:
        raise ConversionError(
            path, lineno, f"unknown entity type {label!r} in tag {tag!r} (schema: {labels})"
        )
    return prefix, label


def detect_scheme(sentences: list[Sentence]) -> str:
    prefixes = {tag.partition("-")[0] for sentence in sentences for _, _, tag in sentence if tag != "O"}
    if "M" in prefixes:
        return "bmes"
    if prefixes & {"E", "S"}:
        return "bioes"
    return "bio"


def decode(
    sentence: Sentence,
    offsets: list[tuple[int, int]],
    text: str,
    scheme: str,
    path: Path,
    labels: list[str] | None = None,
) -> list[Entity]:
    """Entities of one sentence; any ill-formed sequence is an error naming its line."""
    entities: list[Entity] = []
    open_start: int | None = None  # token index
    open_type: str | None = None
    open_line = 0

    def close(end_token: int) -> None:
        nonlocal open_start, open_type
        assert open_start is not None and open_type is not None
        start, end = offsets[open_start][0], offsets[end_token][1]
        entities.append(Entity(open_type, start, end, text[start:end]))
        open_start = open_type = None

    for index, (lineno, _, tag) in enumerate(sentence):
        prefix, label = _split_tag(tag, lineno, path, scheme, labels)
        if scheme in ("bio", "iob1"):
            if prefix == "O":
                if open_start is not None:
                    close(index - 1)
            elif prefix == "B":
                if open_start is not None:
                    close(index - 1)
                if (
                    scheme == "iob1"
                    and (index == 0 or sentence[index - 1][2] != f"I-{label}")
                    and (index == 0 or sentence[index - 1][2] != f"B-{label}")
                ):
                    raise ConversionError(
                        path, lineno, f"tag {tag!r}: in IOB1, B- only follows an entity of the same type"
                    )
                open_start, open_type, open_line = index, label, lineno
            else:  # I
                if open_start is not None and open_type == label:
                    continue
                if scheme == "bio":
                    raise ConversionError(path, lineno, f"tag {tag!r} without a preceding B-{label}")
                if open_start is not None:
                    close(index - 1)
                open_start, open_type, open_line = index, label, lineno
            continue
        inside = "M" if scheme == "bmes" else "I"
        if prefix in (inside, "E"):
            if open_start is None:
                raise ConversionError(path, lineno, f"tag {tag!r} without a preceding B-{label}")
            if label != open_type:
                raise ConversionError(path, lineno, f"tag {tag!r} continues an entity of type {open_type!r}")
            if prefix == "E":
                close(index)
            continue
        if open_start is not None:
            raise ConversionError(
                path, lineno, f"tag {tag!r} while entity B-{open_type} is still open (missing E-{open_type})"
            )
        if prefix == "B":
            open_start, open_type, open_line = index, label, lineno
        elif prefix == "S":
            open_start, open_type = index, label
            close(index)
    if open_start is not None:
        if scheme in ("bio", "iob1"):
            close(len(sentence) - 1)
        else:
            raise ConversionError(
                path, open_line, f"sentence ends inside entity B-{open_type} (missing E-{open_type})"
            )
    return entities


def read(path: Path, split: str, options: FormatOptions, schema: Schema | None = None) -> Conversion:
    """``schema`` given: a tag of another entity type is an error at its line."""
    labels = list(schema.entities) if schema is not None else None
    sentences = _sentences(path)
    if not sentences:
        raise ConversionError(path, None, "no sentences (an empty file?)")
    scheme = detect_scheme(sentences) if options.tag_scheme == "auto" else options.tag_scheme
    join = options.text_join
    if join == "auto":
        join = "none" if all(len(tok) == 1 for s in sentences for _, tok, _ in s) else "space"
    separator = "" if join == "none" else " "
    out = Conversion()
    for sentence in sentences:
        spans, cursor = [], 0
        for _, token, _ in sentence:
            spans.append((cursor, cursor + len(token)))
            cursor += len(token) + len(separator)
        text = separator.join(token for _, token, _ in sentence)
        entities = decode(sentence, spans, text, scheme, path, labels)
        out.records.append(
            Record(
                id="",
                dataset="",
                split=split,
                task="ner",
                text=text,
                entities=entities,
                meta={"source": source(path, sentence[0][0]), "tag_scheme": scheme},
            )
        )
    return out
