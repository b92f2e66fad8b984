"""Converters: real data counts, hand-written fixtures, and bad input located as file:line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import FIXTURES

from chatuie.data.converters import ceval, conll04, fewfc, resume, webqa
from chatuie.data.prepare import PrepareConfig, convert_all, record_counts
from chatuie.data.records import ConversionError, Record
from tests.helpers.pipeline_repo import stage_process

BAD = FIXTURES / "bad"


@pytest.fixture(scope="module")
def converted(raw_dir: Path) -> dict[str, dict[str, list[Record]]]:
    return convert_all(raw_dir, PrepareConfig())


# SOURCE.md's figures, per dataset and split.
EXPECTED = {
    ("resume", "train"): {"records": 3821, "entities": 13438},
    ("resume", "dev"): {"records": 463, "entities": 1497},
    ("resume", "test"): {"records": 477, "entities": 1630},
    ("conll04", "train"): {"records": 922, "entities": 3377, "relations": 1283},
    ("conll04", "dev"): {"records": 231, "entities": 893, "relations": 343},
    ("conll04", "test"): {"records": 288, "entities": 1079, "relations": 422},
    ("fewfc", "train"): {"records": 7185},
    ("fewfc", "dev"): {"records": 899, "events": 1281},
    ("fewfc", "test"): {"records": 898, "events": 1332},
    ("ceval", "dev"): {"records": 260},
    ("ceval", "val"): {"records": 1346},
}


@pytest.mark.parametrize(("dataset", "split"), sorted(EXPECTED))
def test_counts_match_source(converted, dataset: str, split: str) -> None:
    counts = record_counts(converted[dataset][split])
    for key, value in EXPECTED[(dataset, split)].items():
        assert counts[key] == value, f"{dataset}/{split} {key}"


def test_resume_entity_types_per_split(converted) -> None:
    from collections import Counter

    train = Counter(e.type for r in converted["resume"]["train"] for e in r.entities)
    assert train["TITLE"] == 6308 and train["ORG"] == 4611 and train["LOC"] == 47
    assert sum(r.meta.get("repaired") is not None for r in converted["resume"]["train"]) == 4


def test_webqa_split_is_deterministic_and_keeps_unanswerable(converted, raw_dir: Path) -> None:
    parts = converted["webqa"]
    assert len(parts["train"]) + len(parts["test"]) == 3024
    assert len(parts["test"]) == PrepareConfig().webqa_test_size
    assert sum(not r.meta["answer_in_text"] for p in parts.values() for r in p) == 18
    again = webqa.convert(raw_dir / "webqa", PrepareConfig().webqa_test_size, PrepareConfig().seed)
    assert [r.id for r in again["test"]] == [r.id for r in parts["test"]]
    other_seed = webqa.convert(raw_dir / "webqa", PrepareConfig().webqa_test_size, 99)
    assert [r.id for r in other_seed["test"]] != [r.id for r in parts["test"]]


def test_every_span_slices_its_text(converted) -> None:
    for splits in converted.values():
        for records in splits.values():
            for r in records:
                for e in r.entities:
                    assert r.text[e.start : e.end] == e.text
                for ev in r.events:
                    assert r.text[ev.trigger.start : ev.trigger.end] == ev.trigger.text
                    for a in ev.arguments:
                        assert r.text[a.start : a.end] == a.text


def test_fixtures_convert(tmp_path: Path) -> None:
    out = convert_all(FIXTURES / "raw", PrepareConfig(webqa_test_size=1))
    first = out["resume"]["train"][0]
    assert first.text == "常建良，男" and [(e.type, e.text) for e in first.entities] == [("NAME", "常建良")]
    sentence = out["conll04"]["train"][0]
    assert sentence.text == "John Smith works for IBM in New York ."
    assert [(r.type, r.head.text, r.tail.text) for r in sentence.relations] == [
        ("Work_For", "John Smith", "IBM"),
        ("OrgBased_In", "IBM", "New York"),
    ]
    assert [r.id for r in out["fewfc"]["train"]] == ["fewfc-a1"]  # a2/a3 are dev/test ids
    assert out["fewfc"]["dev"][0].events[0].arguments[0].text == "1000万股"
    assert out["ceval"]["dev"][0].meta["explanation"] == "1. 分析\n2. 结论"
    assert len(out["webqa"]["test"]) == 1


BAD_CASES = [
    (resume.convert_file, "resume_columns.bmes", 2, "2 columns"),
    (resume.convert_file, "resume_e_without_b.bmes", 3, "without a preceding B-NAME"),
    (resume.convert_file, "resume_type_change.bmes", 2, "continues an entity of type 'NAME'"),
    (resume.convert_file, "resume_unknown_tag.bmes", 1, "unknown tag"),
    (resume.convert_file, "resume_non_utf8.bmes", 2, "not valid UTF-8"),
    (resume.convert_file, "resume_unclosed.bmes", 2, "missing E-NAME"),
    (conll04.convert_file, "conll04_invalid_json.json", 1, "invalid JSON"),
    (conll04.convert_file, "conll04_offsets.json", 1, "sentence 1: entity 0: token offsets"),
    (conll04.convert_file, "conll04_relation_ref.json", 1, "not an annotated entity"),
    (lambda p, s: fewfc._read(p, s, official=True), "fewfc_invalid_json.json", 2, "invalid JSON"),
    (lambda p, s: fewfc._read(p, s, official=True), "fewfc_span_range.json", 2, "out of range"),
    (lambda p, s: fewfc._read(p, s, official=True), "fewfc_word_mismatch.json", 1, "!= text[0:4]"),
    (lambda p, s: ceval._read_csv(p, s, "law", "Humanities"), "ceval_columns.csv", 3, "expected 7 columns"),
    (lambda p, s: ceval._read_csv(p, s, "law", "Humanities"), "ceval_answer.csv", 2, "answer must be"),
]


@pytest.mark.parametrize(("convert", "name", "line", "message"), BAD_CASES, ids=[c[1] for c in BAD_CASES])
def test_bad_input_names_file_and_line(convert, name: str, line: int, message: str) -> None:
    with pytest.raises(ConversionError) as info:
        convert(BAD / name, "train")
    err = info.value
    assert err.path.endswith(name) and err.line == line
    assert str(err).startswith(f"{BAD / name}:{line}: ")
    assert message in str(err)


def test_webqa_invalid_json(tmp_path: Path) -> None:
    shutil.copy(BAD / "webqa_invalid.json", tmp_path / "me_test.ann.json")
    with pytest.raises(ConversionError, match=r"me_test.ann.json:1: invalid JSON"):
        webqa.convert(tmp_path, 1)


@pytest.mark.parametrize("bad_file", ["resume_e_without_b.bmes", "resume_non_utf8.bmes"])
def test_prepare_stage_fails_cleanly_and_writes_nothing(
    tmp_path: Path, subprocess_env, bad_file: str
) -> None:
    """The real stage script on a raw tree with one broken file: exit 1, file:line, no outputs."""
    shutil.copytree(FIXTURES / "raw", tmp_path / "data" / "raw")
    shutil.copy(BAD / bad_file, tmp_path / "data" / "raw" / "resume_ner" / "dev.char.bmes")
    (tmp_path / "params.yaml").write_text("prepare:\n  webqa_test_size: 1\n")
    proc = stage_process("prepare", tmp_path, env=subprocess_env, timeout=120)
    assert proc.returncode == 1
    assert "resume_ner/dev.char.bmes:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "data" / "records").exists()
    assert not (tmp_path / "metrics").exists()


def test_prepare_stage_on_fixtures(tmp_path: Path, subprocess_env) -> None:
    shutil.copytree(FIXTURES / "raw", tmp_path / "data" / "raw")
    (tmp_path / "params.yaml").write_text("prepare:\n  webqa_test_size: 1\n")
    proc = stage_process("prepare", tmp_path, env=subprocess_env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    written = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "data" / "records").rglob("*"))
    assert "data/records/resume/train.jsonl" in written
    assert not [p for p in written if p.endswith(".tmp")]


def test_unknown_param_is_named(tmp_path: Path, subprocess_env) -> None:
    shutil.copytree(FIXTURES / "raw", tmp_path / "data" / "raw")
    (tmp_path / "params.yaml").write_text("prepare:\n  webqa_test_sise: 1\n")
    proc = stage_process("prepare", tmp_path, env=subprocess_env, timeout=120)
    assert proc.returncode == 1
    assert "params.yaml: prepare.webqa_test_sise: unknown key" in proc.stderr
