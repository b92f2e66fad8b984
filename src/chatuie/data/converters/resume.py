"""Resume NER: one ``<char> <tag>`` per line, BMES tags, a blank line ends a sentence.

Known quirk of the raw release, repaired here and nowhere else: in ``train.char.bmes`` two ORG
entities are cut by a spurious sentence break (lines 62391 and 64413: ``...俄罗斯圣。`` / ``彼得堡
工程科学院...``). SOURCE.md counts sentences at blank lines and entities at ``B-``/``S-`` tags, so
the repair keeps both sentences, closes the entity at the break and tags the orphan continuation
(``M-``/``E-`` of the same type at the start of the next sentence) as ``O``. Every other
ill-formed sequence is an error.
"""

from __future__ import annotations

from pathlib import Path

from chatuie.data.converters._raw import iter_lines
from chatuie.data.records import ConversionError, Entity, Record, Schema

DATASET = "resume"
ENTITY_TYPES = ["NAME", "CONT", "RACE", "TITLE", "EDU", "ORG", "PRO", "LOC"]
FILES = {"train": "train.char.bmes", "dev": "dev.char.bmes", "test": "test.char.bmes"}


def _decode_sentence(
    chars: list[str], tags: list[tuple[int, str]], path: Path, continues: str | None
) -> tuple[str, list[Entity], str | None]:
    """Turn one sentence's BMES tags into entities, rejecting any ill-formed sequence.

    ``continues`` is the type of an entity the previous sentence left open (the repaired quirk);
    the sentence's leading ``M-``/``E-`` tags of that type are read as ``O``. Returns the text, the
    entities and the type of an entity this sentence leaves open at its end (or ``None``).
    """
    text = "".join(chars)
    if continues is not None:
        first = tags[0][1]
        if first not in (f"M-{continues}", f"E-{continues}"):
            raise ConversionError(
                path, tags[0][0] - 1, f"sentence break inside entity B-{continues} (missing E-{continues})"
            )
        tags = list(tags)
        for index, (lineno, tag) in enumerate(tags):
            if tag not in (f"M-{continues}", f"E-{continues}"):
                raise ConversionError(
                    path, lineno, f"continuation of a cut {continues} entity ends without E-"
                )
            tags[index] = (lineno, "O")
            if tag.startswith("E-"):
                break
    entities: list[Entity] = []
    open_start: int | None = None
    open_type: str | None = None
    for index, (lineno, tag) in enumerate(tags):
        if tag == "O":
            prefix, label = "O", None
        else:
            prefix, _, label = tag.partition("-")
            if prefix not in {"B", "M", "E", "S"} or not label:
                raise ConversionError(path, lineno, f"unknown tag {tag!r} (expected B-/M-/E-/S-<TYPE> or O)")
            if label not in ENTITY_TYPES:
                raise ConversionError(path, lineno, f"unknown entity type {label!r} in tag {tag!r}")
        if prefix in {"M", "E"}:
            if open_start is None:
                raise ConversionError(path, lineno, f"tag {tag!r} without a preceding B-{label}")
            if label != open_type:
                raise ConversionError(path, lineno, f"tag {tag!r} continues an entity of type {open_type!r}")
            if prefix == "E":
                entities.append(Entity(label, open_start, index + 1, text[open_start : index + 1]))
                open_start = open_type = None
            continue
        if open_start is not None:
            raise ConversionError(
                path, lineno, f"tag {tag!r} while entity B-{open_type} is still open (missing E-{open_type})"
            )
        if prefix == "B":
            open_start, open_type = index, label
        elif prefix == "S":
            entities.append(Entity(label, index, index + 1, text[index]))
    if open_start is not None:
        # Closed at the break; the next sentence must start with its continuation.
        entities.append(Entity(open_type, open_start, len(text), text[open_start:]))
        return text, entities, open_type
    return text, entities, None


def convert_file(path: Path, split: str) -> list[Record]:
    records: list[Record] = []
    chars: list[str] = []
    tags: list[tuple[int, str]] = []
    state: dict[str, str | None] = {"open": None}
    repairs = 0

    def flush() -> None:
        nonlocal repairs
        if not chars:
            return
        continues = state["open"]
        text, entities, state["open"] = _decode_sentence(chars, tags, path, continues)
        repairs += continues is not None
        records.append(
            Record(
                id=f"{DATASET}-{split}-{len(records):05d}",
                dataset=DATASET,
                split=split,
                task="ner",
                text=text,
                schema=Schema(entities=list(ENTITY_TYPES)),
                entities=entities,
            )
        )
        if continues is not None:
            records[-1].meta["repaired"] = "continuation of an entity cut by a sentence break"
        if state["open"] is not None:
            records[-1].meta["repaired"] = "entity cut by a sentence break, closed at the break"
        chars.clear()
        tags.clear()

    for lineno, line in iter_lines(path):
        if not line.strip():
            flush()
            continue
        fields = line.split(" ")
        if len(fields) != 2 or len(fields[0]) != 1 or not fields[1]:
            raise ConversionError(
                path, lineno, f"expected '<char> <tag>' (2 columns, one character), got {line!r}"
            )
        chars.append(fields[0])
        tags.append((lineno, fields[1]))
    flush()
    if state["open"] is not None:
        raise ConversionError(
            path,
            tags_end_line(path),
            f"file ends inside entity B-{state['open']} (missing E-{state['open']})",
        )
    return records


def tags_end_line(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(1 for _ in handle)


def convert(raw_dir: Path) -> dict[str, list[Record]]:
    return {split: convert_file(raw_dir / name, split) for split, name in FILES.items()}
