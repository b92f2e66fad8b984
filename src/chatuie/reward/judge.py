"""LLM-as-a-judge scoring for the reward stage: cached, retried, budgeted, offline by default.

Two providers share one code path (cache, budget, stats), so a pipeline behaves the same with
either:

* ``reference`` (default, no network): the score is the F1 of the candidate extraction against
  the gold answer over the flattened (label, span) items of the output format, times 10.
* ``openai``: any OpenAI-compatible chat-completions endpoint through the real ``openai``
  client. The client's own retries are off; :class:`Judge` retries 429 / 5xx / timeouts /
  connection errors itself with seeded exponential backoff, and never retries other 4xx.

The config and the item / result / stats types are :mod:`chatuie.reward.judge_types`, the prompt
and the parsing of answers :mod:`chatuie.reward.judge_prompt`, the cache (a JSONL file that
survives a kill at any instant) :mod:`chatuie.reward.judge_cache`.

The API key is read from the environment variable *named* by ``JudgeConfig.api_key_env``; it is
never stored on the config, and every message this module emits is redacted against it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from chatuie.data.answers import flatten_answer
from chatuie.eval.metrics import f1_score
from chatuie.reward.judge_cache import CACHE_VERSION, JudgeCache, cache_key
from chatuie.reward.judge_prompt import JUDGE_SYSTEM, build_prompt, parse_judge_answer
from chatuie.reward.judge_types import MAX_SCORE, JudgeConfig, JudgeItem, JudgeResult, JudgeStats, Status

log = logging.getLogger(__name__)

PLACEHOLDER_API_KEY = "EMPTY"  # local OpenAI-compatible servers (vLLM, llama.cpp) ignore the key


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
