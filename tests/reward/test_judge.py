"""Judge tests: the real ``openai`` client over HTTP against a local fake server."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatuie.config import ConfigError, build
from chatuie.data.answers import flatten_answer
from chatuie.data.records import Entity, Record, Schema
from chatuie.reward import judge_cache
from chatuie.reward.judge import Judge, reference_score, score_all
from chatuie.reward.judge_cache import JudgeCache, cache_key
from chatuie.reward.judge_prompt import build_prompt, parse_judge_answer
from chatuie.reward.judge_types import JudgeConfig, JudgeItem
from tests.helpers.judge_server import JudgeServer, expected_score, prompt_hash

KEY_ENV = "CHATUIE_TEST_JUDGE_KEY"
SECRET = "sk-test-S3CRET-9f8e7d6c5b4a"
PYTHON = sys.executable


@pytest.fixture
def server() -> Iterator[JudgeServer]:
    with JudgeServer() as srv:
        yield srv


@pytest.fixture(autouse=True)
def _api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)


def make_config(server: JudgeServer, tmp_path: Path, **overrides: Any) -> JudgeConfig:
    params: dict[str, Any] = {
        "provider": "openai",
        "base_url": server.url,
        "model": "judge-test",
        "api_key_env": KEY_ENV,
        "max_concurrency": 4,
        "max_retries": 3,
        "timeout_s": 5.0,
        "backoff_base_s": 0.01,  # tests must be fast; the policy is the same
        "backoff_max_s": 0.05,
        "cache_path": str(tmp_path / "judge_cache.jsonl"),
    }
    params.update(overrides)
    return JudgeConfig(**params)


def make_items(n: int, start: int = 0) -> list[JudgeItem]:
    items = []
    for i in range(start, start + n):
        text = f"张三{i}在北京{i}号工作。"
        items.append(
            JudgeItem(
                id=f"doc-{i}",
                task="ner",
                text=text,
                candidate=json.dumps({"PER": [f"张三{i}"], "LOC": []}, ensure_ascii=False),
                schema={"entities": ["PER", "LOC"], "relations": [], "events": {}},
                instruction="Extract PER and LOC entities.",
            )
        )
    return items


def expected(item: JudgeItem) -> int:
    return expected_score(build_prompt(item))


def cache_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


# ---------------------------------------------------------------------------------------------
# happy path and cache
# ---------------------------------------------------------------------------------------------
def test_happy_path_then_rerun_is_all_cache(server: JudgeServer, tmp_path: Path) -> None:
    cfg = make_config(server, tmp_path)
    items = make_items(8)
    results, stats = score_all(items, cfg)
    assert [r.id for r in results] == [it.id for it in items]  # input order, despite threads
    assert [r.score for r in results] == [expected(it) for it in items]
    assert all(r.status == "scored" and not r.cached for r in results)
    assert stats.calls_made == 8 == server.completion_requests
    assert stats.cache_hits == 0 and stats.retries == 0 and stats.failures == 0
    assert stats.mean_score == pytest.approx(sum(expected(it) for it in items) / 8)
    assert len(cache_lines(Path(cfg.cache_path))) == 8

    results2, stats2 = score_all(items, cfg)
    assert server.completion_requests == 8  # not one more request
    assert stats2.calls_made == 0 and stats2.cache_hits == 8
    assert all(r.cached and r.status == "cached" for r in results2)
    assert [r.score for r in results2] == [r.score for r in results]
    assert stats2.mean_score == stats.mean_score


def test_duplicate_prompts_are_asked_once(server: JudgeServer, tmp_path: Path) -> None:
    item = make_items(1)[0]
    twin = JudgeItem(**{**item.__dict__, "id": "twin"})
    results, stats = score_all([item, twin], make_config(server, tmp_path))
    assert server.completion_requests == 1 and stats.calls_made == 1
    assert [r.cached for r in results] == [False, True]
    assert results[0].score == results[1].score == expected(item)


def test_fenced_answer_with_prose_is_parsed(tmp_path: Path) -> None:
    with JudgeServer(fence=True) as srv:
        items = make_items(3)
        results, stats = score_all(items, make_config(srv, tmp_path))
    assert stats.unparseable == 0
    assert [r.score for r in results] == [expected(it) for it in items]


# ---------------------------------------------------------------------------------------------
# retries
# ---------------------------------------------------------------------------------------------
def test_429_is_retried_and_retry_after_honoured(server: JudgeServer, tmp_path: Path) -> None:
    cfg = make_config(server, tmp_path, max_concurrency=1, backoff_max_s=1.0)
    server.fail_next("429", 2, retry_after=0.3)
    item = make_items(1)[0]
    t0 = time.monotonic()
    results, stats = score_all([item], cfg)
    elapsed = time.monotonic() - t0
    assert results[0].status == "scored" and results[0].score == expected(item)
    assert stats.retries == 2 and stats.calls_made == 3 == server.completion_requests
    assert elapsed >= 0.55  # two honoured Retry-After waits of 0.3 s (not the 0.01 s backoff)


def test_retry_after_is_capped(server: JudgeServer, tmp_path: Path) -> None:
    cfg = make_config(server, tmp_path, max_concurrency=1, backoff_max_s=0.1)
    server.fail_next("429", 1, retry_after=3600)
    t0 = time.monotonic()
    results, stats = score_all(make_items(1), cfg)
    assert time.monotonic() - t0 < 60.0  # far below the 3600 s asked for: the cap held
    assert results[0].status == "scored" and stats.retries == 1


def test_500_is_retried(server: JudgeServer, tmp_path: Path) -> None:
    server.fail_next("500", 2)
    item = make_items(1)[0]
    results, stats = score_all([item], make_config(server, tmp_path))
    assert results[0].score == expected(item)
    assert stats.retries == 2 and stats.calls_made == 3 and stats.failures == 0


def test_timeout_is_retried(server: JudgeServer, tmp_path: Path) -> None:
    cfg = make_config(server, tmp_path, timeout_s=0.5, max_concurrency=1)
    # the slow answer takes 30 s: finishing well before it proves the client gave up at its
    # timeout, with room for a loaded CI machine (a tight bound failed beside a busy repro)
    server.fail_next("slow", 1, slow_s=30.0)
    item = make_items(1)[0]
    t0 = time.monotonic()
    results, stats = score_all([item], cfg)
    elapsed = time.monotonic() - t0
    assert results[0].status == "scored" and results[0].score == expected(item)
    assert stats.retries == 1 and stats.calls_made == 2 == server.completion_requests
    assert 0.5 <= elapsed < 15.0  # waited for the timeout, not for the slow answer


def test_broken_connection_is_retried(server: JudgeServer, tmp_path: Path) -> None:
    server.fail_next("truncated", 1)
    item = make_items(1)[0]
    results, stats = score_all([item], make_config(server, tmp_path))
    assert results[0].score == expected(item) and stats.retries == 1


def test_retries_exhausted_is_a_failure(server: JudgeServer, tmp_path: Path) -> None:
    server.fail_next("500", 10)
    cfg = make_config(server, tmp_path, max_retries=2, max_concurrency=1)
    items = make_items(1)
    results, stats = score_all(items, cfg)
    assert results[0].status == "failed" and results[0].score is None
    assert "500" in (results[0].error or "")
    assert stats.failures == 1 and stats.calls_made == 3 == server.completion_requests
    assert cache_lines(Path(cfg.cache_path)) == []


def test_400_is_not_retried(server: JudgeServer, tmp_path: Path) -> None:
    server.fail_next("400", 1)
    items = make_items(3)
    cfg = make_config(server, tmp_path, max_concurrency=1)
    results, stats = score_all(items, cfg)
    assert [r.status for r in results] == ["failed", "scored", "scored"]
    assert "400" in (results[0].error or "")
    assert stats.failures == 1 and stats.retries == 0
    assert stats.calls_made == 3 == server.completion_requests


# ---------------------------------------------------------------------------------------------
# unparseable answers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["garbage", "badbody"])
def test_garbage_is_unparseable_skipped_and_not_cached(
    server: JudgeServer, tmp_path: Path, fault: str
) -> None:
    cfg = make_config(server, tmp_path, max_concurrency=1)
    server.fail_next(fault, 1)
    items = make_items(3)
    results, stats = score_all(items, cfg)
    assert [r.status for r in results] == ["unparseable", "scored", "scored"]
    assert results[0].score is None
    assert stats.unparseable == 1 and stats.retries == 0 and stats.calls_made == 3
    assert stats.mean_score == pytest.approx((expected(items[1]) + expected(items[2])) / 2)
    assert len(cache_lines(Path(cfg.cache_path))) == 2

    # The garbage answer was not cached, so the next run asks again (and only that).
    results2, stats2 = score_all(items, cfg)
    assert stats2.calls_made == 1 and stats2.cache_hits == 2 and stats2.unparseable == 0
    assert results2[0].score == expected(items[0])


@pytest.mark.parametrize(
    ("content", "score"),
    [
        ('{"score": 7, "reason": "ok"}', 7.0),
        ('Sure!\n```json\n{"score": 3.5, "reason": "meh"}\n```\nbye', 3.5),
        ('My verdict: {"reason": "fine", "score": "9"} -- done', 9.0),
        ('{"note": {"x": 1}} then {"score": 0, "reason": "bad"}', 0.0),
        ('{"score": 11, "reason": "too high"}', None),
        ('{"score": -1}', None),
        ('{"score": true}', None),
        ('{"score": "high"}', None),
        ('{"reason": "no score"}', None),
        ("no json at all", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_judge_answer(content: str | None, score: float | None) -> None:
    parsed = parse_judge_answer(content)
    assert (parsed[0] if parsed else None) == score


# ---------------------------------------------------------------------------------------------
# budget
# ---------------------------------------------------------------------------------------------
def test_budget_is_never_exceeded(server: JudgeServer, tmp_path: Path) -> None:
    server.fail_next("500", 2)  # retries spend budget too
    cfg = make_config(server, tmp_path, max_requests=5, max_concurrency=1)
    results, stats = score_all(make_items(10), cfg)
    assert server.completion_requests == stats.calls_made == 5
    assert stats.retries == 2 and stats.scored == 3 and stats.skipped_budget == 7
    assert [r.status for r in results] == ["scored"] * 3 + ["skipped_budget"] * 7
    assert all(r.score is None for r in results[3:])


def test_budget_holds_under_concurrency(server: JudgeServer, tmp_path: Path) -> None:
    server.delay_s = 0.05  # keep several requests in flight together
    server.fail_next("500", 3)
    cfg = make_config(server, tmp_path, max_requests=6, max_concurrency=4)
    results, stats = score_all(make_items(12), cfg)
    assert server.completion_requests == stats.calls_made == 6
    # Whatever the interleaving: 3 of the 6 answers were faults, so exactly 3 items got scored;
    # the others (including any caught mid-retry when the budget ran out) are skipped.
    assert server.faults_served["500"] == 3 and stats.retries <= 3
    assert stats.scored == 3 and stats.skipped_budget == 9 and stats.failures == 0
    assert all((r.score is None) == (r.status == "skipped_budget") for r in results)


def test_zero_budget_makes_no_call(server: JudgeServer, tmp_path: Path) -> None:
    results, stats = score_all(make_items(3), make_config(server, tmp_path, max_requests=0))
    assert server.requests_total == 0 and stats.skipped_budget == 3 and stats.mean_score is None


# ---------------------------------------------------------------------------------------------
# crash safety
# ---------------------------------------------------------------------------------------------
_CHILD = """
import json, sys
from chatuie.reward.judge import score_all
from chatuie.reward.judge_types import JudgeConfig, JudgeItem
from chatuie.config import build
cfg = build(JudgeConfig, json.load(open(sys.argv[1])), "judge")
items = [JudgeItem.from_dict(d) for d in json.load(open(sys.argv[2]))]
score_all(items, cfg)
"""


def test_kill_9_mid_run_then_rerun_repeats_nothing(server: JudgeServer, tmp_path: Path) -> None:
    n, concurrency = 16, 2
    server.delay_s = 0.25  # every answer takes a while, so the run is mid-flight when killed
    cfg = make_config(server, tmp_path, max_concurrency=concurrency)
    items = make_items(n)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "items.json").write_text(json.dumps([it.__dict__ for it in items]))
    cache = Path(cfg.cache_path)

    proc = subprocess.Popen(
        [PYTHON, "-c", _CHILD, str(tmp_path / "cfg.json"), str(tmp_path / "items.json")], env=dict(os.environ)
    )
    try:
        deadline = time.monotonic() + 30
        while len(cache_lines(cache)) < 4:
            assert proc.poll() is None, "child finished before it could be killed"
            assert time.monotonic() < deadline, "child made no progress"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    time.sleep(server.delay_s + 0.2)  # let in-flight handlers finish counting their answers
    before = server.stats()["answered"]

    loaded = JudgeCache(cache)
    prompt_of_key = {cache_key(cfg, build_prompt(it)): build_prompt(it) for it in items}
    cached_prompts = {prompt_of_key[k] for k in loaded.entries}
    assert 4 <= len(cached_prompts) < n

    server.delay_s = 0.0
    results, stats = score_all(items, cfg)
    after = server.stats()["answered"]

    assert all(r.score == expected(it) for r, it in zip(results, items, strict=True))
    assert stats.cache_hits == len(cached_prompts) and stats.calls_made == n - len(cached_prompts)
    # Every prompt cached before the rerun got zero calls in the rerun.
    for prompt in cached_prompts:
        h = prompt_hash(prompt)
        assert after.get(h, 0) == before.get(h, 0), "a cached prompt was asked again"
    # Every prompt was answered; at most the requests in flight at the kill were answered twice.
    assert set(after) == {prompt_hash(build_prompt(it)) for it in items}
    twice = [h for h, count in after.items() if count > 1]
    assert all(after[h] == 2 for h in twice)
    assert len(twice) <= concurrency
    assert sum(after.values()) == n + len(twice)


def test_corrupt_cache_lines_are_ignored(server: JudgeServer, tmp_path: Path) -> None:
    cfg = make_config(server, tmp_path)
    items = make_items(3)
    score_all(items, cfg)
    cache = Path(cfg.cache_path)
    good = cache_lines(cache)
    # A torn last line, as left by kill -9 in the middle of a write (no trailing newline).
    with open(cache, "a", encoding="utf-8") as handle:
        handle.write(good[0][: len(good[0]) // 2])

    more = make_items(2, start=3)
    results, stats = score_all(items + more, cfg)
    assert stats.cache_corrupt_lines == 1
    assert stats.cache_hits == 3 and stats.calls_made == 2
    assert [r.score for r in results] == [expected(it) for it in items + more]

    # The new lines did not get glued onto the torn one: all five entries load.
    reloaded = JudgeCache(cache)
    assert reloaded.corrupt_lines == 1 and len(reloaded.entries) == 5
    _, stats3 = score_all(items + more, cfg)
    assert stats3.calls_made == 0 and stats3.cache_hits == 5


def test_cache_line_format(server: JudgeServer, tmp_path: Path) -> None:
    cfg = make_config(server, tmp_path)
    item = make_items(1)[0]
    score_all([item], cfg)
    (line,) = cache_lines(Path(cfg.cache_path))
    entry = json.loads(line)
    assert entry["key"] == cache_key(cfg, build_prompt(item))
    assert entry["score"] == expected(item) and entry["model"] == "judge-test"
    assert entry["provider"] == "openai" and entry["v"] == 1
    # The key depends on the endpoint and model: another judge must not reuse these scores.
    other = JudgeConfig(**{**cfg.to_dict(), "model": "other-judge"})
    assert cache_key(other, build_prompt(item)) != entry["key"]


# ---------------------------------------------------------------------------------------------
# the API key
# ---------------------------------------------------------------------------------------------
def test_api_key_is_sent_but_never_written(
    server: JudgeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cfg = make_config(server, tmp_path, max_concurrency=1)
    server.fail_next("401", 1)  # echoes the key in its error message, like real servers
    server.fail_next("garbage", 1)
    server.fail_next("500", 1)
    results, stats = score_all(make_items(4), cfg)
    assert [r.status for r in results] == ["failed", "unparseable", "scored", "scored"]
    assert stats.retries == 1

    assert server.auth_headers and all(h == f"Bearer {SECRET}" for h in server.auth_headers)
    assert SECRET not in (results[0].error or "") and "***" in (results[0].error or "")
    assert SECRET not in caplog.text
    assert SECRET not in json.dumps([r.to_dict() for r in results])
    assert SECRET not in json.dumps(stats.to_dict()) and SECRET not in json.dumps(cfg.to_dict())
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written, "the judge wrote nothing?"
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path


def test_missing_key_uses_placeholder(
    server: JudgeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV)
    results, _ = score_all(make_items(1), make_config(server, tmp_path))
    assert results[0].status == "scored"
    assert server.auth_headers == ["Bearer EMPTY"]


# ---------------------------------------------------------------------------------------------
# reference provider
# ---------------------------------------------------------------------------------------------
NER_SCHEMA = {"entities": ["PER", "LOC"], "relations": [], "events": {}}
NER_GOLD = '{"PER":["张三","李四"],"LOC":["北京"]}'


def ref_item(candidate: str, gold: str = NER_GOLD, task: str = "ner", **kw: Any) -> JudgeItem:
    return JudgeItem(
        id=kw.get("id", "r"),
        task=task,
        text="张三和李四在北京。",
        candidate=candidate,
        schema=kw.get("schema", NER_SCHEMA),
        gold=gold,
    )


def test_reference_scores_by_f1() -> None:
    assert reference_score(ref_item(NER_GOLD))[0] == 10.0
    assert reference_score(ref_item('{"PER":[],"LOC":[]}'))[0] == 0.0
    assert reference_score(ref_item("not json"))[0] == 0.0
    # 2 of 3 gold found, nothing wrong: P=1, R=2/3, F1=0.8
    assert reference_score(ref_item('{"PER":["张三"],"LOC":["北京"]}'))[0] == pytest.approx(8.0)
    # right span, wrong label: no credit for it
    assert reference_score(ref_item('{"PER":["北京"],"LOC":[]}'))[0] == 0.0
    # nothing to find, nothing found: perfect
    assert reference_score(ref_item('{"PER":[],"LOC":[]}', gold='{"PER":[],"LOC":[]}'))[0] == 10


def test_reference_re_and_ee_flattening() -> None:
    gold_re = (
        '{"entities":{"Peop":["John"],"Org":["IBM"]},"relations":{"Work_For":[{"head":"John","tail":"IBM"}]}}'
    )
    assert flatten_answer("re", gold_re) == {
        ("entity", "Peop", "John"),
        ("entity", "Org", "IBM"),
        ("relation", "Work_For", "John", "IBM"),
    }
    wrong_rel = gold_re.replace('"head":"John","tail":"IBM"', '"head":"IBM","tail":"John"')
    score = reference_score(ref_item(wrong_rel, gold=gold_re, task="re"))[0]
    assert 0 < score < 10  # entities right, relation reversed: F1 = 2/3
    assert score == pytest.approx(10 * 2 / 3, abs=1e-3)

    gold_ee = '{"质押":[{"trigger":"质押","arguments":{"sub-org":["东方金钰"],"date":[]}}]}'
    assert flatten_answer("ee", gold_ee) == {
        ("trigger", "质押", "质押"),
        ("argument", "质押", "sub-org", "东方金钰"),
    }
    no_args = '{"质押":[{"trigger":"质押","arguments":{"sub-org":[],"date":[]}}]}'
    assert reference_score(ref_item(no_args, gold=gold_ee, task="ee"))[0] == pytest.approx(
        10 * 2 / 3, abs=1e-3
    )


def test_reference_provider_makes_no_network_call(
    server: JudgeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_client(*_a: object, **_k: object) -> None:
        raise AssertionError("the reference judge must not build an HTTP client")

    import openai

    monkeypatch.setattr(openai, "OpenAI", no_client)
    cfg = make_config(server, tmp_path, provider="reference")
    items = [
        ref_item(NER_GOLD, id="perfect"),
        ref_item('{"PER":[],"LOC":[]}', id="empty"),
        ref_item('{"PER":["张三"],"LOC":["北京"]}', id="partial"),
    ]
    results, stats = score_all(items, cfg)
    assert [r.score for r in results] == [10.0, 0.0, pytest.approx(8.0)]
    assert stats.provider == "reference" and stats.calls_made == 3 and stats.failures == 0
    assert stats.mean_score == pytest.approx(6.0)
    assert server.requests_total == 0
    # Same cache path as the HTTP judge: a rerun is all cache hits.
    _, stats2 = score_all(items, cfg)
    assert stats2.calls_made == 0 and stats2.cache_hits == 3
    entry = json.loads(cache_lines(Path(cfg.cache_path))[0])
    assert entry["provider"] == "reference"
    assert entry["key"] == cache_key(cfg, build_prompt(items[0]), items[0].gold)


def test_reference_needs_gold() -> None:
    with pytest.raises(ValueError, match="gold"):
        score_all([ref_item(NER_GOLD, gold=None)])  # type: ignore[arg-type]


def test_item_from_record_renders_gold() -> None:
    record = Record(
        id="r1",
        dataset="d",
        split="test",
        task="ner",
        text="张三在北京。",
        schema=Schema(entities=["PER", "LOC"]),
        entities=[Entity("PER", 0, 2, "张三"), Entity("LOC", 3, 5, "北京")],
    )
    item = JudgeItem.from_record(record, candidate='{"PER":["张三"],"LOC":["北京"]}')
    assert item.gold == '{"PER":["张三"],"LOC":["北京"]}'
    assert reference_score(item)[0] == 10.0


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def test_config_rejects_unknown_keys() -> None:
    assert build(JudgeConfig, {"provider": "openai"}, "judge").provider == "openai"
    with pytest.raises(ConfigError, match=r"^judge.api_key: unknown key \(known: "):
        build(JudgeConfig, {"api_key": "sk-nope"}, "judge")
    with pytest.raises(ValueError, match="provider"):
        JudgeConfig(provider="anthropic")  # type: ignore[arg-type]


def test_judge_instance_reuses_loaded_cache(server: JudgeServer, tmp_path: Path) -> None:
    cfg = make_config(server, tmp_path)
    with Judge(cfg) as judge:
        _, s1 = judge.score_all(make_items(2))
        _, s2 = judge.score_all(make_items(3))
    assert (s1.calls_made, s2.calls_made, s2.cache_hits) == (2, 1, 2)
    assert judge_cache.CACHE_VERSION == 1
