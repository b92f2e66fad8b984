"""What the judge is configured with, what it scores and what it reports: :class:`JudgeConfig`,
:class:`JudgeItem`, :class:`JudgeResult`, :class:`JudgeStats` (the judge: :mod:`chatuie.reward.judge`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from chatuie.data.answers import render
from chatuie.data.records import Record, Schema

Provider = Literal["reference", "openai"]
Status = Literal["scored", "cached", "failed", "unparseable", "skipped_budget"]

MAX_SCORE = 10.0


@dataclass(frozen=True)
class JudgeConfig:
    provider: Provider = "reference"
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "judge"
    api_key_env: str = "CHATUIE_JUDGE_API_KEY"  # the NAME of the variable, never the key
    temperature: float = 0.0
    max_tokens: int = 256
    max_concurrency: int = 4
    max_retries: int = 4  # extra attempts after the first, per item
    timeout_s: float = 60.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 8.0  # also caps an honoured Retry-After
    max_requests: int | None = None  # judge calls per run; None = unlimited
    cache_path: str | None = None
    seed: int = 0  # seeds the backoff jitter

    def __post_init__(self) -> None:
        if self.provider not in ("reference", "openai"):
            raise ValueError(f"judge provider must be 'reference' or 'openai', not {self.provider!r}")
        if self.max_concurrency < 1:
            raise ValueError("judge max_concurrency must be >= 1")
        if self.max_retries < 0:
            raise ValueError("judge max_retries must be >= 0")
        if self.timeout_s <= 0:
            raise ValueError("judge timeout_s must be > 0")
        if self.backoff_base_s < 0 or self.backoff_max_s < 0:
            raise ValueError("judge backoff seconds must be >= 0")
        if self.max_requests is not None and self.max_requests < 0:
            raise ValueError("judge max_requests must be >= 0 (or null for no budget)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class JudgeItem:
    """One candidate extraction to score. ``gold`` is needed by the reference provider only."""

    id: str
    task: str  # ner | re | ee
    text: str
    candidate: str  # the model's answer, a JSON string in the output format
    schema: dict[str, Any] = field(default_factory=dict)
    instruction: str = ""
    gold: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JudgeItem:
        schema = data.get("schema") or {}
        if isinstance(schema, Schema):
            schema = schema.to_dict()
        return cls(
            id=str(data["id"]),
            task=str(data["task"]),
            text=str(data["text"]),
            candidate=str(data["candidate"]),
            schema=dict(schema),
            instruction=str(data.get("instruction") or ""),
            gold=data.get("gold"),
        )

    @classmethod
    def from_record(cls, record: Record, candidate: str, instruction: str = "") -> JudgeItem:
        """An item for ``record``'s IE task, with the gold answer rendered in the output format."""
        return cls(
            id=record.id,
            task=record.task,
            text=record.text,
            candidate=candidate,
            schema=record.schema.to_dict(),
            instruction=instruction,
            gold=render(record, record.schema),
        )


@dataclass(frozen=True)
class JudgeResult:
    id: str
    score: float | None  # None unless status is "scored" or "cached"
    reason: str | None
    cached: bool  # True when no judge call was made for this item in this run
    status: Status
    error: str | None = None  # redacted, for "failed" / "unparseable"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class JudgeStats:
    provider: str = "reference"
    items: int = 0
    scored: int = 0  # items that have a score (fresh or cached)
    calls_made: int = 0  # judge calls: HTTP requests (openai) or offline computations (reference)
    cache_hits: int = 0
    retries: int = 0  # calls that were re-attempts
    failures: int = 0  # items given up on (retries exhausted or a non-retryable error)
    unparseable: int = 0  # answers with no usable score (not cached, so retried next run)
    skipped_budget: int = 0  # items not scored because max_requests ran out
    cache_corrupt_lines: int = 0  # lines skipped when loading the cache
    mean_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
