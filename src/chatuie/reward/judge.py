"""LLM-as-a-judge scoring for the reward stage: cached, retried, budgeted, offline by default.

Two providers share one code path (cache, budget, stats), so a pipeline behaves the same with
either:

* ``reference`` (default, no network): the score is the F1 of the candidate extraction against
  the gold answer over the flattened (label, span) items of the output format, times 10.
* ``openai``: any OpenAI-compatible chat-completions endpoint through the real ``openai``
  client. The client's own retries are off; :class:`Judge` retries 429 / 5xx / timeouts /
  connection errors itself with seeded exponential backoff, and never retries other 4xx.

The cache is a JSONL file, one line per successfully parsed answer::

    {"v": 1, "key": "<sha256>", "provider": "openai", "model": "...", "score": 7.0,
     "reason": "..."}

``key`` is ``sha256(compact JSON of [base_url, model, prompt])`` for ``openai`` and
``sha256(compact JSON of ["reference", REFERENCE_VERSION, prompt, gold])`` for ``reference``.
Lines are appended with one ``write`` + ``fsync`` under a lock; a torn or corrupt line (a
``kill -9`` mid-write) is skipped and counted on load, never fatal.

The API key is read from the environment variable *named* by ``JudgeConfig.api_key_env``; it is
never stored on the config, and every message this module emits is redacted against it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from chatuie.data.answers import flatten_answer, render
from chatuie.data.records import Record, Schema
from chatuie.eval.metrics import f1_score
from chatuie.io import dumps_compact

log = logging.getLogger(__name__)

Provider = Literal["reference", "openai"]
Status = Literal["scored", "cached", "failed", "unparseable", "skipped_budget"]

CACHE_VERSION = 1
REFERENCE_VERSION = 1  # bump when the reference scoring changes, so old cache lines stop matching
PLACEHOLDER_API_KEY = "EMPTY"  # local OpenAI-compatible servers (vLLM, llama.cpp) ignore the key
MAX_SCORE = 10.0


# ---------------------------------------------------------------------------------------------
# config and data types
# ---------------------------------------------------------------------------------------------
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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "judge") -> JudgeConfig:
        """Build from a params mapping; unknown keys are an error (a typo must not go unseen), and
        types and number ranges are checked as for every section (chatuie.config.build), ``where``
        (``params.yaml: judge``) naming the key."""
        from chatuie.config import build

        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown judge config keys: {unknown}")
        return build(cls, dict(data), where)

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


# ---------------------------------------------------------------------------------------------
# prompt and answer parsing
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# reference provider: F1 over flattened output-format items
# ---------------------------------------------------------------------------------------------


def reference_score(item: JudgeItem) -> tuple[float, str]:
    """``(10 * F1, reason)`` of the candidate against ``item.gold``; no network."""
    if item.gold is None:
        raise ValueError(f"item {item.id}: the reference judge needs a gold answer")
    gold = flatten_answer(item.task, item.gold)
    try:
        predicted = flatten_answer(item.task, item.candidate)
    except ValueError:  # includes json.JSONDecodeError: an unreadable answer earns nothing
        return 0.0, "candidate is not a JSON object in the output format"
    f1 = f1_score(predicted, gold)
    tp = len(predicted & gold)
    reason = f"F1={f1:.4f} ({tp} correct of {len(predicted)} predicted, {len(gold)} gold)"
    return round(MAX_SCORE * f1, 4), reason


# ---------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------
def _sha256(parts: Sequence[Any]) -> str:
    return hashlib.sha256(dumps_compact(list(parts)).encode("utf-8")).hexdigest()


def cache_key(config: JudgeConfig, prompt: str, gold: str | None = None) -> str:
    """The cache key of a prompt under ``config`` (see the module docstring)."""
    if config.provider == "reference":
        return _sha256(["reference", REFERENCE_VERSION, prompt, gold])
    return _sha256([config.base_url.rstrip("/"), config.model, prompt])


class JudgeCache:
    """Append-only JSONL cache of parsed scores, safe against a kill at any instant."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self.entries: dict[str, dict[str, Any]] = {}
        self.corrupt_lines = 0
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._needs_newline = False
        if self.path is not None:
            self._load()

    def _load(self) -> None:
        assert self.path is not None
        if not self.path.exists():
            return
        with open(self.path, "rb") as handle:
            data = handle.read()
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                key = entry["key"]
                score = entry["score"]
                ok = (
                    isinstance(key, str)
                    and isinstance(score, int | float)
                    and not isinstance(score, bool)
                    and 0 <= score <= MAX_SCORE
                )
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                self.corrupt_lines += 1  # torn tail from a kill mid-write, or a damaged line
                continue
            self.entries[key] = entry
        if self.corrupt_lines:
            log.warning("judge cache %s: skipped %d corrupt line(s)", self.path, self.corrupt_lines)
        # A torn last line has no newline: start the next append on a fresh line so the new
        # entry is not glued onto the fragment.
        self._needs_newline = bool(data) and not data.endswith(b"\n")

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self.entries.get(key)

    def put(self, entry: dict[str, Any]) -> None:
        """Record ``entry`` in memory and, if there is a file, append it durably."""
        line = (dumps_compact(entry) + "\n").encode("utf-8")
        with self._lock:
            self.entries[entry["key"]] = entry
            if self.path is None:
                return
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                if self._needs_newline:
                    line = b"\n" + line
                    self._needs_newline = False
            # One write() per line (O_APPEND keeps it at the end); loop only on a short write.
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


# ---------------------------------------------------------------------------------------------
# the judge
# ---------------------------------------------------------------------------------------------
class _Budget:
    """Counts judge calls and refuses them once ``limit`` is reached (thread-safe)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.calls = 0
        self.retries = 0
        self._lock = threading.Lock()

    def acquire(self, *, retry: bool) -> bool:
        with self._lock:
            if self.limit is not None and self.calls >= self.limit:
                return False
            self.calls += 1
            if retry:
                self.retries += 1
            return True


@dataclass
class _Outcome:
    status: Status
    score: float | None = None
    reason: str | None = None
    error: str | None = None


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Unparseable(Exception):
    pass


class Judge:
    """Scores items under one config; the cache is loaded once and shared by every call."""

    def __init__(self, config: JudgeConfig) -> None:
        self.config = config
        self.cache = JudgeCache(config.cache_path)
        self._client: Any = None
        self._client_lock = threading.Lock()

    # -- public -------------------------------------------------------------------------------
    def score_all(
        self, items: Iterable[JudgeItem | Mapping[str, Any]]
    ) -> tuple[list[JudgeResult], JudgeStats]:
        """Score ``items``; results come back in input order whatever the concurrency."""
        cfg = self.config
        items = [it if isinstance(it, JudgeItem) else JudgeItem.from_dict(it) for it in items]
        if cfg.provider == "reference":
            missing = [it.id for it in items if it.gold is None]
            if missing:
                raise ValueError(f"reference judge needs a gold answer; missing for {missing[:5]}")
        prompts = [build_prompt(it) for it in items]
        keys = [cache_key(cfg, p, it.gold) for p, it in zip(prompts, items, strict=True)]

        # One judge call per distinct prompt not already cached; duplicates share the answer.
        todo: dict[str, tuple[JudgeItem, str]] = {}
        for key, item, prompt in zip(keys, items, prompts, strict=True):
            if self.cache.get(key) is None and key not in todo:
                todo[key] = (item, prompt)

        budget = _Budget(cfg.max_requests)
        outcomes: dict[str, _Outcome] = {}
        if todo:
            work = list(todo.items())
            if cfg.max_concurrency == 1 or len(work) == 1:
                for key, (item, prompt) in work:
                    outcomes[key] = self._score_one(key, item, prompt, budget)
            else:
                with ThreadPoolExecutor(cfg.max_concurrency, thread_name_prefix="judge") as pool:
                    futures = {
                        key: pool.submit(self._score_one, key, item, prompt, budget)
                        for key, (item, prompt) in work
                    }
                    outcomes = {key: fut.result() for key, fut in futures.items()}

        stats = JudgeStats(
            provider=cfg.provider,
            items=len(items),
            calls_made=budget.calls,
            retries=budget.retries,
            cache_corrupt_lines=self.cache.corrupt_lines,
        )
        results: list[JudgeResult] = []
        first_seen: set[str] = set()
        for key, item in zip(keys, items, strict=True):
            fresh = key in outcomes and key not in first_seen
            first_seen.add(key)
            if fresh:
                out = outcomes[key]
                results.append(JudgeResult(item.id, out.score, out.reason, False, out.status, out.error))
            else:
                entry = self.cache.get(key)  # loaded, or answered earlier in this run
                if entry is not None:
                    results.append(
                        JudgeResult(item.id, float(entry["score"]), entry.get("reason", ""), True, "cached")
                    )
                else:  # a duplicate of a prompt that failed in this run: same outcome
                    out = outcomes[key]
                    results.append(JudgeResult(item.id, None, None, False, out.status, out.error))
        for res in results:
            if res.status == "cached":
                stats.cache_hits += 1
            elif res.status == "failed":
                stats.failures += 1
            elif res.status == "unparseable":
                stats.unparseable += 1
            elif res.status == "skipped_budget":
                stats.skipped_budget += 1
        scores = [r.score for r in results if r.score is not None]
        stats.scored = len(scores)
        stats.mean_score = round(sum(scores) / len(scores), 6) if scores else None
        summary = self._redact(json.dumps(stats.to_dict()))
        log.info("judge %s/%s: %s", cfg.provider, cfg.model, summary)
        return results, stats

    def close(self) -> None:
        self.cache.close()
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> Judge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one item -----------------------------------------------------------------------------
    def _score_one(self, key: str, item: JudgeItem, prompt: str, budget: _Budget) -> _Outcome:
        cfg = self.config
        if cfg.provider == "reference":
            if not budget.acquire(retry=False):
                return _Outcome("skipped_budget")
            score, reason = reference_score(item)
            self._remember(key, score, reason)
            return _Outcome("scored", score, reason)

        rng = random.Random(f"{cfg.seed}:{key}")  # per item: jitter independent of scheduling
        attempt = 0
        while True:
            if not budget.acquire(retry=attempt > 0):
                return _Outcome("skipped_budget")
            try:
                content = self._request(prompt)
            except _Retryable as err:
                if attempt >= cfg.max_retries:
                    log.warning("judge item %s: giving up after %d attempt(s): %s", item.id, attempt + 1, err)
                    return _Outcome("failed", error=str(err))
                delay = self._backoff(attempt, err.retry_after, rng)
                log.info("judge item %s: %s; retry %d in %.2fs", item.id, err, attempt + 1, delay)
                time.sleep(delay)
                attempt += 1
                continue
            except _Unparseable as err:
                log.warning("judge item %s: unparseable answer: %s", item.id, err)
                return _Outcome("unparseable", error=str(err))
            except Exception as err:  # non-retryable (4xx, client misuse): fail this item only
                message = self._describe(err)
                log.warning("judge item %s: failed: %s", item.id, message)
                return _Outcome("failed", error=message)
            parsed = parse_judge_answer(content)
            if parsed is None:
                snippet = self._redact((content or "")[:80])
                log.warning("judge item %s: unparseable answer %r", item.id, snippet)
                return _Outcome("unparseable", error=f"no valid score in answer: {snippet!r}")
            score, reason = parsed
            self._remember(key, score, reason)
            return _Outcome("scored", score, reason)

    def _backoff(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        cfg = self.config
        if retry_after is not None and retry_after > 0:
            return min(retry_after, cfg.backoff_max_s)  # the server said when; we cap the wait
        delay = min(cfg.backoff_max_s, cfg.backoff_base_s * (2**attempt))
        return delay * (0.5 + 0.5 * rng.random())  # jitter: spread out synchronized retries

    def _remember(self, key: str, score: float, reason: str) -> None:
        cfg = self.config
        self.cache.put(
            {
                "v": CACHE_VERSION,
                "key": key,
                "provider": cfg.provider,
                "model": cfg.model,
                "score": score,
                "reason": self._redact(reason),
            }
        )

    # -- HTTP ---------------------------------------------------------------------------------
    def _api_key(self) -> str | None:
        return os.environ.get(self.config.api_key_env) or None

    def _redact(self, text: str) -> str:
        key = self._api_key()
        return text.replace(key, "***") if key and key != PLACEHOLDER_API_KEY else text

    def _describe(self, err: BaseException) -> str:
        status = getattr(err, "status_code", None)
        where = f" (HTTP {status})" if status is not None else ""
        message = getattr(err, "message", None) or str(err)
        return self._redact(f"{type(err).__name__}{where}: {message}"[:300])

    def _get_client(self) -> Any:
        with self._client_lock:
            if self._client is None:
                import openai  # imported here: the reference provider must not need it

                self._client = openai.OpenAI(
                    base_url=self.config.base_url,
                    api_key=self._api_key() or PLACEHOLDER_API_KEY,
                    timeout=self.config.timeout_s,
                    max_retries=0,  # we retry ourselves, with our counting and budget
                )
            return self._client

    def _request(self, prompt: str) -> str | None:
        """One HTTP call; raises _Retryable / _Unparseable, or the client's own error."""
        import openai

        cfg = self.config
        client = self._get_client()
        try:
            response = client.chat.completions.create(
                model=cfg.model,
                messages=[
                    {"role": "system", "content": JUDGE_SYSTEM},
                    {"role": "user", "content": prompt},
                ],
                temperature=cfg.temperature,
                max_tokens=cfg.max_tokens,
            )
        except openai.APIStatusError as err:
            if err.status_code == 429:
                raise _Retryable(self._describe(err), _retry_after(err.response.headers)) from None
            if err.status_code >= 500:
                raise _Retryable(self._describe(err)) from None
            raise
        except openai.APIConnectionError as err:  # includes APITimeoutError
            raise _Retryable(self._describe(err)) from None
        except ValueError as err:  # the HTTP body was not JSON
            raise _Unparseable(self._describe(err)) from None
        choices = getattr(response, "choices", None)
        if not choices:
            raise _Unparseable("response has no choices")
        return choices[0].message.content


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from ``retry-after-ms`` / ``retry-after`` (delta-seconds form only)."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue  # an HTTP-date: fall back to our own backoff
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
    return None


def score_all(
    items: Iterable[JudgeItem | Mapping[str, Any]], config: JudgeConfig | None = None
) -> tuple[list[JudgeResult], JudgeStats]:
    """Score ``items`` with a fresh :class:`Judge` (cache loaded from ``config.cache_path``)."""
    with Judge(config or JudgeConfig()) as judge:
        return judge.score_all(items)
