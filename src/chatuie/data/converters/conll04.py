"""CoNLL04: a JSON array of ``{tokens, entities: [[s, e, type]], relations: [[hs, he, ts, te, type]]}``.

Token offsets are end-exclusive. The text is rebuilt by joining tokens with single spaces and
every token span is mapped to character offsets in that text.
"""

from __future__ import annotations

from pathlib import Path

from chatuie.data.converters._raw import load_json_document
from chatuie.data.records import ConversionError, Entity, Record, Relation, Schema

DATASET = "conll04"
ENTITY_TYPES = ["Loc", "Org", "Peop", "Other"]
RELATION_TYPES = ["Work_For", "Kill", "OrgBased_In", "Live_In", "Located_In"]
FILES = {"train": "train.CoNLL04.json", "dev": "valid.CoNLL04.json", "test": "test.CoNLL04.json"}


def _token_offsets(tokens: list[str]) -> list[tuple[int, int]]:
    offsets, cursor = [], 0
    for token in tokens:
        offsets.append((cursor, cursor + len(token)))
        cursor += len(token) + 1
    return offsets


def convert_file(path: Path, split: str) -> list[Record]:
    data = load_json_document(path)
    if not isinstance(data, list):
        raise ConversionError(path, 1, f"expected a JSON array of sentences, got {type(data).__name__}")
    records = []
    for index, item in enumerate(data):
        where = f"sentence {index}"

        def fail(message: str, where: str = where) -> ConversionError:
            # The file is one line; the sentence index locates the problem.
            return ConversionError(path, 1, f"{where}: {message}")

        if not isinstance(item, dict):
            raise fail(f"expected an object, got {type(item).__name__}")
        tokens = item.get("tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
            raise fail("'tokens' must be a non-empty list of non-empty strings")
        if any(" " in token for token in tokens):
            raise fail("a token contains a space; the text could not be rebuilt unambiguously")
        text = " ".join(tokens)
        offsets = _token_offsets(tokens)

        def char_span(
            start: object, end: object, what: str, tokens: list[str] = tokens, offsets=offsets
        ) -> tuple[int, int]:
            if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(tokens)):
                raise fail(
                    f"{what}: token offsets [{start!r}, {end!r}) out of range for {len(tokens)} tokens"
                )
            return offsets[start][0], offsets[end - 1][1]

        by_span: dict[tuple[int, int], Entity] = {}
        entities = []
        for k, ent in enumerate(item.get("entities", [])):
            if not (isinstance(ent, list) and len(ent) == 3):
                raise fail(f"entity {k}: expected [start, end, type], got {ent!r}")
            start, end, label = ent
            if label not in ENTITY_TYPES:
                raise fail(f"entity {k}: unknown entity type {label!r}")
            cs, ce = char_span(start, end, f"entity {k}")
            entity = Entity(label, cs, ce, text[cs:ce])
            by_span[(start, end)] = entity
            entities.append(entity)
        relations = []
        for k, rel in enumerate(item.get("relations", [])):
            if not (isinstance(rel, list) and len(rel) == 5):
                raise fail(f"relation {k}: expected [hs, he, ts, te, type], got {rel!r}")
            hs, he, ts, te, label = rel
            if label not in RELATION_TYPES:
                raise fail(f"relation {k}: unknown relation type {label!r}")
            char_span(hs, he, f"relation {k} head")
            char_span(ts, te, f"relation {k} tail")
            head, tail = by_span.get((hs, he)), by_span.get((ts, te))
            if head is None or tail is None:
                raise fail(f"relation {k}: head or tail is not an annotated entity")
            relations.append(Relation(label, head, tail))
        records.append(
            Record(
                id=f"{DATASET}-{split}-{index:04d}",
                dataset=DATASET,
                split=split,
                task="re",
                text=text,
                schema=Schema(entities=list(ENTITY_TYPES), relations=list(RELATION_TYPES)),
                entities=sorted(entities, key=lambda e: (e.start, e.end)),
                relations=relations,
            )
        )
    return records


def convert(raw_dir: Path) -> dict[str, list[Record]]:
    return {split: convert_file(raw_dir / name, split) for split, name in FILES.items()}
