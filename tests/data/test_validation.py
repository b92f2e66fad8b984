"""great-expectations suites: clean data passes, each kind of corruption fails by name."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import FIXTURES

from chatuie.data.prepare import PrepareConfig, convert_all
from chatuie.data.records import Entity, Record
from chatuie.data.samples import SamplesConfig, build_all
from chatuie.data.validation import (
    ValidateConfig,
    failure_message,
    record_tables,
    run_suites,
    sample_tables,
)


def _records() -> list[Record]:
    converted = convert_all(FIXTURES / "raw", PrepareConfig(webqa_test_size=1))
    return [r for splits in converted.values() for rs in splits.values() for r in rs]


def _validate(records: list[Record], docs: Path | None = None) -> dict:
    samples, _ = build_all(records, SamplesConfig())
    config = ValidateConfig(expected_counts={"resume": {"train": [2, 2]}})
    return run_suites(record_tables(records, config) + sample_tables(samples, records), docs)


def test_clean_fixtures_pass_and_write_docs(tmp_path: Path) -> None:
    summary = _validate(_records(), tmp_path / "docs")
    assert summary["success"], failure_message(summary)
    assert (tmp_path / "docs" / "index.html").exists()


def _failed(summary: dict) -> set[tuple[str, str]]:
    return {
        (name, e["expectation"])
        for name, table in summary["tables"].items()
        for e in table["expectations"]
        if not e["success"]
    }


def test_span_text_mismatch_is_caught_with_example_row() -> None:
    records = _records()
    target = next(r for r in records if r.dataset == "resume")
    bad = Entity("NAME", 0, 2, "常建良")  # text != text[0:2]
    target.entities = [bad]
    summary = _validate(records)
    assert not summary["success"]
    assert ("spans.resume", "expect_column_pair_values_to_be_equal") in _failed(summary)
    message = failure_message(summary)
    assert "table spans.resume" in message and target.id in message


def test_label_outside_schema_and_duplicate_ids() -> None:
    records = _records()
    conll = next(r for r in records if r.dataset == "conll04")
    conll.entities = [dataclasses.replace(conll.entities[0], type="Person")]
    records.append(dataclasses.replace(records[0]))
    failed = _failed(_validate(records))
    assert ("spans.conll04", "expect_column_values_to_be_in_set") in failed
    assert ("records", "expect_column_values_to_be_unique") in failed


def test_counts_out_of_range_empty_text_and_bad_mcq() -> None:
    records = _records()
    resume = [r for r in records if r.dataset == "resume" and r.split == "train"]
    records.remove(resume[0])  # 1 record where 2 are expected
    records[0].text = "   "
    mcq = next(r for r in records if r.task == "mcq")
    mcq.answer = "E"
    failed = _failed(_validate(records))
    assert ("records.resume.train", "expect_table_row_count_to_be_between") in failed
    assert ("records", "expect_column_values_to_not_match_regex") in failed
    assert ("mcq.ceval", "expect_column_values_to_be_in_set") in failed


def test_test_text_in_train_is_caught() -> None:
    records = _records()
    samples, _ = build_all(records, SamplesConfig(decontaminate=False))
    test_text = next(r for r in records if r.dataset == "conll04" and r.split == "test").text
    assert any(r.text == test_text for r in records if r.split == "train")  # fixture shares texts
    summary = run_suites(sample_tables(samples, records), None)
    assert ("samples.train", "expect_column_values_to_not_be_in_set") in _failed(summary)


@pytest.mark.parametrize("field", ["answer"])
def test_summary_is_json_serialisable(field: str) -> None:
    import json

    summary = _validate(_records())
    json.dumps(summary)
