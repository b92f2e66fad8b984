"""The documented output format: what the assistant answers for each IE task.

Compact JSON, keys in the order the request's schema lists them, every requested label present
(an absent label maps to an empty list, so the model learns to say "none"); the constrained
decoder enforces both::

    ner  {"NAME": ["常建良"], "ORG": []}
    re   {"entities": {"Peop": ["John"], "Org": ["IBM"]},
          "relations": {"Work_For": [{"head": "John", "tail": "IBM"}]}}
    ee   {"质押": [{"trigger": "质押", "arguments": {"sub-org": ["东方金钰"]}}], "投资": []}

Spans are strings copied from the input text (the constrained decoder guarantees it); offsets
are recovered by :func:`ground` (earliest occurrence not yet used by the same label).
In ``ee`` answers only the roles that have arguments are listed (in schema order): events carry
up to ten roles, and listing the empty ones would double the answer's length.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from chatuie.data.records import Argument, Entity, Event, Record, Relation, Schema, Trigger
from chatuie.io import dumps_compact


def render(record: Record, schema: Schema) -> str:
    """The gold answer of ``record`` restricted to ``schema`` (labels in schema order)."""
    return dumps_compact(gold_structure(record, schema))


def gold_structure(record: Record, schema: Schema) -> dict[str, Any]:
    if record.task == "ner":
        return _entity_lists(record.entities, schema.entities)
    if record.task == "re":
        relations: dict[str, list[dict[str, str]]] = {label: [] for label in schema.relations}
        for rel in record.relations:
            if rel.type in relations:
                relations[rel.type].append({"head": rel.head.text, "tail": rel.tail.text})
        return {"entities": _entity_lists(record.entities, schema.entities), "relations": relations}
    if record.task == "ee":
        events: dict[str, list[dict[str, Any]]] = {label: [] for label in schema.events}
        for event in record.events:
            if event.type not in events:
                continue
            roles = schema.events[event.type]
            arguments: dict[str, list[str]] = {role: [] for role in roles}
            for arg in event.arguments:
                if arg.role in arguments:
                    arguments[arg.role].append(arg.text)
            filled = {role: spans for role, spans in arguments.items() if spans}
            events[event.type].append({"trigger": event.trigger.text, "arguments": filled})
        return events
    raise ValueError(f"record {record.id}: task {record.task!r} has no IE output format")


def _entity_lists(entities: list[Entity], labels: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {label: [] for label in labels}
    for entity in entities:
        if entity.type in out:
            out[entity.type].append(entity.text)
    return out


def _own_word(ch: str) -> bool:
    """Characters that are a word by themselves (scripts written without spaces)."""
    code = ord(ch)
    return (
        0x3040 <= code <= 0x30FF  # kana
        or 0x3400 <= code <= 0x4DBF
        or 0x4E00 <= code <= 0x9FFF
        or 0xF900 <= code <= 0xFAFF
        or 0xAC00 <= code <= 0xD7AF  # hangul
        or 0x20000 <= code <= 0x3FFFF
    )


def is_word_char(ch: str) -> bool:
    """Letters and digits of space-separated scripts: a span edge may not fall between two."""
    return ch.isalnum() and not _own_word(ch)


def cuts_word(text: str, offset: int) -> bool:
    """Whether a span edge at character ``offset`` would fall inside a word."""
    return 0 < offset < len(text) and is_word_char(text[offset - 1]) and is_word_char(text[offset])


class _Grounder:
    """Maps span strings to offsets: the earliest occurrence not yet taken by the same key, one
    that cuts no word first ("on" in "Mon. on" is the last word, not the end of "Mon")."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.taken: dict[str, set[int]] = defaultdict(set)

    def __call__(self, span: str, key: str) -> tuple[int, int] | None:
        if not span:
            return None
        occurrences = []
        start = self.text.find(span)
        while start != -1:
            occurrences.append(start)
            start = self.text.find(span, start + 1)
        if not occurrences:
            return None
        whole = [
            o for o in occurrences if not cuts_word(self.text, o) and not cuts_word(self.text, o + len(span))
        ]
        candidates, taken = whole or occurrences, self.taken[key]
        # Every occurrence used: a repeated mention, point at the first.
        start = next((o for o in candidates if o not in taken), candidates[0])
        taken.add(start)
        return start, start + len(span)


def ground(task: str, answer: str | dict, text: str, schema: Schema) -> dict[str, list]:
    """Parse an answer and map it to records' structures with character offsets.

    Unknown labels, spans not in ``text`` and malformed parts are dropped (and counted in
    ``dropped``): the scorer sees only what could be grounded.
    """
    data = json.loads(answer) if isinstance(answer, str) else answer
    if not isinstance(data, dict):
        raise ValueError("answer is not a JSON object")
    find = _Grounder(text)
    dropped = 0
    entities: list[Entity] = []
    relations: list[Relation] = []
    events: list[Event] = []

    def spans_of(value: Any) -> list[str]:
        nonlocal dropped
        if not isinstance(value, list):
            dropped += 1
            return []
        good = [s for s in value if isinstance(s, str) and s]
        dropped += len(value) - len(good)
        return good

    def entity_block(block: Any) -> None:
        nonlocal dropped
        if not isinstance(block, dict):
            dropped += 1
            return
        for label, value in block.items():
            if label not in schema.entities:
                dropped += 1
                continue
            for span in spans_of(value):
                where = find(span, f"entity:{label}")
                if where is None:
                    dropped += 1
                    continue
                entities.append(Entity(label, where[0], where[1], span))

    if task == "ner":
        entity_block(data)
    elif task == "re":
        entity_block(data.get("entities", {}))
        by_text = {}
        for e in entities:
            by_text.setdefault(e.text, e)
        block = data.get("relations", {})
        for label, value in block.items() if isinstance(block, dict) else []:
            if label not in schema.relations or not isinstance(value, list):
                dropped += 1
                continue
            for item in value:
                head_text = item.get("head") if isinstance(item, dict) else None
                tail_text = item.get("tail") if isinstance(item, dict) else None
                if not (isinstance(head_text, str) and isinstance(tail_text, str)):
                    dropped += 1
                    continue
                head = by_text.get(head_text) or _untyped(text, head_text)
                tail = by_text.get(tail_text) or _untyped(text, tail_text)
                if head is None or tail is None:
                    dropped += 1
                    continue
                relations.append(Relation(label, head, tail))
    elif task == "ee":
        for label, value in data.items():
            if label not in schema.events or not isinstance(value, list):
                dropped += 1
                continue
            roles = schema.events[label]
            for item in value:
                if not isinstance(item, dict) or not isinstance(item.get("trigger"), str):
                    dropped += 1
                    continue
                where = find(item["trigger"], f"trigger:{label}")
                if where is None:
                    dropped += 1
                    continue
                trigger = Trigger(where[0], where[1], item["trigger"])
                arguments = []
                args = item.get("arguments", {})
                for role, spans in args.items() if isinstance(args, dict) else []:
                    if role not in roles:
                        dropped += 1
                        continue
                    for span in spans_of(spans):
                        at = find(span, f"arg:{label}:{role}")
                        if at is None:
                            dropped += 1
                            continue
                        arguments.append(Argument(role, at[0], at[1], span))
                events.append(Event(label, trigger, tuple(arguments)))
    else:
        raise ValueError(f"task {task!r} has no IE output format")
    return {"entities": entities, "relations": relations, "events": events, "dropped": dropped}


def _untyped(text: str, span: str) -> Entity | None:
    start = text.find(span) if span else -1
    return None if start == -1 else Entity("", start, start + len(span), span)


def flatten_answer(task: str, answer: str | Mapping[str, Any]) -> set[tuple[str, ...]]:
    """The set of (kind, label, span...) items of an answer in the documented output format.

    ner: ("entity", label, span); re: those plus ("relation", label, head, tail);
    ee: ("trigger", type, trigger) and ("argument", type, role, span). Malformed parts are
    ignored (they cannot match gold). Raises ValueError if ``answer`` is not a JSON object.
    """
    data = json.loads(answer) if isinstance(answer, str) else answer
    if not isinstance(data, Mapping):
        raise ValueError("answer is not a JSON object")
    items: set[tuple[str, ...]] = set()

    def entities(block: Any) -> None:
        if not isinstance(block, Mapping):
            return
        for label, spans in block.items():
            if isinstance(spans, list):
                items.update(("entity", str(label), s) for s in spans if isinstance(s, str) and s)

    if task == "ner":
        entities(data)
    elif task == "re":
        entities(data.get("entities"))
        relations = data.get("relations")
        for label, pairs in relations.items() if isinstance(relations, Mapping) else []:
            for pair in pairs if isinstance(pairs, list) else []:
                if isinstance(pair, Mapping):
                    head, tail = pair.get("head"), pair.get("tail")
                    if isinstance(head, str) and isinstance(tail, str):
                        items.add(("relation", str(label), head, tail))
    elif task == "ee":
        for etype, events in data.items():
            for event in events if isinstance(events, list) else []:
                if not isinstance(event, Mapping):
                    continue
                trigger = event.get("trigger")
                if isinstance(trigger, str) and trigger:
                    items.add(("trigger", str(etype), trigger))
                arguments = event.get("arguments")
                for role, spans in arguments.items() if isinstance(arguments, Mapping) else []:
                    for span in spans if isinstance(spans, list) else []:
                        if isinstance(span, str) and span:
                            items.add(("argument", str(etype), str(role), span))
    else:
        raise ValueError(f"task {task!r} has no IE output format")
    return items
