"""The prompt a judge is sent (:func:`build_prompt`, part of the cache key) and reading the score out
of its answer (:func:`parse_judge_answer`)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any

from chatuie.io import dumps_compact
from chatuie.reward.judge_types import MAX_SCORE, JudgeItem

JUDGE_SYSTEM = "You are a strict grader of information-extraction answers. You reply with JSON only."

JUDGE_TEMPLATE = """\
Grade a candidate answer to an information-extraction request.

Task type: {task}
Instruction: {instruction}
Label schema (JSON): {schema}

Text:
{text}

Candidate extraction (JSON):
{candidate}

Judge whether every extracted span appears in the text, carries the right label, and whether
anything the schema asks for is missing. Score from 0 (useless or invented) to 10 (complete
and correct, nothing invented).
Reply with only a JSON object: {{"score": <integer 0-10>, "reason": "<one short sentence>"}}"""


def build_prompt(item: JudgeItem) -> str:
    """The user message sent to the judge (deterministic: it is part of the cache key)."""
    return JUDGE_TEMPLATE.format(
        task=item.task,
        instruction=item.instruction or "(none)",
        schema=dumps_compact(item.schema),
        text=item.text,
        candidate=item.candidate,
    )


_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


def parse_judge_answer(content: str | None) -> tuple[float, str] | None:
    """``(score, reason)`` from a judge reply, or None when there is no valid score.

    Accepts bare JSON, JSON in a ```json fence, or a JSON object inside surrounding prose.
    The score must be a number (or numeric string) in [0, 10].
    """
    if not content:
        return None
    candidates: list[str] = [content.strip()]
    candidates += [m.group(1).strip() for m in _FENCE.finditer(content)]
    for text in candidates:
        for obj in _json_objects(text):
            parsed = _score_of(obj)
            if parsed is not None:
                return parsed
    return None


def _json_objects(text: str) -> Iterable[Any]:
    """Every JSON value that starts at a '{' in ``text``, left to right."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(text, start)
            yield obj
        except ValueError:
            pass
        start = text.find("{", start + 1)


def _score_of(obj: Any) -> tuple[float, str] | None:
    if not isinstance(obj, dict) or "score" not in obj:
        return None
    raw = obj["score"]
    if isinstance(raw, bool):  # bool is an int subclass; "true" is not a score
        return None
    if isinstance(raw, str):
        try:
            raw = float(raw.strip())
        except ValueError:
            return None
    if not isinstance(raw, int | float) or not math.isfinite(raw):
        return None
    if not 0 <= raw <= MAX_SCORE:
        return None
    reason = obj.get("reason")
    return float(raw), reason if isinstance(reason, str) else ""
