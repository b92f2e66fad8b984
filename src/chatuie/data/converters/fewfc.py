"""FewFC (Chinese financial events).

Splits follow CasEE: dev and test are ``casee_split/dev.json`` / ``test.json`` (CasEE format);
train is every sentence of ``rearranged/*.json`` (official format) whose id is in neither.
"""

from __future__ import annotations

from pathlib import Path

from chatuie.data.converters._raw import check_span, iter_json_lines, require
from chatuie.data.records import Argument, ConversionError, Event, Record, Schema, Trigger

DATASET = "fewfc"
# Event type -> argument roles, the union over the whole release (trigger excluded).
EVENT_SCHEMA: dict[str, list[str]] = {
    "质押": [
        "sub-org",
        "sub-per",
        "obj-org",
        "obj-per",
        "collateral",
        "date",
        "money",
        "number",
        "proportion",
    ],
    "股份股权转让": [
        "sub-org",
        "sub-per",
        "obj-org",
        "obj-per",
        "collateral",
        "date",
        "money",
        "number",
        "proportion",
        "target-company",
    ],
    "投资": ["sub", "obj", "date", "money"],
    "减持": ["sub", "obj", "date", "share-org", "share-per", "title"],
    "起诉": ["sub-org", "sub-per", "obj-org", "obj-per", "date"],
    "收购": ["sub-org", "sub-per", "obj-org", "date", "money", "number", "proportion", "way"],
    "判决": ["sub-org", "sub-per", "obj-org", "obj-per", "date", "institution", "money"],
    "中标": ["sub", "obj", "date", "amount"],
    "签署合同": ["sub-org", "sub-per", "obj-org", "obj-per", "date", "amount"],
    "担保": ["sub-org", "sub-per", "obj-org", "date", "amount", "way"],
}
REARRANGED = ["train_base.json", "test_base.json", "train_trans.json", "test_trans.json"]
CASEE = {"dev": "casee_split/dev.json", "test": "casee_split/test.json"}


def _schema() -> Schema:
    return Schema(events={k: list(v) for k, v in EVENT_SCHEMA.items()})


def _check_type(event_type: object, path: Path, line: int) -> str:
    if event_type not in EVENT_SCHEMA:
        raise ConversionError(path, line, f"unknown event type {event_type!r}")
    return event_type  # type: ignore[return-value]


def _check_role(event_type: str, role: object, path: Path, line: int) -> str:
    if role not in EVENT_SCHEMA[event_type]:
        raise ConversionError(path, line, f"role {role!r} is not a role of event type {event_type!r}")
    return role  # type: ignore[return-value]


def _span(text: str, mention: object, path: Path, line: int, what: str) -> tuple[int, int, str]:
    if not isinstance(mention, dict):
        raise ConversionError(path, line, f"{what}: expected an object with 'span' and 'word'")
    span = mention.get("span")
    if not (isinstance(span, list) and len(span) == 2):
        raise ConversionError(path, line, f"{what}: 'span' must be [start, end], got {span!r}")
    start, end = span
    check_span(text, start, end, path, line, what)
    word = mention.get("word")
    if word != text[start:end]:
        raise ConversionError(path, line, f"{what}: word {word!r} != text[{start}:{end}] {text[start:end]!r}")
    return start, end, word


def _official_events(obj: dict, text: str, path: Path, line: int) -> list[Event]:
    events = []
    for k, raw in enumerate(require(obj, "events", list, path, line)):
        event_type = _check_type(raw.get("type"), path, line)
        trigger, arguments = None, []
        for m, mention in enumerate(raw.get("mentions", [])):
            what = f"event {k} mention {m}"
            start, end, word = _span(text, mention, path, line, what)
            role = mention.get("role")
            if role == "trigger":
                if trigger is not None:
                    raise ConversionError(path, line, f"event {k}: more than one trigger")
                trigger = Trigger(start, end, word)
            else:
                arguments.append(Argument(_check_role(event_type, role, path, line), start, end, word))
        if trigger is None:
            raise ConversionError(path, line, f"event {k}: no trigger mention")
        events.append(Event(event_type, trigger, tuple(sorted(arguments, key=lambda a: (a.start, a.role)))))
    return events


def _casee_events(obj: dict, text: str, path: Path, line: int) -> list[Event]:
    events = []
    for k, raw in enumerate(require(obj, "events", list, path, line)):
        event_type = _check_type(raw.get("type"), path, line)
        start, end, word = _span(text, raw.get("trigger"), path, line, f"event {k} trigger")
        arguments = []
        for role, mentions in (raw.get("args") or {}).items():
            role = _check_role(event_type, role, path, line)
            for m, mention in enumerate(mentions):
                a_start, a_end, a_word = _span(text, mention, path, line, f"event {k} {role} {m}")
                arguments.append(Argument(role, a_start, a_end, a_word))
        events.append(
            Event(
                event_type,
                Trigger(start, end, word),
                tuple(sorted(arguments, key=lambda a: (a.start, a.role))),
            )
        )
    return events


def _read(path: Path, split: str, official: bool, skip_ids: set[str] | None = None) -> list[Record]:
    records = []
    for line, obj in iter_json_lines(path):
        record_id = require(obj, "id", str, path, line)
        if skip_ids is not None and record_id in skip_ids:
            continue
        text = require(obj, "content", str, path, line)
        if not text.strip():
            raise ConversionError(path, line, "empty 'content'")
        events = (_official_events if official else _casee_events)(obj, text, path, line)
        records.append(
            Record(
                id=f"{DATASET}-{record_id}",
                dataset=DATASET,
                split=split,
                task="ee",
                text=text,
                schema=_schema(),
                events=events,
                meta={"source": f"{path.parent.name}/{path.name}"},
            )
        )
    return records


def convert(raw_dir: Path) -> dict[str, list[Record]]:
    out = {split: _read(raw_dir / name, split, official=False) for split, name in CASEE.items()}
    held_out = {r.id.removeprefix(f"{DATASET}-") for split in CASEE for r in out[split]}
    train: list[Record] = []
    for name in REARRANGED:
        train.extend(_read(raw_dir / "rearranged" / name, "train", official=True, skip_ids=held_out))
    return {"train": train, **out}
