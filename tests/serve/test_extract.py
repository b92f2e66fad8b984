"""Extraction API and CLI: schema files, windows, merging, file jobs with resume, bad input."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from chatuie.cli import app
from chatuie.data.records import Argument, Entity, Event, Relation, Schema, Trigger
from chatuie.data.schema import ExtractionSchema, RelationType, SchemaError
from chatuie.decoding import constrained_generate
from chatuie.errors import ExtractError
from chatuie.models.modeling import load_saved
from chatuie.serve.extractor import Extractor, ExtractSettings
from chatuie.serve.file_jobs import extract_file, read_inputs
from chatuie.serve.model_refs import load_model_ref
from chatuie.serve.windows import Window, merge_windows, plan_windows
from tests.helpers.tiny_extractor import EN_TEXT, SCHEMA_DICT, ZH_TEXT, tiny_model_dir

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> tuple[Any, Any]:
    return load_saved(model_dir)


@pytest.fixture()
def schema_file(tmp_path: Path) -> Path:
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA_DICT, ensure_ascii=False), encoding="utf-8")
    return path


def spans_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every span object of a result (entities, relation arguments, triggers, event arguments)."""
    out = list(result["entities"])
    for r in result["relations"]:
        out += [r["head"], r["tail"]]
    for e in result["events"]:
        out += [e["trigger"], *e["arguments"]]
    return out


# ----------------------------------------------------------------------------------------------
# schema files


def test_schema_maps_to_project_tasks() -> None:
    schema = ExtractionSchema.from_dict(SCHEMA_DICT)
    assert schema.relations == [RelationType("Work_For", "Peop", "Org"), RelationType("Live_In")]
    tasks = schema.tasks()
    # Relations ask the entity block too (the re answer has both); events are a task of their own.
    assert [t for t, _ in tasks] == ["re", "ee"]
    assert tasks[0][1] == Schema(entities=["Peop", "Org", "Loc"], relations=["Work_For", "Live_In"])
    assert tasks[1][1] == Schema(events={"质押": ["质押方", "质押物", "质权方"]})
    assert [t for t, _ in ExtractionSchema.from_dict({"entities": ["人名"]}).tasks()] == ["ner"]
    # The mapping form of relations, and splitting large schemas as in training.
    mapped = ExtractionSchema.from_dict(
        {"entities": ["A"], "relations": {"r1": None, "r2": {"head": "A"}, "r3": {}}}
    )
    assert mapped.relations == [RelationType("r1"), RelationType("r2", "A"), RelationType("r3")]
    many = ExtractionSchema.from_dict({"entities": [f"E{i}" for i in range(10)]})
    assert [len(s.entities) for _, s in many.instructions(4)] == [4, 4, 2]
    assert [len(s.entities) for _, s in many.instructions(0)] == [10]
    assert ExtractionSchema.from_dict(schema.to_dict()) == schema


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"entity": ["PER"]}, "schema: unknown key 'entity'"),
        ({"relations": ["Work_For"]}, "schema.relations: relations need an 'entities' list"),
        (
            {"entities": ["Peop"], "relations": [{"type": "Work_For", "head": "Org"}]},
            "schema.relations[0].head: entity type 'Org' is not in entities",
        ),
        ({"entities": ["PER", "PER"]}, "schema.entities[1]: duplicate label 'PER'"),
        ({"entities": ["PER", ""]}, "schema.entities[1]: empty label"),
        ({"entities": "PER"}, "schema.entities: expected a list of labels"),
        ({"entities": [3]}, "schema.entities[0]: expected a string label, got 3"),
        ({"events": {"质押": "质押方"}}, "schema.events.质押: expected a list of labels"),
        ({"events": ["质押"]}, "schema.events: expected a mapping"),
        ({}, "schema: asks for nothing"),
        ([], "schema: expected a JSON object"),
    ],
)
def test_schema_errors_name_the_field(data: Any, message: str) -> None:
    with pytest.raises(SchemaError) as err:
        ExtractionSchema.from_dict(data)
    assert message in str(err.value)


def test_schema_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "entities": ["PER",]\n}', encoding="utf-8")
    with pytest.raises(SchemaError, match=r"bad\.json:2: invalid JSON"):
        ExtractionSchema.load(bad)
    with pytest.raises(SchemaError, match="cannot read schema file"):
        ExtractionSchema.load(tmp_path / "missing.json")


# ----------------------------------------------------------------------------------------------
# windows and merging


def test_plan_windows_cover_overlap_and_fit() -> None:
    text = ("张三在北京工作。John Smith works for IBM in New York. " * 12).strip()
    spans = [(i, i + 1) for i in range(len(text))]  # one token per character
    windows = plan_windows(text, spans, max_tokens=40, overlap=10)
    assert len(windows) > 5
    assert windows[0].start == 0 and windows[-1].end == len(text)
    for a, b in zip(windows, windows[1:], strict=False):
        assert b.start < a.end, "consecutive windows overlap"
        assert b.start > a.start
    assert all(w.end - w.start <= 40 for w in windows)
    # Windows end after a separator where they can (words are not cut).
    assert all(text[w.end - 1] in " 。." for w in windows[:-1])
    assert plan_windows("short", [(0, 5)], 40, 10) == [Window(0, 5)]


def test_merge_windows_shifts_offsets_and_removes_duplicates() -> None:
    text = "Alice met Bob in Paris. Bob works for Acme."
    # Window 1 = text[0:23], window 2 = text[17:] (overlap "Paris."), offsets relative to each.
    w2 = 17
    part1 = {
        "entities": [
            Entity("PER", 0, 5, "Alice"),
            Entity("PER", 10, 13, "Bob"),
            Entity("LOC", 17, 22, "Paris"),
        ],
        "relations": [],
        "events": [Event("Meet", Trigger(6, 9, "met"), (Argument("who", 0, 5, "Alice"),))],
        "dropped": 1,
    }
    bob2 = Entity("PER", 24 - w2, 27 - w2, "Bob")
    part2 = {
        "entities": [Entity("LOC", 0, 5, "Paris"), bob2, Entity("ORG", 38 - w2, 42 - w2, "Acme")],
        "relations": [Relation("Work_For", bob2, Entity("", 38 - w2, 42 - w2, "Acme"))],
        "events": [Event("Work", Trigger(28 - w2, 33 - w2, "works"), (Argument("who", 7, 10, "Bob"),))],
    }
    part1b = {  # window 1 asked another ee instruction: the same event, one more argument
        "entities": [],
        "relations": [],
        "events": [
            Event(
                "Meet", Trigger(6, 9, "met"), (Argument("who", 10, 13, "Bob"), Argument("who", 0, 5, "Alice"))
            )
        ],
    }
    part3 = {  # the same window asked another re instruction: its entity block repeats
        "entities": [bob2],
        "relations": [Relation("Work_For", bob2, Entity("ORG", 38 - w2, 42 - w2, "Acme"))],
        "events": [],
    }
    merged = merge_windows([(0, part1), (w2, part2), (w2, part3), (0, part1b)])
    assert [(e["type"], e["start"], e["end"]) for e in merged["entities"]] == [
        ("PER", 0, 5),
        ("PER", 10, 13),
        ("LOC", 17, 22),  # seen in both windows: once
        ("PER", 24, 27),
        ("ORG", 38, 42),
    ]
    for span in spans_of(merged):
        assert text[span["start"] : span["end"]] == span["text"]
    assert len(merged["relations"]) == 1
    assert merged["relations"][0]["tail"]["type"] == "ORG"  # the typed duplicate wins
    meet, work = merged["events"]
    assert meet["trigger"] == {"start": 6, "end": 9, "text": "met"}
    assert [(a["role"], a["start"]) for a in meet["arguments"]] == [("who", 0), ("who", 10)]
    assert work["trigger"] == {"start": 28, "end": 33, "text": "works"}
    assert work["arguments"] == [{"role": "who", "start": 24, "end": 27, "text": "Bob"}]
    assert merged["dropped"] == 1


class ScriptedExtractor(Extractor):
    """A model stand-in that answers every prompt with the gazetteer mentions its window holds."""

    GAZETTEER = {"Peop": ["John Smith", "Mary Jones", "张三"], "Org": ["IBM", "中信证券"], "Loc": ["Boston"]}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[int] = []
        self.batch_sizes: list[int] = []
        self.texts: list[str] = []

    def generate_answers(
        self, prompts: list[str], requests: list[Any], batch_size: int, progress: Any = None
    ) -> list[str]:
        self.calls.append(len(prompts))
        self.batch_sizes.append(batch_size)
        answers = []
        for request in requests:
            self.texts.append(request.text)
            if request.task == "ee":
                answers.append(json.dumps({k: [] for k in request.schema.events}))
                continue
            block = {
                label: [m for m in self.GAZETTEER.get(label, []) if m in request.text]
                for label in request.schema.entities
            }
            if request.task == "ner":
                answers.append(json.dumps(block, ensure_ascii=False))
                continue
            relations: dict[str, list] = {label: [] for label in request.schema.relations}
            if "Work_For" in relations and "John Smith" in request.text and "IBM" in request.text:
                relations["Work_For"].append({"head": "John Smith", "tail": "IBM"})
            answers.append(json.dumps({"entities": block, "relations": relations}, ensure_ascii=False))
        return answers


def test_long_text_offsets_stay_right_across_windows(loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    filler = "The weather was calm and nothing else happened that day. "
    text = (
        EN_TEXT
        + " "
        + filler * 6
        + "Later John Smith visited Boston again. "
        + filler * 6
        + ZH_TEXT
        + filler * 2
        + "IBM"
    )
    extractor = ScriptedExtractor(
        model, tokenizer, ExtractSettings(context_tokens=300, max_new_tokens=40, overlap_tokens=12)
    )
    schema = ExtractionSchema.from_dict(SCHEMA_DICT)
    windows = extractor.windows(text, schema)
    assert len(windows) >= 3, windows
    for w in windows:  # every prompt plus the answer budget fits the context
        for task, sub in schema.instructions(4):
            prompt = extractor.prompt(task, text[w.start : w.end], sub)
            assert len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + 40 <= 300
    result = extractor.extract(text, schema)
    assert result["windows"] == len(windows)
    expected = set()
    for label, mentions in ScriptedExtractor.GAZETTEER.items():
        for mention in mentions:
            expected |= {(label, m.start(), m.end()) for m in re.finditer(re.escape(mention), text)}
    got = [(e["type"], e["start"], e["end"]) for e in result["entities"]]
    assert len(got) == len(set(got)), "no duplicates after merging"
    assert set(got) == expected  # every mention, in whichever window, at its whole-text offset
    for span in spans_of(result):
        assert text[span["start"] : span["end"]] == span["text"]
    work_for = [(r["head"]["start"], r["tail"]["start"]) for r in result["relations"]]
    assert work_for == [(0, EN_TEXT.index("IBM"))]
    # All windows and instructions of the document go to the decoder in one call, which decodes
    # them in batches of the configured size (progress counts windows as batches finish).
    jobs = len(windows) * 2
    assert extractor.calls == [jobs]
    assert extractor.batch_sizes == [extractor.settings.batch_size]


class SampledExtractor(Extractor):
    """The real constrained decoding, sampled hot: a random tiny model then writes many spans
    (greedy, it mostly answers empty lists), which is what grounding must survive."""

    def generate_answers(
        self, prompts: list[str], requests: list[Any], batch_size: int, progress: Any = None
    ) -> list[str]:
        torch.manual_seed(0)
        return constrained_generate(
            self.model,
            self.tokenizer,
            prompts,
            requests,
            max_new_tokens=self.settings.max_new_tokens,
            batch_size=batch_size,
            do_sample=True,
            temperature=3.0,
        )


def test_end_to_end_tiny_model_spans_are_grounded(loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    texts = [" ".join([EN_TEXT, ZH_TEXT] * 6), " ".join([ZH_TEXT, EN_TEXT] * 7), ZH_TEXT]
    settings = ExtractSettings(context_tokens=320, max_new_tokens=64, batch_size=16)
    schema = ExtractionSchema.from_dict(SCHEMA_DICT)
    greedy = Extractor(model, tokenizer, settings).extract(ZH_TEXT, schema)  # the plain path runs
    assert greedy["windows"] == 1
    extractor = SampledExtractor(model, tokenizer, settings)
    results = extractor.extract_many([(text, schema) for text in texts])
    assert [r["windows"] for r in results] == [len(extractor.windows(t, schema)) for t in texts]
    assert results[0]["windows"] > 1 and results[2]["windows"] == 1
    all_spans = [(doc, span) for doc, r in zip(texts, results, strict=True) for span in spans_of(r)]
    assert len(all_spans) >= 5
    assert any(span["start"] > 300 for _, span in all_spans), "spans from a later window"
    for doc, span in all_spans:
        assert doc[span["start"] : span["end"]] == span["text"]
    for result in results:
        assert {e["type"] for e in result["entities"]} <= {"Peop", "Org", "Loc"}
        for r in result["relations"]:
            assert r["type"] in {"Work_For", "Live_In"}
            if r["type"] == "Work_For":  # declared argument types are enforced
                assert r["head"]["type"] == "Peop" and r["tail"]["type"] == "Org"


def test_context_too_small_is_a_clear_error(loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    extractor = Extractor(model, tokenizer, ExtractSettings(context_tokens=120, max_new_tokens=64))
    with pytest.raises(ExtractError, match="leaves .* tokens of the model's 120-token context"):
        extractor.extract(EN_TEXT, ExtractionSchema.from_dict(SCHEMA_DICT))


# ----------------------------------------------------------------------------------------------
# file jobs


def write_lines(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_file_job_resumes_after_interruption(loaded: tuple[Any, Any], tmp_path: Path) -> None:
    model, tokenizer = loaded
    rows = [{"id": f"doc{i}", "text": f"{EN_TEXT} ({i})"} for i in range(5)] + [{"text": ZH_TEXT}]
    source = write_lines(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    schema = ExtractionSchema.from_dict({"entities": ["Peop", "Org", "Loc"]})
    first = ScriptedExtractor(model, tokenizer, ExtractSettings(batch_size=2))
    done = extract_file(first, schema, source, out, progress=False)
    assert (done.total, done.resumed, done.written) == (6, 0, 6)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["doc0", "doc1", "doc2", "doc3", "doc4", "6"]
    complete = json.loads(lines[0])
    assert complete["text"] == rows[0]["text"] and complete["entities"][0]["text"] == "John Smith"

    # A kill after two results, the third torn mid-write.
    out.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:25], encoding="utf-8")
    second = ScriptedExtractor(model, tokenizer, ExtractSettings(batch_size=2))
    done = extract_file(second, schema, source, out, progress=False)
    assert (done.total, done.resumed, done.written) == (6, 2, 4)
    assert sum(second.calls) == 4  # only the missing documents were decoded (one instruction each)
    again = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["id"] for r in again) == sorted(["doc0", "doc1", "doc2", "doc3", "doc4", "6"])
    assert again == [json.loads(line) for line in lines[:2]] + [json.loads(line) for line in lines[2:]]

    # Nothing left to do: nothing decoded.
    third = ScriptedExtractor(model, tokenizer)
    assert extract_file(third, schema, source, out, progress=False).written == 0 and not third.calls


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{"text": "fine"}\n{"text": broken}\n', r"in\.jsonl:3: invalid JSON"),
        ('{"text": "ok"}\n{"id": "a"}\n', r"in\.jsonl:2: missing field 'text'"),
        ('{"text": 5}\n', r"in\.jsonl:1: field 'text': expected a string, got int"),
        ('{"text": "  "}\n', r"in\.jsonl:1: field 'text': empty"),
        (
            '{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n',
            r"in\.jsonl:2: field 'id': 'a' repeats line 1",
        ),
        ('["text"]\n', r"in\.jsonl:1: expected a JSON object"),
        ("\n\n", r"in\.jsonl: no input lines"),
    ],
)
def test_bad_input_names_file_line_field(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ExtractError, match=message):
        read_inputs(path)


def test_non_utf8_input_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(
        ExtractError, match=r"in\.jsonl:2: not UTF-8 text \(byte 0xe9 at byte 14 of the line\)"
    ):
        read_inputs(path)
    schema = tmp_path / "schema.json"
    schema.write_bytes(b'{\n  "entities": ["caf\xe9"]\n}')
    with pytest.raises(
        SchemaError, match=r"schema\.json:2: not UTF-8 text \(byte 0xe9 at byte 20 of the line\)"
    ):
        ExtractionSchema.load(schema)


def test_foreign_output_is_refused(loaded: tuple[Any, Any], tmp_path: Path) -> None:
    model, tokenizer = loaded
    source = write_lines(tmp_path / "in.jsonl", [{"id": "a", "text": EN_TEXT}])
    out = write_lines(tmp_path / "out.jsonl", [{"id": "zzz", "entities": []}])
    schema = ExtractionSchema.from_dict({"entities": ["Peop"]})
    with pytest.raises(ExtractError, match=r"out\.jsonl:1: id 'zzz' is not in the input"):
        extract_file(ScriptedExtractor(model, tokenizer), schema, source, out, progress=False)
    done = extract_file(
        ScriptedExtractor(model, tokenizer), schema, source, out, overwrite=True, progress=False
    )
    assert done.written == 1


# ----------------------------------------------------------------------------------------------
# model references and the CLI


def test_registry_uri_needs_tracking(monkeypatch: pytest.MonkeyPatch, model_dir: Path) -> None:
    monkeypatch.setitem(sys.modules, "chatuie.tracking", None)  # as if the module did not exist
    with pytest.raises(ExtractError, match="registry URIs need chatuie.tracking.download_model"):
        load_model_ref("models:/chatuie@production")
    fake = types.ModuleType("chatuie.tracking")
    asked: list[str] = []
    fake.download_model = lambda uri: asked.append(uri) or model_dir  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "chatuie.tracking", fake)
    model, tokenizer, name = load_model_ref("models:/chatuie@production")
    assert asked == ["models:/chatuie@production"] and name == "chatuie-production"
    with pytest.raises(ExtractError, match="no such model directory"):
        load_model_ref(str(model_dir / "nope"))


def test_cli_extract_text_and_file(model_dir: Path, schema_file: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "extract",
            "--schema",
            str(schema_file),
            "--model",
            str(model_dir),
            "--max-new-tokens",
            "24",
            ZH_TEXT,
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["text"] == ZH_TEXT
    for span in spans_of(data):
        assert ZH_TEXT[span["start"] : span["end"]] == span["text"]

    source = write_lines(
        tmp_path / "in.jsonl", [{"id": "en", "text": EN_TEXT}, {"id": "zh", "text": ZH_TEXT}]
    )
    out = tmp_path / "out.jsonl"
    args = ["extract", "-s", str(schema_file), "-m", str(model_dir), "-i", str(source), "-o", str(out)]
    result = runner.invoke(app, [*args, "--max-new-tokens", "24", "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["en", "zh"]
    for row in rows:
        for span in spans_of(row):
            assert row["text"][span["start"] : span["end"]] == span["text"]
    assert "2 written, 0 already done" in result.stderr


def test_cli_shows_progress_lines_without_a_terminal(
    model_dir: Path, schema_file: Path, tmp_path: Path
) -> None:
    """Where stderr is a file (a job, CI), progress goes out as plain log lines, not a bar."""
    import os
    import subprocess

    source = write_lines(
        tmp_path / "in.jsonl", [{"id": "en", "text": EN_TEXT}, {"id": "zh", "text": ZH_TEXT}]
    )
    args = [
        "extract",
        "-s",
        str(schema_file),
        "-m",
        str(model_dir),
        "-i",
        str(source),
        "-o",
        str(tmp_path / "o"),
    ]
    done = subprocess.run(
        [str(Path(sys.executable).parent / "chatuie"), *args, "--max-new-tokens", "16"],
        env={**os.environ, "CHATUIE_PROGRESS": "plain", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"chatuie\.progress INFO extract: doc 2/2", done.stderr), done.stderr


def test_cli_bad_input_fails_cleanly(model_dir: Path, schema_file: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "text": "ok"}\n{"id": 2, "txt": "typo"}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = runner.invoke(
        app, ["extract", "-s", str(schema_file), "-m", str(model_dir), "-i", str(source), "-o", str(out)]
    )
    assert result.exit_code == 1
    assert f"error: {source}:2: missing field 'text'" in result.stderr
    assert not out.exists(), "nothing half-written"

    bad_schema = tmp_path / "bad_schema.json"
    bad_schema.write_text('{"entities": ["A"], "relations": [{"type": "R", "tail": "B"}]}', encoding="utf-8")
    result = runner.invoke(app, ["extract", "-s", str(bad_schema), "-m", str(model_dir), "text"])
    assert result.exit_code == 1
    assert "bad_schema.json.relations[0].tail: entity type 'B' is not in entities" in result.stderr

    result = runner.invoke(app, ["extract", "-s", str(schema_file), "-m", str(tmp_path / "none"), "text"])
    assert result.exit_code == 1 and "no such model directory" in result.stderr
    result = runner.invoke(app, ["extract", "-s", str(schema_file), "-i", str(source)])
    assert result.exit_code == 1 and "--input needs --output" in result.stderr


def test_schema_doc_examples_are_valid() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "schema.md").read_text(encoding="utf-8")
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", doc, re.S)]
    schemas = [b for b in blocks if "id" not in b]  # the last block is a result, not a schema
    assert len(schemas) >= 8
    for block in schemas:
        assert ExtractionSchema.from_dict(block).tasks()
