"""Confusing negatives: every type is made, differs from gold, and is still a valid grounded answer."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import FIXTURES

from chatuie.data.answers import flatten_answer, ground, render
from chatuie.data.prepare import PrepareConfig, convert_all
from chatuie.data.prompts import ChatOptions, instruction_schemas
from chatuie.data.records import Argument, Entity, Event, Record, Relation, Schema, Trigger
from chatuie.io import write_jsonl
from chatuie.reward.negatives import (
    NEGATIVE_TYPES,
    TYPES_BY_TASK,
    ConfusionTable,
    NegativeSettings,
    make_negatives,
)


def _entity(text: str, label: str, span: str, occurrence: int = 0) -> Entity:
    start = -1
    for _ in range(occurrence + 1):
        start = text.index(span, start + 1)
    return Entity(label, start, start + len(span), span)


def ner_record() -> Record:
    text = "张三，男，汉族，1965年出生，现任北京大学教授，曾任上海华东电器公司总经理。"
    return Record(
        id="ner-1",
        dataset="resume",
        split="train",
        task="ner",
        text=text,
        schema=Schema(entities=["NAME", "RACE", "ORG", "TITLE", "LOC"]),
        entities=[
            _entity(text, "NAME", "张三"),
            _entity(text, "RACE", "汉族"),
            _entity(text, "ORG", "北京大学"),
            _entity(text, "TITLE", "教授"),
            _entity(text, "ORG", "上海华东电器公司"),
            _entity(text, "TITLE", "总经理"),
        ],
    )


def re_record() -> Record:
    text = "John Smith , who works for IBM in New York , met Mary Jones ."
    john, ibm = _entity(text, "Peop", "John Smith"), _entity(text, "Org", "IBM")
    ny, mary = _entity(text, "Loc", "New York"), _entity(text, "Peop", "Mary Jones")
    return Record(
        id="re-1",
        dataset="conll04",
        split="train",
        task="re",
        text=text,
        schema=Schema(
            entities=["Loc", "Org", "Peop", "Other"],
            relations=["Work_For", "Kill", "OrgBased_In", "Live_In", "Located_In"],
        ),
        entities=[john, ibm, ny, mary],
        relations=[
            Relation("Work_For", john, ibm),
            Relation("OrgBased_In", ibm, ny),
            Relation("Live_In", john, ny),
        ],
    )


def ee_record() -> Record:
    text = "东方金钰公告，公司将其持有的2000万股质押给中信证券，质押日期为2019年3月1日。"

    def arg(role: str, span: str) -> Argument:
        start = text.index(span)
        return Argument(role, start, start + len(span), span)

    start = text.index("质押")
    return Record(
        id="ee-1",
        dataset="fewfc",
        split="train",
        task="ee",
        text=text,
        schema=Schema(
            events={"质押": ["sub-org", "obj-org", "number", "date"], "投资": ["sub", "obj", "money"]}
        ),
        events=[
            Event(
                "质押",
                Trigger(start, start + 2, "质押"),
                (
                    arg("sub-org", "东方金钰"),
                    arg("obj-org", "中信证券"),
                    arg("number", "2000万股"),
                    arg("date", "2019年3月1日"),
                ),
            )
        ],
    )


RECORDS = {"ner": ner_record, "re": re_record, "ee": ee_record}


def assert_valid(record: Record, schema: Schema, answer: str) -> None:
    """Well-formed JSON in the output format, spans in the text, labels in the schema."""
    parsed = json.loads(answer)
    assert isinstance(parsed, dict)
    grounded = ground(record.task, parsed, record.text, schema)
    assert grounded["dropped"] == 0, answer
    for item in flatten_answer(record.task, parsed):
        kind, label, *spans = item
        if kind == "entity":
            assert label in schema.entities
        elif kind == "relation":
            assert label in schema.relations
        elif kind == "trigger":
            assert label in schema.events
        else:
            assert label in schema.events and spans[0] in schema.events[label]
            spans = spans[1:]
        for span in spans:
            assert span and span in record.text, (item, record.text)


def negatives_of_type(record: Record, kind: str, tries: int = 40) -> list:
    """Negatives of one type over several seeds (a single seed may pick an element it cannot edit)."""
    out = []
    for seed in range(tries):
        settings = NegativeSettings(per_instruction=1, types=[kind], seed=seed)
        out.extend(make_negatives(record, record.schema, settings))
    return out


@pytest.mark.parametrize(("task", "kind"), [(t, k) for t, kinds in TYPES_BY_TASK.items() for k in kinds])
def test_each_type_is_made_differs_from_gold_and_stays_valid(task: str, kind: str) -> None:
    record = RECORDS[task]()
    gold = render(record, record.schema)
    gold_items = flatten_answer(task, gold)
    made = negatives_of_type(record, kind)
    assert made, f"no {kind} negative for {task}"
    for negative in made:
        assert negative.type == kind
        assert negative.answer != gold
        items = flatten_answer(task, negative.answer)
        assert items != gold_items  # differs as a set: no scorer can call it correct
        assert_valid(record, record.schema, negative.answer)
        assert_edit(kind, gold_items, items)


def assert_edit(kind: str, gold: set[tuple], neg: set[tuple]) -> None:
    """The negative makes the mistake its type names."""
    added, removed = neg - gold, gold - neg
    if kind == "missing":
        assert not added and removed
    elif kind == "emptied":
        assert not neg and len(gold) >= 2
    elif kind == "invented":
        assert added and not removed
    elif kind == "label_swap":
        # same spans, a different label on one of them
        assert {i[2:] for i in added if i[0] == "entity"} <= {i[2:] for i in gold if i[0] == "entity"}
        assert any(i[0] == "entity" for i in added)
    elif kind in ("boundary_shift", "trigger_shift"):
        part = "trigger" if kind == "trigger_shift" else None
        shifted = [i for i in added if part is None or i[0] == part]
        assert shifted and all(i[-1] not in {g[-1] for g in gold if g[:-1] == i[:-1]} for i in shifted)
    elif kind == "relation_direction":
        (new,) = [i for i in added if i[0] == "relation"]
        assert ("relation", new[1], new[3], new[2]) in gold
    elif kind == "relation_type":
        (new,) = [i for i in added if i[0] == "relation"]
        assert any(g[0] == "relation" and g[2:] == new[2:] and g[1] != new[1] for g in gold)
    elif kind == "spurious_relation":
        (new,) = added
        assert new[0] == "relation" and not removed
    elif kind == "role_swap":
        (new,) = [i for i in added if i[0] == "argument"]
        assert any(g[0] == "argument" and g[3] == new[3] and g[2] != new[2] for g in gold)


def test_several_types_per_instruction_and_deterministic() -> None:
    record = re_record()
    settings = NegativeSettings(per_instruction=4, seed=5)
    first = make_negatives(record, record.schema, settings, instruction=0)
    again = make_negatives(record, record.schema, settings, instruction=0)
    assert [(n.type, n.answer) for n in first] == [(n.type, n.answer) for n in again]
    assert len(first) == 4 and len({n.type for n in first}) == 4
    other = make_negatives(record, record.schema, settings, instruction=1)
    assert [(n.type, n.answer) for n in other] != [(n.type, n.answer) for n in first]


def test_type_weights_draw_the_weighted_types_more_often() -> None:
    """A weight of 6 on relation_type makes it the first of two draws far more often than uniform;
    an empty weight map keeps the unweighted shuffle (the negatives made before weights existed)."""
    record = re_record()

    def first_types(weights: dict[str, float]) -> Counter[str]:
        seen: Counter[str] = Counter()
        for instruction in range(300):
            settings = NegativeSettings(per_instruction=1, type_weights=weights, seed=3)
            made = make_negatives(record, record.schema, settings, instruction=instruction)
            seen.update(n.type for n in made)
        return seen

    uniform, weighted = first_types({}), first_types({"relation_type": 6.0})
    n_types = len(TYPES_BY_TASK["re"])
    assert uniform["relation_type"] < 2 * 300 / n_types  # ~1/7 of the draws
    assert weighted["relation_type"] > 300 / 3  # 6 / (6 + 6) = half of the draws by expectation
    assert sum(weighted.values()) == sum(uniform.values()) == 300
    before = make_negatives(record, record.schema, NegativeSettings(per_instruction=2, seed=3))
    unweighted = NegativeSettings(per_instruction=2, seed=3, type_weights={})
    assert [n.answer for n in make_negatives(record, record.schema, unweighted)] == [n.answer for n in before]


def test_type_weights_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown types"):
        NegativeSettings(type_weights={"role_swop": 2.0})
    with pytest.raises(ValueError, match="must be > 0"):
        NegativeSettings(type_weights={"role_swap": 0.0})


def test_empty_gold_gets_invented_negatives_only() -> None:
    record = ner_record()
    schema = Schema(entities=["EDU", "PRO"])  # absent labels: the gold answer is all []
    made = []
    for seed in range(10):
        made += make_negatives(record, schema, NegativeSettings(per_instruction=3, seed=seed))
    assert made and {n.type for n in made} == {"invented"}
    for negative in made:
        assert_valid(record, schema, negative.answer)


def test_label_swaps_follow_the_models_confusions(tmp_path: Path) -> None:
    """With confusions observed (NAME predicted as TITLE) and no smoothing, swaps pick exactly them."""
    record = ner_record()
    rows = [
        {
            "gold": {"entities": [{"type": "NAME", "start": 0, "end": 2, "text": "张三"}]},
            "pred": {"entities": [{"type": "TITLE", "start": 0, "end": 2, "text": "张三"}]},
        }
    ] * 5 + [
        {  # same span predicted with the gold label: not a confusion
            "gold": {"entities": [{"type": "ORG", "start": 0, "end": 2, "text": "北京"}]},
            "pred": {"entities": [{"type": "ORG", "start": 0, "end": 2, "text": "北京"}]},
        }
    ]
    (tmp_path / "eval").mkdir()
    write_jsonl(tmp_path / "eval" / "predictions.resume.constrained.jsonl", rows)
    table = ConfusionTable.from_eval_dir(tmp_path / "eval")
    assert table.counts == Counter({("entity", "NAME", "TITLE"): 5})
    only_name = Record(**{**record.__dict__, "entities": [record.entities[0]]})
    swaps = Counter()
    for seed in range(30):
        settings = NegativeSettings(
            per_instruction=1, types=["label_swap"], confusion_smoothing=0.0, seed=seed
        )
        for negative in make_negatives(only_name, record.schema, settings, table):
            swaps[negative.record.entities[0].type] += 1
    assert swaps == Counter({"TITLE": 30})
    # No observations: uniform over the other labels.
    uniform = Counter()
    for seed in range(60):
        settings = NegativeSettings(per_instruction=1, types=["label_swap"], seed=seed)
        for negative in make_negatives(only_name, record.schema, settings, ConfusionTable()):
            uniform[negative.record.entities[0].type] += 1
    assert set(uniform) == {"RACE", "ORG", "TITLE", "LOC"}
    assert ConfusionTable.from_eval_dir(tmp_path / "missing").counts == Counter()


def test_confusions_of_relations_events_and_roles() -> None:
    table = ConfusionTable()
    ent = {"type": "Peop", "start": 0, "end": 4, "text": "John"}
    org = {"type": "Org", "start": 10, "end": 13, "text": "IBM"}
    table.add_prediction(
        {
            "gold": {
                "relations": [{"type": "Work_For", "head": ent, "tail": org}],
                "events": [
                    {
                        "type": "质押",
                        "trigger": {"start": 0, "end": 2, "text": "质押"},
                        "arguments": [{"role": "sub-org", "start": 3, "end": 5, "text": "公司"}],
                    }
                ],
            },
            "pred": {
                "relations": [{"type": "Live_In", "head": ent, "tail": org}],
                "events": [
                    {
                        "type": "投资",
                        "trigger": {"start": 0, "end": 2, "text": "质押"},
                        "arguments": [{"role": "obj-org", "start": 3, "end": 5, "text": "公司"}],
                    }
                ],
            },
        }
    )
    assert table.counts[("relation", "Work_For", "Live_In")] == 1
    assert table.counts[("event", "质押", "投资")] == 1
    # Roles are compared within the same event type: the predicted event has another type.
    assert ("role", "sub-org", "obj-org") not in table.counts


def test_real_fixture_records_give_valid_negatives() -> None:
    converted = convert_all(FIXTURES / "raw", PrepareConfig(webqa_test_size=1))
    chat = ChatOptions(shuffle_labels=True, max_labels_per_instruction=4)
    seen: Counter[str] = Counter()
    for dataset in ("resume", "conll04", "fewfc"):
        for record in converted[dataset]["train"]:
            for index, schema in enumerate(instruction_schemas(record, chat, train=True)):
                gold_items = flatten_answer(record.task, render(record, schema))
                for negative in make_negatives(
                    record, schema, NegativeSettings(per_instruction=8), instruction=index
                ):
                    assert flatten_answer(record.task, negative.answer) != gold_items
                    assert_valid(record, schema, negative.answer)
                    seen[negative.type] += 1
    assert set(seen) == set(NEGATIVE_TYPES), seen


def test_unknown_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown negative types"):
        NegativeSettings(types=["label_swap", "typo"])
