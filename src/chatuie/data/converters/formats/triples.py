"""Relation triples as JSON (an array) or JSON lines, the CasRel / TPLinker release format::

    {"text": "John Smith works for IBM .", "triple_list": [["John Smith", "Work_For", "IBM"]]}

Heads and tails are strings; each is located in the text (an occurrence that cuts no word). A
span found nowhere is an error (``missing_spans: error``) or leaves its record out, counted
(``skip``). A span found more than once is counted as ambiguous and takes its first occurrence
(``ambiguous_spans: first``: answers and scores are span strings, so the choice changes neither;
only the offsets `chatuie view` shows), or leaves its record out (``skip``), or is an error.

Entity types come from the schema's relation signatures (``{"type": "Work_For", "head": "Peop",
"tail": "Org"}``, docs/schema.md); an untyped end is ``entity_type`` (default ``entity``).
"""

from __future__ import annotations

from pathlib import Path

from chatuie.data.answers import cuts_word
from chatuie.data.converters.formats._common import (
    Conversion,
    FormatOptions,
    Note,
    iter_json_items,
    label_field,
    require_object,
    source,
    text_field,
)
from chatuie.data.records import ConversionError, Entity, Record, Relation

Signatures = dict[str, tuple[str | None, str | None]]


def occurrences(text: str, span: str) -> list[int]:
    """Start offsets of ``span`` in ``text`` that cut no word."""
    found, start = [], text.find(span)
    while start != -1:
        if not cuts_word(text, start) and not cuts_word(text, start + len(span)):
            found.append(start)
        start = text.find(span, start + 1)
    return found


class _Skip(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def read(
    path: Path,
    split: str,
    options: FormatOptions,
    signatures: Signatures | None = None,
) -> Conversion:
    signatures = signatures or {}
    out = Conversion()
    for line, item in iter_json_items(path):
        obj = require_object(item, path, line)
        text = text_field(obj, "text", path, line)
        triples = obj.get("triple_list")
        if not isinstance(triples, list):
            raise ConversionError(path, line, "field 'triple_list' must be a list of [head, relation, tail]")
        ambiguous: list[str] = []

        def locate(
            span: object, what: str, text: str = text, ambiguous: list[str] = ambiguous, line: int = line
        ) -> int:
            if not isinstance(span, str) or not span.strip():
                raise ConversionError(path, line, f"{what}: expected a non-empty string, got {span!r}")
            found = occurrences(text, span)
            if not found:
                if options.missing_spans == "skip":
                    raise _Skip("missing_span", f"{what} {span!r} is not in the text")
                raise ConversionError(path, line, f"{what} {span!r} is not in the text")
            if len(found) > 1:
                detail = f"{what} {span!r} occurs {len(found)} times"
                if options.ambiguous_spans == "error":
                    raise ConversionError(path, line, f"{detail} (ambiguous_spans: error)")
                if options.ambiguous_spans == "skip":
                    raise _Skip("ambiguous_span", detail)
                ambiguous.append(detail)
            return found[0]

        entities: dict[tuple[str, int, int], Entity] = {}
        relations: list[Relation] = []
        try:
            for k, triple in enumerate(triples):
                if not (isinstance(triple, list) and len(triple) == 3):
                    raise ConversionError(
                        path, line, f"triple {k}: expected [head, relation, tail], got {triple!r}"
                    )
                head_text, relation, tail_text = triple
                relation = label_field(relation, path, line, f"triple {k} relation")
                head_type, tail_type = signatures.get(relation, (None, None))
                ends = []
                for span, kind, what in ((head_text, head_type, "head"), (tail_text, tail_type, "tail")):
                    start = locate(span, f"triple {k} {what}")
                    etype = kind or options.entity_type
                    key = (etype, start, start + len(span))
                    entities.setdefault(key, Entity(etype, start, start + len(span), span))
                    ends.append(entities[key])
                relations.append(Relation(relation, ends[0], ends[1]))
        except _Skip as skip:
            out.notes.append(Note(f"skipped_record ({skip.kind})", source(path, line), skip.detail))
            continue
        out.notes.extend(Note("ambiguous_span", source(path, line), detail) for detail in ambiguous)
        meta: dict = {"source": source(path, line)}
        if ambiguous:
            meta["ambiguous_spans"] = len(ambiguous)
        out.records.append(
            Record(
                id="",
                dataset="",
                split=split,
                task="re",
                text=text,
                entities=sorted(entities.values(), key=lambda e: (e.start, e.end, e.type)),
                relations=relations,
                meta=meta,
            )
        )
    return out
