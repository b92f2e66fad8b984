"""Record -> chat messages: determinism, schema options, and gold answers that ground back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FIXTURES

from chatuie.data.answers import ground, render
from chatuie.data.prepare import PrepareConfig, convert_all
from chatuie.data.prompts import ChatOptions, build_samples, instruction_schemas
from chatuie.data.records import Record, Schema
from chatuie.data.samples import SamplesConfig, build_all, sample_split
from chatuie.io import dumps_compact


@pytest.fixture(scope="module")
def records(raw_dir: Path) -> list[Record]:
    converted = convert_all(raw_dir, PrepareConfig())
    return [r for splits in converted.values() for rs in splits.values() for r in rs]


def test_same_input_same_bytes(records) -> None:
    options = ChatOptions(shuffle_labels=True, max_labels_per_instruction=3, absent_label_rate=0.5)
    sample = [r for r in records if r.task == "ee"][:50]
    first = [dumps_compact(s) for r in sample for s in build_samples(r, options, train=True)]
    second = [dumps_compact(s) for r in sample for s in build_samples(r, options, train=True)]
    assert first == second
    reseeded = ChatOptions(shuffle_labels=True, max_labels_per_instruction=3, absent_label_rate=0.5, seed=7)
    third = [dumps_compact(s) for r in sample for s in build_samples(r, reseeded, train=True)]
    assert third != first


def test_gold_answers_ground_back_exactly(records) -> None:
    """Every gold answer parses and maps back to offsets with nothing dropped (all datasets)."""
    for r in records:
        if r.task not in ("ner", "re", "ee"):
            continue
        grounded = ground(r.task, render(r, r.schema), r.text, r.schema)
        assert grounded["dropped"] == 0, r.id
        if r.task in ("ner", "re"):
            assert sorted((e.type, e.text) for e in grounded["entities"]) == sorted(
                (e.type, e.text) for e in r.entities
            ), r.id


def test_ner_answer_format() -> None:
    record = convert_all(FIXTURES / "raw", PrepareConfig(webqa_test_size=1))["resume"]["train"][0]
    assert render(record, Schema(entities=["NAME", "ORG"])) == '{"NAME":["常建良"],"ORG":[]}'


def test_absent_labels_and_splitting(records) -> None:
    record = next(r for r in records if r.dataset == "fewfc" and len({e.type for e in r.events}) == 1)
    present = record.events[0].type
    none_absent = instruction_schemas(record, ChatOptions(absent_label_rate=0.0), train=True)
    assert [list(s.events) for s in none_absent] == [[present]]
    all_labels = instruction_schemas(record, ChatOptions(max_labels_per_instruction=4), train=True)
    assert [len(s.events) for s in all_labels] == [4, 4, 2]
    assert sorted(k for s in all_labels for k in s.events) == sorted(record.schema.events)
    # Evaluation instructions always carry every label, in schema order.
    evaluation = instruction_schemas(
        record, ChatOptions(absent_label_rate=0.0, shuffle_labels=True), train=False
    )
    assert list(evaluation[0].events) == list(record.schema.events)


def test_shuffled_schema_orders_answer_keys(records) -> None:
    record = next(r for r in records if r.dataset == "resume" and r.split == "train")
    (sample,) = build_samples(record, ChatOptions(shuffle_labels=True, seed=3), train=True)
    answer = json.loads(sample["messages"][-1]["content"])
    assert list(answer) == sample["schema"]["entities"]
    assert [m["role"] for m in sample["messages"]] == ["system", "user", "assistant"]
    assert record.text in sample["messages"][1]["content"]


def test_decontamination_removes_test_texts(records) -> None:
    samples, counts = build_all(records, SamplesConfig())
    by_id = {r.id: r for r in records}
    held_out = {(r.dataset, r.text) for r in records if sample_split(r) != "train"}
    train_keys = {(s["dataset"], by_id[s["record_id"]].text) for s in samples["train"]}
    assert not train_keys & held_out
    assert counts["decontaminated_train_records"]["conll04"] > 0
    assert {s["dataset"] for s in samples["test"]} == {"resume", "conll04", "fewfc", "webqa", "ceval"}


def test_repeat_samples_copy_training_texts() -> None:
    from chatuie.data.prompts import REPEAT_TASK, TEXT_LINE, ie_user_prompt, messages_for, repeat_samples
    from chatuie.data.records import Schema

    texts = ["张三在北京工作。", "John lives in Paris .", "张三在北京工作。"]
    samples = [
        {"task": "ner", "messages": messages_for(ie_user_prompt("ner", t, Schema(entities=["PER"])), "{}")}
        for t in texts
    ] + [{"task": "qa", "messages": messages_for("Text: not an IE prompt", "x")}]
    rows = repeat_samples(samples, 10, seed=1)
    assert sorted(r["messages"][-1]["content"] for r in rows) == sorted(set(texts))  # distinct, IE only
    for row in rows:
        user, answer = row["messages"][0]["content"], row["messages"][-1]["content"]
        assert user == f"{REPEAT_TASK}\n{TEXT_LINE}{answer}"
    assert repeat_samples(samples, 1, seed=1) == repeat_samples(samples, 1, seed=1)
    assert len(repeat_samples(samples, 1, seed=1)) == 1
