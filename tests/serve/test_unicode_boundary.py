"""Text at the boundary: whatever Unicode a user sends (lone surrogates, control characters, RTL
marks, zero-width joiners, emoji, 4-byte CJK) gets a grounded extraction or a clear error naming
the field, never a traceback or a 500. The tiny model decodes for real; servers run on 127.0.0.1.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from chatuie.cli import app
from chatuie.data.prompts import ie_user_prompt
from chatuie.data.records import Schema
from chatuie.data.schema import ExtractionSchema, SchemaError
from chatuie.errors import ExtractError
from chatuie.models.modeling import load_saved
from chatuie.serve.extractor import Extractor, ExtractSettings
from chatuie.serve.file_jobs import read_inputs
from chatuie.serve.server import BackgroundServer, create_app
from chatuie.serve.settings import ServerSettings
from tests.helpers.tiny_extractor import EN_TEXT, ZH_TEXT, tiny_model_dir

NAME = "tiny-chatuie"
runner = CliRunner()

SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff", "\udcff"]
POOLS: dict[str, list[str]] = {
    "ascii": list(string.ascii_letters + string.digits + " .,;:!?'\"\\/{}[]"),
    "words": ["John Smith", "IBM", "Boston", " works for ", "张三", "北京", "中信证券", "\n"],
    "control": [chr(c) for c in [*range(32), 0x7F, 0x85, 0x9F]],
    "bidi": list("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u061c"),
    "zero_width": list("\u200b\u200c\u200d\u2060\ufeff"),
    "emoji": ["😀", "👨\u200d👩\u200d👧", "🇨🇳", "👍🏽", "❤\ufe0f", "🧑🏿\u200d🚀"],
    "cjk_4byte": [chr(c) for c in (0x20000, 0x2A6D6, 0x2B740, 0x2F800, 0x30000)],
    "other": ["\u2028", "\u2029", "\ufffd", "\uffff", "\ufffe", "\U0010ffff", "e\u0301", "\ue000", "İ"],
}


def unencodable(value: str) -> bool:
    """True for a string with no UTF-8 form (an unpaired surrogate): what no tokenizer encodes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def fuzz_string(rng: random.Random, size: int, surrogate: bool) -> str:
    parts = [rng.choice(POOLS[rng.choice(list(POOLS))]) for _ in range(rng.randint(1, size))]
    if surrogate:
        parts.insert(rng.randint(0, len(parts)), rng.choice(SURROGATES))
    return "".join(parts)


def fuzz_case(rng: random.Random) -> tuple[str, dict[str, Any]]:
    """(text, schema dict); about a third carry a lone surrogate in the text or a label."""
    where = rng.choice(["text", "label", None, None, None, None])
    text = fuzz_string(rng, 24, where == "text")
    labels = [fuzz_string(rng, 3, False).strip() or "X" for _ in range(rng.randint(1, 3))]
    if where == "label":
        labels[rng.randrange(len(labels))] += rng.choice(SURROGATES)
    if rng.random() < 0.3:
        return text, {"events": {labels[0]: labels[1:] or ["role"]}}
    return text, {"entities": labels}


def assert_grounded(text: str, result: dict[str, Any], case: Any) -> None:
    spans = list(result["entities"])
    for r in result["relations"]:
        spans += [r["head"], r["tail"]]
    for e in result["events"]:
        spans += [e["trigger"], *e["arguments"]]
    for span in spans:
        assert text[span["start"] : span["end"]] == span["text"], case


def assert_clear(message: str, fields: tuple[str, ...], case: Any) -> None:
    """A clear error: names a field, is sendable text, carries no exception or traceback."""
    assert message.startswith(fields), (message, case)
    assert not unencodable(message), (message, case)
    for internal in ("Traceback", "TypeError", "TextEncodeInput", "internal error"):
        assert internal not in message, (message, case)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def extractor(model_dir: Path) -> Extractor:
    model, tokenizer = load_saved(model_dir)
    return Extractor(model, tokenizer, ExtractSettings(max_new_tokens=12, batch_size=16), name=NAME)


@pytest.fixture(scope="module")
def server(extractor: Extractor) -> Iterator[str]:
    settings = ServerSettings(model_name=NAME, batch_window_ms=50, max_batch_size=8, max_chat_tokens=4)
    with BackgroundServer(create_app(extractor, settings)) as url:
        yield url


def post(url: str, path: str, payload: Any) -> tuple[int, Any]:
    # json.dumps escapes a lone surrogate as \ud800: valid JSON, as a client would send it.
    response = httpx.post(f"{url}{path}", content=json.dumps(payload).encode(), timeout=60)
    return response.status_code, response.json()


# ----------------------------------------------------------------------------------------------
# the named cases


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"text": "John\ud800 works", "schema": {"entities": ["Peop"]}}, "text: unpaired surrogate U+D800"),
        (
            {"text": EN_TEXT, "schema": {"entities": ["Peop", "Org\udfff"]}},
            "schema.entities[1]: label has an unpaired surrogate U+DFFF",
        ),
        (
            {"text": EN_TEXT, "schema": {"events": {"E\ud800": ["r"]}}},
            "schema.events.E\\ud800: label has an unpaired surrogate U+D800",
        ),
        (
            {"text": EN_TEXT, "schema": {"entities": ["A"], "relations": {"R\udc00": None}}},
            "schema.relations.R\\udc00: label has an unpaired surrogate U+DC00",
        ),
    ],
)
def test_server_extract_refuses_unencodable_text_with_400(server: str, payload: Any, message: str) -> None:
    status, body = post(server, "/v1/extract", payload)
    assert status == 400, body
    assert body["error"]["message"].startswith(message), body
    assert_clear(body["error"]["message"], ("text", "schema"), payload)


def test_server_chat_refuses_unencodable_content_with_400(server: str) -> None:
    for messages, field in (
        ([{"role": "user", "content": "hi \ud800"}], "messages[0].content: unpaired surrogate U+D800"),
        (
            [
                {"role": "system", "content": "ok"},
                {"role": "user", "content": [{"type": "text", "text": "\udfff"}]},
            ],
            "messages[1].content[0].text: unpaired surrogate U+DFFF",
        ),
        (
            [{"role": "user", "content": ie_user_prompt("ner", "John\udc80", Schema(entities=["Peop"]))}],
            "messages[0].content: unpaired surrogate U+DC80",
        ),
    ):
        status, body = post(server, "/v1/chat/completions", {"model": NAME, "messages": messages})
        assert status == 400, body
        assert body["error"]["message"].startswith(field), body
        assert_clear(body["error"]["message"], ("messages",), messages)
    # Still answering.
    assert post(server, "/v1/extract", {"text": EN_TEXT, "schema": {"entities": ["Peop"]}})[0] == 200


def test_api_refuses_unencodable_text_and_labels(extractor: Extractor) -> None:
    with pytest.raises(SchemaError, match=r"schema\.entities\[0\]: label has an unpaired surrogate U\+D800"):
        ExtractionSchema.from_dict({"entities": ["\ud800"]})
    schema = ExtractionSchema.from_dict({"entities": ["Peop"]})
    with pytest.raises(ExtractError, match="document 1: text: unpaired surrogate U\\+DBFF at character 2"):
        extractor.extract_many([(EN_TEXT, schema), ("ab\udbffc", schema)])
    built = ExtractionSchema(entities=["Peop\ud800"])  # built in code, past from_dict's checks
    with pytest.raises(ExtractError, match=r"document 0: schema: label 'Peop\\ud800': unpaired surrogate"):
        extractor.extract(EN_TEXT, built)


def test_cli_refuses_unencodable_input_before_writing(model_dir: Path, tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text('{"entities": ["Peop", "Org"]}', encoding="utf-8")
    source = tmp_path / "in.jsonl"
    lines = [
        {"id": "a", "text": EN_TEXT},
        {"id": "b", "text": "bad \ud800 text"},
        {"id": "c", "text": ZH_TEXT},
    ]
    source.write_text("".join(json.dumps(row) + "\n" for row in lines), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    args = ["extract", "-s", str(schema), "-m", str(model_dir), "-i", str(source), "-o", str(out)]
    result = runner.invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert f"error: {source}:2: field 'text': unpaired surrogate U+D800 at character 4" in result.stderr
    assert not out.exists(), "nothing written, not even an empty file"

    source.write_text('{"id": "\\udfff", "text": "fine"}\n', encoding="utf-8")  # ids are written back
    with pytest.raises(ExtractError, match=r"in\.jsonl:1: field 'id': unpaired surrogate U\+DFFF"):
        read_inputs(source)

    schema.write_text('{"entities": ["Peop", "\\ud800"]}', encoding="utf-8")
    result = runner.invoke(app, ["extract", "-s", str(schema), "-m", str(model_dir), "text"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert "schema.json.entities[1]: label has an unpaired surrogate U+D800" in result.stderr

    schema.write_text('{"entities": ["Peop"]}', encoding="utf-8")
    # An argument's undecodable byte (0xff) reaches Python as the surrogate U+DCFF.
    result = runner.invoke(app, ["extract", "-s", str(schema), "-m", str(model_dir), "John \udcff"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert "error: TEXT: unpaired surrogate U+DCFF at character 5" in result.stderr


# ----------------------------------------------------------------------------------------------
# fuzzing the boundary (seeded, a few seconds)


def test_fuzzed_unicode_gets_grounded_spans_or_a_clear_error(extractor: Extractor, server: str) -> None:
    rng = random.Random(37)
    cases = [fuzz_case(rng) for _ in range(48)]
    assert sum(unencodable(t) for t, _ in cases) >= 5
    assert sum(unencodable(json.dumps(s, ensure_ascii=False)) for _, s in cases) >= 3

    # The Python API: a schema error or a document error names what is wrong; the rest decode
    # together (document errors are raised before anything is decoded).
    docs: list[tuple[int, str, ExtractionSchema]] = []
    for index, (text, data) in enumerate(cases):
        try:
            docs.append((index, text, ExtractionSchema.from_dict(data)))
        except SchemaError as err:
            assert_clear(str(err), ("schema",), data)
    decoded = 0
    while docs:
        try:
            results = extractor.extract_many([(text, schema) for _, text, schema in docs])
        except ExtractError as err:
            assert_clear(str(err), ("document",), docs)
            bad = int(str(err).split(":")[0].removeprefix("document "))
            assert not docs[bad][1].strip() or unencodable(docs[bad][1]), (str(err), docs[bad])
            del docs[bad]
            continue
        for (index, text, _), result in zip(docs, results, strict=True):
            assert_grounded(text, result, cases[index])
            decoded += 1
        break
    assert decoded >= len(cases) // 3

    # The server, concurrently (so requests batch): 200 with grounded spans, or a clear 400.
    def ask(case: tuple[str, dict[str, Any]]) -> tuple[int, Any]:
        return post(server, "/v1/extract", {"text": case[0], "schema": case[1]})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, cases))
    statuses = [status for status, _ in answers]
    assert statuses.count(200) >= len(cases) // 3 and statuses.count(400) >= 5, statuses
    for case, (status, body) in zip(cases, answers, strict=True):
        assert status in (200, 400), (status, body, case)
        if status == 200:
            assert_grounded(case[0], body, case)
        else:
            assert_clear(body["error"]["message"], ("text", "schema"), case)
        if unencodable(case[0]):
            assert status == 400 and body["error"]["message"].startswith("text: unpaired surrogate"), body

    # Chat completions: free text and IE instructions (decoded under the constraint).
    for text, data in cases[:12]:
        labels = data.get("entities") or list(data["events"])
        content = ie_user_prompt("ner", text, Schema(entities=labels)) if rng.random() < 0.5 else text
        status, body = post(
            server,
            "/v1/chat/completions",
            {"model": NAME, "messages": [{"role": "user", "content": content}]},
        )
        assert status in (200, 400), (status, body, content)
        if status == 400:
            assert_clear(body["error"]["message"], ("messages",), content)
            assert unencodable(content), body
        else:
            assert not unencodable(body["choices"][0]["message"]["content"])
