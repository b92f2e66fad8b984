"""Long texts in windows: cut into overlapping windows measured in tokens, so that the whole
prompt plus the answer budget fits the model's context; each window's grounded answer is shifted
to whole-text offsets and the windows are merged with duplicates removed (same type, same offsets).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from chatuie.data.schema import RelationType

# Tokens kept free besides the prompt and the answer budget: tokenizing a window alone and inside
# the prompt may differ at its two edges by a token or two.
SAFETY_TOKENS = 8
MIN_WINDOW_TOKENS = 16
# Where a window preferably ends (after a sentence) or starts (after any separator).
_STRONG_BREAKS = frozenset("\n。！？；!?;")
_WEAK_BREAKS = frozenset(" \t\r，、,:：)）」』】")


@dataclass(frozen=True)
class Window:
    """Characters ``[start, end)`` of a text, asked as one prompt."""

    start: int
    end: int


def token_spans(tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """Character span of every token of ``text`` (as tokenized alone, no special tokens).

    Tokenizers without offset mappings (slow ones) count one token per UTF-8 byte: an upper
    bound for byte-level and byte-fallback vocabularies, so windows stay inside the context.
    """
    try:
        encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        spans = [(int(s), int(e)) for s, e in encoded["offset_mapping"]]
        if spans or not text:
            return spans
    except (NotImplementedError, ValueError, TypeError, KeyError):
        pass
    spans = []
    for index, char in enumerate(text):
        spans.extend([(index, index + 1)] * len(char.encode("utf-8", "surrogatepass")))
    return spans


def plan_windows(text: str, spans: Sequence[tuple[int, int]], max_tokens: int, overlap: int) -> list[Window]:
    """Overlapping windows of at most ``max_tokens`` tokens covering ``text``.

    A window ends preferably after a sentence (else after a separator) within its last
    ``overlap`` tokens; the next one starts ``overlap`` tokens earlier (at the first separator
    there), so a mention cut by one window's end lies whole in the next one as long as it is
    shorter than the overlap.
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    n = len(spans)
    if n <= max_tokens:
        return [Window(0, len(text))]
    overlap = max(0, min(overlap, max_tokens // 4))  # keeps every step >= half a window
    starts = [s for s, _ in spans]
    windows: list[Window] = []
    i, start = 0, 0
    while True:
        j = i + max_tokens
        if j >= n:
            windows.append(Window(start, len(text)))
            return windows
        hard_end = spans[j][0]  # the first token left out starts here (a split char is left out)
        lo = max(start + 1, spans[max(i + 1, j - overlap)][0])
        end = _last_break(text, lo, hard_end) or hard_end
        if end <= start:
            end = max(hard_end, start + 1)
        windows.append(Window(start, end))
        k = bisect.bisect_left(starts, end)  # first token starting at or after the end
        next_i = max(i + 1, k - overlap)
        first = spans[next_i][0]
        start = _first_break(text, first, end) or first
        start = min(start, end)
        i = max(next_i, bisect.bisect_left(starts, start))


def _last_break(text: str, lo: int, hi: int) -> int | None:
    """The largest position p in (lo, hi] just after a strong break, else after a weak one."""
    for breaks in (_STRONG_BREAKS, _WEAK_BREAKS):
        for p in range(hi, lo, -1):
            if text[p - 1] in breaks:
                return p
    return None


def _first_break(text: str, lo: int, hi: int) -> int | None:
    """The smallest position p in [lo, hi) just after any break (a word / clause start)."""
    for p in range(max(lo, 1), hi):
        if text[p - 1] in _STRONG_BREAKS or text[p - 1] in _WEAK_BREAKS:
            return p
    return None


def _entity(e: Any, offset: int) -> dict[str, Any]:
    return {"type": e.type, "start": e.start + offset, "end": e.end + offset, "text": e.text}


def _span(s: Any, offset: int, **extra: Any) -> dict[str, Any]:
    return {**extra, "start": s.start + offset, "end": s.end + offset, "text": s.text}


def merge_windows(parts: Iterable[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """Merge grounded answers (``ground()`` output) of windows starting at the given offsets.

    Offsets become relative to the whole text. Duplicates (an overlap seen twice, an entity block
    repeated by several ``re`` instructions) are removed: entities by (type, start, end),
    relations by (type, head offsets, tail offsets), events by (type, trigger offsets) with
    their arguments united by (role, start, end).
    """
    entities: dict[tuple, dict] = {}
    relations: dict[tuple, dict] = {}
    events: dict[tuple, dict] = {}
    arguments: dict[tuple, dict[tuple, dict]] = {}
    dropped = 0
    for offset, part in parts:
        dropped += int(part.get("dropped", 0))
        for e in part.get("entities", []):
            item = _entity(e, offset)
            entities.setdefault((item["type"], item["start"], item["end"]), item)
        for r in part.get("relations", []):
            head, tail = _entity(r.head, offset), _entity(r.tail, offset)
            key = (r.type, head["start"], head["end"], tail["start"], tail["end"])
            known = relations.get(key)
            if known is None:
                relations[key] = {"type": r.type, "head": head, "tail": tail}
            else:  # another window may know the argument's type: keep the typed one
                for end, value in (("head", head), ("tail", tail)):
                    if not known[end]["type"] and value["type"]:
                        known[end] = value
        for ev in part.get("events", []):
            trigger = _span(ev.trigger, offset)
            key = (ev.type, trigger["start"], trigger["end"])
            if key not in events:
                events[key] = {"type": ev.type, "trigger": trigger, "arguments": []}
                arguments[key] = {}
            for a in ev.arguments:
                arg = _span(a, offset, role=a.role)
                arguments[key].setdefault((arg["role"], arg["start"], arg["end"]), arg)
    for key, event in events.items():
        event["arguments"] = sorted(arguments[key].values(), key=lambda a: (a["start"], a["end"], a["role"]))
    return {
        "entities": sorted(entities.values(), key=lambda e: (e["start"], e["end"], e["type"])),
        "relations": [relations[k] for k in sorted(relations, key=lambda k: (k[1], k[3], k[2], k[4], k[0]))],
        "events": sorted(
            events.values(), key=lambda e: (e["trigger"]["start"], e["trigger"]["end"], e["type"])
        ),
        "dropped": dropped,
    }


def apply_relation_types(grounded: dict[str, Any], relation_types: dict[str, RelationType]) -> dict[str, Any]:
    """Enforce declared head/tail entity types: a relation whose argument was recognised as an
    entity of another type is dropped; an untyped argument takes the declared type."""
    from dataclasses import replace

    kept = []
    dropped = 0
    for rel in grounded["relations"]:
        spec = relation_types.get(rel.type)
        head, tail = rel.head, rel.tail
        ok = True
        if spec is not None:
            for end, want in (("head", spec.head), ("tail", spec.tail)):
                arg = head if end == "head" else tail
                if want is None:
                    continue
                if arg.type and arg.type != want:
                    ok = False
                elif not arg.type:
                    arg = replace(arg, type=want)
                    head, tail = (arg, tail) if end == "head" else (head, arg)
        if ok:
            kept.append(replace(rel, head=head, tail=tail))
        else:
            dropped += 1
    return {**grounded, "relations": kept, "dropped": grounded.get("dropped", 0) + dropped}
