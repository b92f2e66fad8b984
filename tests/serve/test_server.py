"""The HTTP server: the real ``openai`` client, the reward-stage judge, /v1/extract, bad input,
server-side batching. Servers run in a thread of the test process, on free 127.0.0.1 ports."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from chatuie.data.prompts import ie_user_prompt
from chatuie.data.records import Schema
from chatuie.models.modeling import load_saved
from chatuie.reward.judge import score_all
from chatuie.reward.judge_types import JudgeConfig, JudgeItem
from chatuie.serve.extractor import Extractor, ExtractSettings
from chatuie.serve.request_parsing import parse_ie_prompt
from chatuie.serve.server import BackgroundServer, create_app
from chatuie.serve.settings import ServerSettings
from tests.helpers.tiny_extractor import EN_TEXT, SCHEMA_DICT, ZH_TEXT, tiny_model_dir

KEY = "sk-local-test-7a6b5c"
KEY_ENV = "CHATUIE_TEST_SERVER_KEY"
NAME = "tiny-chatuie"


@pytest.fixture(scope="module")
def extractor(tmp_path_factory: pytest.TempPathFactory) -> Extractor:
    model, tokenizer = load_saved(tiny_model_dir(tmp_path_factory.mktemp("models")))
    return Extractor(model, tokenizer, ExtractSettings(max_new_tokens=24), name=NAME)


@pytest.fixture(scope="module")
def server(extractor: Extractor) -> Iterator[tuple[str, Any]]:
    settings = ServerSettings(
        model_name=NAME,
        api_key=KEY,
        batch_window_ms=150,  # wide, so concurrent test requests surely share a batch
        max_batch_size=8,
        max_request_bytes=4096,
        max_text_chars=1000,
        max_chat_tokens=16,
    )
    app = create_app(extractor, settings)
    with BackgroundServer(app) as url:
        yield url, app


def http(
    url: str, body: bytes | None = None, key: str | None = KEY, method: str | None = None
) -> tuple[int, Any]:
    """(status, parsed JSON body) of a plain HTTP request."""
    request = urllib.request.Request(url, data=body, method=method or ("POST" if body is not None else "GET"))
    request.add_header("Content-Type", "application/json")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def extract(url: str, payload: Any) -> tuple[int, Any]:
    return http(f"{url}/v1/extract", json.dumps(payload, ensure_ascii=False).encode())


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def test_openai_client_models_and_chat(server: tuple[str, Any]) -> None:
    url, _ = server
    api = client(url)
    assert [m.id for m in api.models.list().data] == [NAME]
    reply = api.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "中国的首都是哪里？"}], max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= 8

    # An IE instruction in the project's format is answered under the constraint.
    schema = Schema(entities=["Peop", "Org"])
    prompt = ie_user_prompt("ner", EN_TEXT, schema)
    assert parse_ie_prompt(prompt) == ("ner", EN_TEXT, schema)
    answer = api.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": prompt}], max_tokens=16
    )
    data = json.loads(answer.choices[0].message.content)
    assert set(data) <= {"Peop", "Org"}
    assert all(span in EN_TEXT for spans in data.values() for span in spans)


def test_judge_of_the_reward_stage_scores_through_the_server(
    server: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, app = server
    monkeypatch.setenv(KEY_ENV, KEY)
    before = app.state.counts["chat_completions"]
    items = [
        JudgeItem(id=f"i{i}", task="ner", text=EN_TEXT, candidate=json.dumps({"Peop": spans}))
        for i, spans in enumerate([[], ["John Smith"], ["Mary Jones"]])
    ]
    config = JudgeConfig(
        provider="openai",
        base_url=f"{url}/v1",
        model=NAME,
        api_key_env=KEY_ENV,
        max_tokens=16,
        max_retries=0,
        max_concurrency=2,
        timeout_s=60,
    )
    results, stats = score_all(items, config)
    # The tiny model's answer is no score JSON: the items come back unparseable, not failed.
    assert {r.status for r in results} <= {"scored", "unparseable"}
    assert stats.failures == 0 and stats.calls_made == 3
    assert app.state.counts["chat_completions"] - before == 3

    # A wrong key is an authentication failure the judge reports (no crash, no retry).
    monkeypatch.setenv(KEY_ENV, "wrong")
    results, stats = score_all(items[:1], config)
    assert results[0].status == "failed" and "401" in (results[0].error or "")


def test_extract_endpoint_returns_grounded_offsets(server: tuple[str, Any]) -> None:
    url, _ = server
    for text in (EN_TEXT, ZH_TEXT):
        status, body = extract(url, {"text": text, "schema": SCHEMA_DICT})
        assert status == 200, body
        assert body["model"] == NAME and body["windows"] == 1
        spans = list(body["entities"]) + [e["trigger"] for e in body["events"]]
        spans += [a for e in body["events"] for a in e["arguments"]]
        spans += [x for r in body["relations"] for x in (r["head"], r["tail"])]
        for span in spans:
            assert text[span["start"] : span["end"]] == span["text"]


def test_keys_are_checked(server: tuple[str, Any]) -> None:
    url, _ = server
    with pytest.raises(openai.AuthenticationError):
        client(url, "sk-wrong").models.list()
    status, body = http(f"{url}/v1/models", key=None)
    assert status == 401 and "API key" in body["error"]["message"]
    status, body = http(f"{url}/v1/extract", b'{"text": "x"}', key="nope")
    assert status == 401
    assert http(f"{url}/health", key=None) == (200, {"status": "ok", "model": NAME})


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        (b'{"text": "abc", "schema": ', 400, "malformed JSON"),
        (b"", 400, "request body is empty"),
        (b"\xff\xfe", 400, "not UTF-8"),
        (b"[1, 2]", 400, "expected a JSON object"),
        (json.dumps({"text": "", "schema": SCHEMA_DICT}).encode(), 400, "text: empty"),
        (json.dumps({"text": "  \n", "schema": SCHEMA_DICT}).encode(), 400, "text: empty"),
        (json.dumps({"text": 5, "schema": SCHEMA_DICT}).encode(), 400, "text: expected a string"),
        (json.dumps({"schema": SCHEMA_DICT}).encode(), 400, "text: missing"),
        (json.dumps({"text": "abc"}).encode(), 400, "schema: missing"),
        (
            json.dumps({"text": "abc", "schema": {"entity": ["PER"]}}).encode(),
            400,
            "schema: unknown key 'entity'",
        ),
        (
            json.dumps(
                {"text": "abc", "schema": {"entities": ["A"], "relations": [{"type": "R", "head": "X"}]}}
            ).encode(),
            400,
            "schema.relations[0].head: entity type 'X' is not in entities",
        ),
        (
            json.dumps({"text": "abc", "schema": {"entities": [""]}}).encode(),
            400,
            "schema.entities[0]: empty label",
        ),
        (
            json.dumps({"text": "abc", "schema": SCHEMA_DICT, "lang": "en"}).encode(),
            400,
            "unknown field 'lang'",
        ),
        (json.dumps({"text": "x" * 1001, "schema": SCHEMA_DICT}).encode(), 413, "exceed the limit of 1000"),
        (
            json.dumps({"text": "x" * 5000, "schema": SCHEMA_DICT}).encode(),
            413,
            "exceeds the limit of 4096 bytes",
        ),
    ],
)
def test_bad_extract_requests_get_clear_4xx(
    server: tuple[str, Any], payload: bytes, status: int, message: str
) -> None:
    url, _ = server
    got, body = http(f"{url}/v1/extract", payload)
    assert got == status, body
    assert message in body["error"]["message"]


def test_bad_chat_requests_and_the_server_survives(server: tuple[str, Any]) -> None:
    url, _ = server
    api = client(url)
    with pytest.raises(openai.NotFoundError, match="not found"):
        api.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="messages: expected a non-empty list"):
        api.chat.completions.create(model=NAME, messages=[])
    with pytest.raises(openai.BadRequestError, match="role"):
        api.chat.completions.create(model=NAME, messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="streaming is not supported"):
        api.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], stream=True)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        api.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], temperature=9)
    status, body = http(f"{url}/v1/chat/completions", b"{nope")
    assert status == 400 and "malformed JSON" in body["error"]["message"]
    status, body = http(f"{url}/v1/nothing", b"{}")
    assert status == 404
    status, body = http(
        f"{url}/v1/chat/completions", b'{"model":"' + NAME.encode() + b'","messages":' + b"[" * 3000
    )
    assert status == 400 and "nested too deeply" in body["error"]["message"]
    # Still answering.
    assert extract(url, {"text": EN_TEXT, "schema": {"entities": ["Peop"]}})[0] == 200


def test_chat_without_model_is_a_400_naming_the_field(server: tuple[str, Any]) -> None:
    url, _ = server
    messages = [{"role": "user", "content": "hi"}]
    status, body = http(f"{url}/v1/chat/completions", json.dumps({"messages": messages}).encode())
    assert status == 400, body
    assert body["error"]["message"] == f"model: missing (this server serves {NAME!r})"
    assert body["error"]["param"] == "model"
    status, body = http(f"{url}/v1/chat/completions", json.dumps({"model": 7, "messages": messages}).encode())
    assert status == 400 and body["error"]["message"] == "model: expected a string, got int", body
    status, body = http(
        f"{url}/v1/chat/completions", json.dumps({"model": "x", "messages": messages}).encode()
    )
    assert status == 404 and body["error"]["param"] == "model", body


def test_concurrent_extract_requests_are_decoded_together(
    server: tuple[str, Any], extractor: Extractor
) -> None:
    url, app = server
    worker = app.state.worker
    calls: list[int] = []
    original = extractor.generate_answers

    def counting(prompts: list[str], requests: list[Any], batch_size: int, progress: Any = None) -> list[str]:
        calls.append(len(prompts))
        return original(prompts, requests, batch_size, progress)

    extractor.generate_answers = counting  # type: ignore[method-assign]
    try:
        batches_before = worker.stats["batches"]
        texts = [f"{EN_TEXT} #{i}" for i in range(6)]
        results: list[tuple[int, Any]] = [(0, None)] * len(texts)
        gate = threading.Barrier(len(texts))

        def one(i: int) -> None:
            gate.wait()
            results[i] = extract(url, {"text": texts[i], "schema": {"entities": ["Peop", "Org", "Loc"]}})

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        del extractor.generate_answers
    for text, (status, body) in zip(texts, results, strict=True):
        assert status == 200, body
        for span in body["entities"]:
            assert text[span["start"] : span["end"]] == span["text"]
    batches = worker.stats["batches"] - batches_before
    assert len(calls) == batches, "one constrained_generate call per batch"
    assert batches < len(texts) and worker.stats["largest_batch"] >= 2
    assert sum(calls) == len(texts)  # one instruction per request, all decoded


def test_batching_off_decodes_one_by_one(extractor: Extractor) -> None:
    app = create_app(extractor, ServerSettings(model_name=NAME, batching=False))
    with BackgroundServer(app) as url:
        for _ in range(2):
            status, body = http(
                f"{url}/v1/extract", json.dumps({"text": ZH_TEXT, "schema": SCHEMA_DICT}).encode()
            )
            assert status == 200, body
        assert app.state.worker.stats["batches"] == 2 and app.state.worker.stats["largest_batch"] == 1


def test_lone_request_does_not_wait_for_the_window(extractor: Extractor) -> None:
    # The window is only waited while other requests are in flight: one client pays nothing.
    app = create_app(extractor, ServerSettings(model_name=NAME, batch_window_ms=20_000))
    with BackgroundServer(app) as url:
        started = time.monotonic()
        status, body = http(
            f"{url}/v1/extract", json.dumps({"text": EN_TEXT, "schema": SCHEMA_DICT}).encode()
        )
        assert status == 200, body
        assert time.monotonic() - started < 10
