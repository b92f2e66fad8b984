"""Generic dataset formats (declared datasets): a hand-written fixture per format converted and
validated, and bad input per format located as file:line with nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import FIXTURES

from chatuie.config import ConfigError, build
from chatuie.data.converters.formats import DeclaredDataset, FormatOptions, convert_declared, default_task
from chatuie.data.prepare import PrepareConfig, check_zero_shot
from chatuie.data.records import ConversionError, Record
from chatuie.data.validation import ValidateConfig, record_tables, run_suites
from tests.helpers.pipeline_repo import stage_process

FORMATS_DIR = FIXTURES / "formats"


def declared(
    fmt: str, task: str, files: dict[str, str], schema: str | None = None, name: str = "", **options
) -> DeclaredDataset:
    return DeclaredDataset(
        name=name or f"my_{fmt}_{task}",
        task=task,
        format=fmt,
        files=files,
        schema=schema,
        options=FormatOptions(**options),
    )


def spans(record: Record) -> list[tuple]:
    out: list[tuple] = [(e.type, e.text, e.start) for e in record.entities]
    out += [(r.type, r.head.text, r.tail.text) for r in record.relations]
    for ev in record.events:
        out.append((ev.type, ev.trigger.text, ev.trigger.start))
        out += [(a.role, a.text, a.start) for a in ev.arguments]
    return out


# (format, task, files, schema, options, expected (text, spans) of the first test records, schema)
GOOD = {
    "tagging_zh_bmes": (
        "tagging",
        "ner",
        {"train": "tagging_zh_bmes.txt"},
        None,
        {},
        [
            ("张三在北京工作。", [("NAME", "张三", 0), ("LOC", "北京", 3)]),
            ("王去上海", [("NAME", "王", 0), ("LOC", "上海", 2)]),
        ],
        {"entities": ["LOC", "NAME"]},
    ),
    "tagging_en_bio": (
        "tagging",
        "ner",
        {"test": "tagging_en_bio.txt"},
        None,
        {"tag_scheme": "bio"},
        [
            ("John Smith lives in New York .", [("PER", "John Smith", 0), ("LOC", "New York", 20)]),
            ("Acme hired Mary .", [("ORG", "Acme", 0), ("PER", "Mary", 11)]),
        ],
        {"entities": ["LOC", "ORG", "PER"]},
    ),
    "tagging_en_iob1": (
        "tagging",
        "ner",
        {"test": "tagging_en_iob1.txt"},
        None,
        {"tag_scheme": "iob1"},
        [("Paris Berlin and Ann", [("LOC", "Paris", 0), ("LOC", "Berlin", 6), ("PER", "Ann", 17)])],
        {"entities": ["LOC", "PER"]},
    ),
    "triples_en": (
        "triples",
        "re",
        {"test": "triples_en.json"},
        "triples_schema.json",
        {},
        [
            (
                "John Smith works for IBM in New York .",
                [
                    ("Peop", "John Smith", 0),
                    ("Org", "IBM", 21),
                    ("Loc", "New York", 28),
                    ("Work_For", "John Smith", "IBM"),
                    ("OrgBased_In", "IBM", "New York"),
                ],
            ),
            # "Paris" twice: the first occurrence, counted as ambiguous.
            (
                "Mary lives in Paris , and Paris is in France .",
                [("Peop", "Mary", 0), ("Loc", "Paris", 14), ("Live_In", "Mary", "Paris")],
            ),
        ],
        {
            "entities": ["Peop", "Org", "Loc"],
            "relations": [
                {"type": "Work_For", "head": "Peop", "tail": "Org"},
                {"type": "OrgBased_In", "head": "Org", "tail": "Loc"},
                {"type": "Live_In", "head": "Peop", "tail": "Loc"},
            ],
        },
    ),
    "triples_zh": (
        "triples",
        "re",
        {"train": "triples_zh.jsonl"},
        None,
        {},
        [
            (
                "阿里巴巴由马云创办。",
                [("entity", "阿里巴巴", 0), ("entity", "马云", 5), ("创始人", "阿里巴巴", "马云")],
            ),
            (
                "阿里巴巴总部位于杭州。",
                [("entity", "阿里巴巴", 0), ("entity", "杭州", 8), ("总部地点", "阿里巴巴", "杭州")],
            ),
        ],
        {"entities": ["entity"], "relations": ["创始人", "总部地点"]},
    ),
    "duee_zh": (
        "duee",
        "ee",
        {"dev": "duee_zh.jsonl"},
        "duee_schema.jsonl",
        {},
        [
            (
                "腾讯收购了搜狗。",
                [("财经/交易-收购", "收购", 2), ("收购方", "腾讯", 0), ("被收购方", "搜狗", 5)],
            ),
            ("今天天气很好。", []),
        ],
        {
            "events": {
                "财经/交易-收购": ["时间", "收购方", "被收购方"],
                "组织关系-裁员": ["裁员方", "裁员人数"],
            }
        },
    ),
    "duee_en": (
        "duee",
        "ee",
        {"test": "duee_en.jsonl"},
        None,
        {},
        [
            (
                "Google acquired Fitbit in 2021 .",
                [
                    ("Acquisition", "acquired", 7),
                    ("buyer", "Google", 0),
                    ("target", "Fitbit", 16),
                    ("time", "2021", 26),
                ],
            )
        ],
        {"events": {"Acquisition": ["buyer", "target", "time"]}},
    ),
    "doccano_en": (
        "doccano",
        "ner",
        {"test": "doccano_en.jsonl"},
        None,
        {},
        [
            ("Barack Obama visited Berlin.", [("PER", "Barack Obama", 0), ("LOC", "Berlin", 21)]),
            ("Nothing here.", []),
        ],
        {"entities": ["LOC", "PER"]},
    ),
    "doccano_zh_rel": (
        "doccano",
        "re",
        {"test": "doccano_zh_rel.jsonl"},
        None,
        {},
        [("张三就职于华为。", [("人物", "张三", 0), ("组织", "华为", 5), ("就职", "张三", "华为")])],
        {"entities": ["人物", "组织"], "relations": ["就职"]},
    ),
    "label_studio": (
        "label_studio",
        "ner",
        {"test": "label_studio.json"},
        None,
        {},
        [
            ("Alice met Bob in London.", [("PER", "Alice", 0), ("PER", "Bob", 10), ("LOC", "London", 17)]),
            ("北京是中国的首都。", [("LOC", "北京", 0), ("LOC", "中国", 3)]),
        ],
        {"entities": ["LOC", "PER"]},
    ),
    "records_en": (
        "records",
        "ner",
        {"test": "records_en.jsonl"},
        None,
        {},
        [("Ann works at IBM.", [("PER", "Ann", 0), ("ORG", "IBM", 13)])],
        {"entities": ["LOC", "ORG", "PER"]},  # the record's own schema joins the inferred one
    ),
}


def convert_fixture(key: str):
    fmt, task, files, schema, options, _, _ = GOOD[key]
    spec = declared(fmt, task, files, schema, name=key, **options)
    return spec, convert_declared(spec, FORMATS_DIR)


@pytest.mark.parametrize("key", sorted(GOOD))
def test_fixture_converts(key: str) -> None:
    spec, result = convert_fixture(key)
    _, task, files, _, _, expected, schema = GOOD[key]
    (split,) = files
    records = result.splits[split]
    assert [(r.text, spans(r)) for r in records] == expected
    assert result.schema == schema
    for index, r in enumerate(records):
        assert r.id == f"{spec.name}-{split}-{index:05d}" and r.dataset == spec.name and r.task == task
        assert r.meta["source"].endswith(f"{files[split]}:{r.meta['source'].rsplit(':', 1)[1]}")
        for e in [*r.entities, *(x for rel in r.relations for x in (rel.head, rel.tail))]:
            assert r.text[e.start : e.end] == e.text
        for ev in r.events:
            assert r.text[ev.trigger.start : ev.trigger.end] == ev.trigger.text
            assert all(r.text[a.start : a.end] == a.text for a in ev.arguments)


def test_json_items_are_located_by_line() -> None:
    _, result = convert_fixture("label_studio")
    assert [r.meta["source"].rsplit(":", 1)[1] for r in result.splits["test"]] == ["2", "19"]
    _, result = convert_fixture("triples_en")
    assert [r.meta["source"].rsplit(":", 1)[1] for r in result.splits["test"]] == ["2", "6"]
    assert [(n.kind, n.where.rsplit(":", 1)[1]) for n in result.notes["test"]] == [("ambiguous_span", "6")]
    assert result.splits["test"][1].meta["ambiguous_spans"] == 1


def test_every_fixture_passes_the_validate_expectations() -> None:
    records = [r for key in GOOD for rows in convert_fixture(key)[1].splits.values() for r in rows]
    summary = run_suites(record_tables(records, ValidateConfig()), None)
    failed = [
        (name, e) for name, t in summary["tables"].items() for e in t["expectations"] if not e["success"]
    ]
    assert summary["success"], failed
    assert len([n for n in summary["tables"] if n.startswith("spans.")]) == len(GOOD)


def test_ambiguous_and_missing_span_policies(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"text": "Paris and Paris", "triple_list": [["Paris", "same", "Paris"]]}\n'
        '{"text": "Rome is nice", "triple_list": [["Rome", "in", "Italy"]]}\n'
        '{"text": "Ann sang", "triple_list": [["Ann", "did", "sang"]]}\n',
        encoding="utf-8",
    )
    spec = declared("triples", "re", {"test": "t.jsonl"}, ambiguous_spans="skip", missing_spans="skip")
    result = convert_declared(spec, tmp_path)
    assert [r.text for r in result.splits["test"]] == ["Ann sang"]
    assert [(n.kind, n.where) for n in result.notes["test"]] == [
        ("skipped_record (ambiguous_span)", f"{path}:1"),
        ("skipped_record (missing_span)", f"{path}:2"),
    ]
    with pytest.raises(ConversionError, match=r"t.jsonl:1: triple 0 head 'Paris' occurs 2 times"):
        convert_declared(declared("triples", "re", {"test": "t.jsonl"}, ambiguous_spans="error"), tmp_path)
    with pytest.raises(ConversionError, match=r"t.jsonl:2: triple 0 tail 'Italy' is not in the text"):
        convert_declared(declared("triples", "re", {"test": "t.jsonl"}), tmp_path)
    # A word is not found inside another ("in" is no span of "Rain"), CJK needs no boundaries.
    from chatuie.data.converters.formats.triples import occurrences

    assert occurrences("Rain in Spain", "in") == [5] and occurrences("在北京在", "在") == [0, 3]


@pytest.mark.parametrize(
    ("scheme", "tags", "expected"),
    [
        ("bioes", "B-X I-X E-X O S-Y", [("X", "a b c"), ("Y", "e")]),
        ("bmes", "B-X M-X E-X O S-Y", [("X", "a b c"), ("Y", "e")]),
        ("auto", "B-X M-X E-X O S-Y", [("X", "a b c"), ("Y", "e")]),
        ("bio", "B-X I-X B-X O B-Y", [("X", "a b"), ("X", "c"), ("Y", "e")]),
        ("iob1", "I-X I-X B-X O I-Y", [("X", "a b"), ("X", "c"), ("Y", "e")]),
    ],
)
def test_tag_schemes(tmp_path: Path, scheme: str, tags: str, expected: list) -> None:
    lines = [f"{tok} {tag}" for tok, tag in zip(["a", "b", "c", "d", "e"], tags.split(), strict=True)]
    (tmp_path / "x.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    spec = declared("tagging", "ner", {"test": "x.txt"}, tag_scheme=scheme, text_join="space")
    (record,) = convert_declared(spec, tmp_path).splits["test"]
    assert record.text == "a b c d e"
    assert [(e.type, e.text) for e in record.entities] == expected


NON_UTF8 = b"\xff\xfe"
# (format, task, options, schema file content, data file content, line, message)
BAD = {
    # tagging
    "tagging_malformed": ("tagging", "ner", {}, None, "张 B-X\n三\n", 2, "expected '<token> <tag>'"),
    "tagging_unknown_tag": (
        "tagging",
        "ner",
        {"tag_scheme": "bio"},
        None,
        "a B-X\nb E-X\n",
        2,
        "unknown tag 'E-X'",
    ),
    "tagging_type_not_in_schema": (
        "tagging",
        "ner",
        {},
        '{"entities": ["X"]}',
        "a B-X\nb I-X\n\nc B-Y\n",
        4,
        "unknown entity type 'Y'",
    ),
    "tagging_bio_i_without_b": (
        "tagging",
        "ner",
        {"tag_scheme": "bio"},
        None,
        "a O\nb I-X\n",
        2,
        "without a preceding B-X",
    ),
    "tagging_bioes_unclosed": (
        "tagging",
        "ner",
        {},
        None,
        "a B-X\nb I-X\n\nc S-X\nd E-X\n",
        1,
        "missing E-X",
    ),
    "tagging_encoding": ("tagging", "ner", {}, None, b"a B-X\nb " + NON_UTF8 + b"\n", 2, "not valid UTF-8"),
    # triples
    "triples_malformed": (
        "triples",
        "re",
        {},
        None,
        '{"text": "a b", "triple_list": []}\n{"text": "a\n',
        2,
        "invalid JSON",
    ),
    "triples_malformed_array": (
        "triples",
        "re",
        {},
        None,
        '[\n {"text": "a", "triple_list": []},\n {"text": }\n]',
        3,
        "invalid JSON",
    ),
    "triples_shape": (
        "triples",
        "re",
        {},
        None,
        '{"text": "a b", "triple_list": [["a", "r"]]}\n',
        1,
        "expected [head, relation, tail]",
    ),
    "triples_span_not_in_text": (
        "triples",
        "re",
        {},
        None,
        '{"text": "a b", "triple_list": [["a", "r", "c"]]}\n',
        1,
        "tail 'c' is not in the text",
    ),
    "triples_unknown_relation": (
        "triples",
        "re",
        {},
        '{"entities": ["entity"], "relations": ["r"]}',
        '{"text": "a b", "triple_list": [["a", "r", "b"]]}\n'
        '{"text": "a b", "triple_list": [["a", "q", "b"]]}\n',
        2,
        "unknown relation type 'q'",
    ),
    "triples_encoding": (
        "triples",
        "re",
        {},
        None,
        b'{"text": "a"}\n' + NON_UTF8 + b"\n",
        2,
        "not valid UTF-8",
    ),
    # duee
    "duee_malformed": (
        "duee",
        "ee",
        {},
        None,
        '{"text": "x", "event_list": []}\n{"text": \n',
        2,
        "invalid JSON",
    ),
    "duee_span_not_in_text": (
        "duee",
        "ee",
        {},
        None,
        '{"text": "腾讯收购了搜狗", "event_list": [{"event_type": "收购", "trigger": "收购", '
        '"trigger_start_index": 3}]}\n',
        1,
        "'收购' is not in the text at trigger_start_index 3",
    ),
    "duee_span_out_of_range": (
        "duee",
        "ee",
        {},
        None,
        '{"text": "ab", "event_list": [{"event_type": "E", "trigger": "b", "trigger_start_index": 1, '
        '"arguments": [{"role": "r", "argument": "zz", "argument_start_index": 5}]}]}\n',
        1,
        "event 0 argument 0: span [5, 7) is not in the text",
    ),
    "duee_unknown_role": (
        "duee",
        "ee",
        {},
        '{"events": {"E": ["r"]}}',
        '{"text": "ab", "event_list": [{"event_type": "E", "trigger": "a", "trigger_start_index": 0, '
        '"arguments": [{"role": "q", "argument": "b", "argument_start_index": 1}]}]}\n',
        1,
        "role 'q' is not a role of event type 'E'",
    ),
    "duee_unknown_event_type": (
        "duee",
        "ee",
        {},
        '{"events": {"E": ["r"]}}',
        '{"text": "ab", "event_list": []}\n{"text": "ab", "event_list": [{"event_type": "F", "trigger": "a", '
        '"trigger_start_index": 0}]}\n',
        2,
        "unknown event type 'F'",
    ),
    "duee_encoding": ("duee", "ee", {}, None, NON_UTF8 + b"\n", 1, "not valid UTF-8"),
    # doccano
    "doccano_malformed": (
        "doccano",
        "ner",
        {},
        None,
        '{"text": "ab", "label": []}\n[1, 2]\n',
        2,
        "expected a JSON object",
    ),
    "doccano_span_not_in_text": (
        "doccano",
        "ner",
        {},
        None,
        '{"text": "ab", "label": [[1, 9, "X"]]}\n',
        1,
        "label 0: span [1, 9) is not in the text",
    ),
    "doccano_unknown_label": (
        "doccano",
        "ner",
        {},
        '{"entities": ["X"]}',
        '{"text": "ab", "label": [[0, 1, "Y"]]}\n',
        1,
        "unknown entity type 'Y'",
    ),
    "doccano_relation_ref": (
        "doccano",
        "re",
        {},
        None,
        '{"text": "ab", "entities": [{"id": 1, "label": "X", "start_offset": 0, "end_offset": 1}], '
        '"relations": [{"from_id": 1, "to_id": 2, "type": "r"}]}\n',
        1,
        "is not an entity id of this line",
    ),
    "doccano_encoding": (
        "doccano",
        "ner",
        {},
        None,
        b'{"text": "\xe4\xb8", "label": []}\n',
        1,
        "not valid UTF-8",
    ),
    # label studio
    "label_studio_malformed": (
        "label_studio",
        "ner",
        {},
        None,
        '[\n  {"data": {"text": "ab"}, "annotations": [{"result": []}]},,\n]',
        2,
        "invalid JSON",
    ),
    "label_studio_span_not_in_text": (
        "label_studio",
        "ner",
        {},
        None,
        '[\n {"data": {"text": "ab"},\n  "annotations": [{"result": [{"type": "labels", '
        '"value": {"start": 0, "end": 1, "text": "b", "labels": ["X"]}}]}]}\n]',
        2,
        "'b' is not in the text at [0, 1)",
    ),
    "label_studio_unknown_label": (
        "label_studio",
        "ner",
        {},
        '{"entities": ["X"]}',
        '[{"data": {"text": "ab"}, "annotations": [{"result": [{"type": "labels", '
        '"value": {"start": 0, "end": 1, "labels": ["Y"]}}]}]}]',
        1,
        "unknown entity type 'Y'",
    ),
    "label_studio_encoding": (
        "label_studio",
        "ner",
        {},
        None,
        b'[\n{"data": {"text": "\xff"}}\n]',
        2,
        "not valid UTF-8",
    ),
    # unified records
    "records_malformed": (
        "records",
        "ner",
        {},
        None,
        '{"task": "ner", "text": "ab"}\n{"task": "ner"}\n',
        2,
        "not a unified record",
    ),
    "records_span_not_in_text": (
        "records",
        "ner",
        {},
        None,
        '{"task": "ner", "text": "ab", "entities": [{"type": "X", "start": 0, "end": 1, "text": "b"}]}\n',
        1,
        "'b' is not in the text at [0, 1)",
    ),
    "records_unknown_label": (
        "records",
        "ner",
        {},
        '{"entities": ["X"]}',
        '{"task": "ner", "text": "ab", "entities": [{"type": "Y", "start": 0, "end": 1, "text": "a"}]}\n',
        1,
        "unknown entity type 'Y'",
    ),
    "records_encoding": ("records", "ner", {}, None, b"\n\n" + NON_UTF8, 3, "not valid UTF-8"),
}


@pytest.mark.parametrize("key", sorted(BAD))
def test_bad_input_names_file_and_line(tmp_path: Path, key: str) -> None:
    fmt, task, options, schema, content, line, message = BAD[key]
    data = tmp_path / "data.in"
    data.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    if schema is not None:
        (tmp_path / "schema.json").write_text(schema, encoding="utf-8")
    spec = declared(fmt, task, {"test": "data.in"}, "schema.json" if schema else None, **options)
    with pytest.raises(ConversionError) as info:
        convert_declared(spec, tmp_path)
    assert str(info.value).startswith(f"{data}:{line}: "), str(info.value)
    assert message in str(info.value)


def test_declarations_are_checked() -> None:
    where = "params.yaml: prepare"
    spec = {"name": "mine", "task": "ner", "format": "tagging", "files": {"train": "data/user/a.txt"}}
    assert build(PrepareConfig, {"datasets": [spec]}, where).datasets[0].name == "mine"
    cases = [
        ({**spec, "format": "conll"}, "prepare.datasets[0]: dataset 'mine': unknown format 'conll'"),
        ({**spec, "task": "re"}, "format tagging carries task ner, not 're'"),
        ({**spec, "files": {"training": "data/user/a.txt"}}, "files.training: unknown split"),
        ({**spec, "options": {"tag_scheme": "bilou"}}, "options.tag_scheme: 'bilou' is not one of"),
        ({**spec, "options": {"scheme": "bio"}}, "prepare.datasets[0].options.scheme: unknown key"),
        ({**spec, "files": {"train": "elsewhere/a.txt"}}, "must be a path under data/user/"),
        ({**spec, "files": {"train": "data/user/../raw/a.txt"}}, "must be a path under data/user/"),
        ({**spec, "name": "resume"}, "name 'resume' is already taken"),
    ]
    for entry, message in cases:
        with pytest.raises(ConfigError, match=None) as info:
            build(PrepareConfig, {"datasets": [entry]}, where)
        assert message in str(info.value), (entry, str(info.value))


def test_zero_shot_is_never_taught() -> None:
    spec = {"name": "zs", "task": "ner", "format": "tagging", "files": {"test": "data/user/zs.txt"}}
    config = build(PrepareConfig, {"datasets": [spec]}, "params.yaml: prepare")
    check_zero_shot(["zs"], ["resume"], config)
    with pytest.raises(ConfigError, match="'zs' is also in sft.datasets"):
        check_zero_shot(["zs"], ["resume", "zs"], config)
    with pytest.raises(ConfigError, match="'nope' is not a dataset"):
        check_zero_shot(["nope"], [], config)
    taught = build(
        PrepareConfig, {"datasets": [{**spec, "files": {"train": "data/user/a", "test": "data/user/b"}}]}, "p"
    )
    with pytest.raises(ConfigError, match="declares a train split"):
        check_zero_shot(["zs"], [], taught)


def test_default_task() -> None:
    assert default_task("doccano", FORMATS_DIR / "doccano_zh_rel.jsonl") == "re"
    assert default_task("doccano", FORMATS_DIR / "doccano_en.jsonl") == "ner"
    assert default_task("records", FORMATS_DIR / "records_en.jsonl") == "ner"
    assert default_task("duee", FORMATS_DIR / "duee_zh.jsonl") == "ee"


def _prepare(tmp_path: Path, env: dict, params: str) -> subprocess.CompletedProcess:
    (tmp_path / "params.yaml").write_text(params, encoding="utf-8")
    return stage_process("prepare", tmp_path, env=env, timeout=120)


PARAMS = """prepare:
  webqa_test_size: 1
  datasets:
    - name: mine
      task: re
      format: triples
      files: {train: data/user/mine/train.json, test: data/user/mine/test.jsonl}
      schema: data/user/mine/schema.json
"""


def test_prepare_stage_converts_declared_datasets(tmp_path: Path, subprocess_env) -> None:
    shutil.copytree(FIXTURES / "raw", tmp_path / "data" / "raw")
    user = tmp_path / "data" / "user" / "mine"
    user.mkdir(parents=True)
    shutil.copy(FORMATS_DIR / "triples_en.json", user / "train.json")
    (user / "test.jsonl").write_text(
        '{"text": "Ann works for Acme .", "triple_list": [["Ann", "Work_For", "Acme"]]}\n', encoding="utf-8"
    )
    shutil.copy(FORMATS_DIR / "triples_schema.json", user / "schema.json")
    proc = _prepare(tmp_path, subprocess_env, PARAMS)
    assert proc.returncode == 0, proc.stderr
    records = tmp_path / "data" / "records" / "mine"
    rows = [json.loads(x) for x in (records / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["task"], r["relations"][0]["head"]["type"]) for r in rows] == [
        ("mine-test-00000", "re", "Peop")
    ]
    assert json.loads((records / "schema.json").read_text())["entities"] == ["Peop", "Org", "Loc"]
    conversion = json.loads((records / "conversion.json").read_text())
    assert conversion["notes"]["counts"] == {"ambiguous_span": 1} and conversion["schema_inferred"] is False
    counts = json.loads((tmp_path / "metrics" / "prepare.json").read_text())
    assert counts["mine"]["train"] == {
        "records": 2,
        "entities": 5,
        "relations": 3,
        "ambiguous_spans": 1,
        "notes": {"ambiguous_span": 1},
    }
    assert "resume" in counts  # the built-in five beside it


def test_prepare_stage_fails_cleanly_on_a_bad_declared_file(tmp_path: Path, subprocess_env) -> None:
    shutil.copytree(FIXTURES / "raw", tmp_path / "data" / "raw")
    user = tmp_path / "data" / "user" / "mine"
    user.mkdir(parents=True)
    shutil.copy(FORMATS_DIR / "triples_en.json", user / "train.json")
    shutil.copy(FORMATS_DIR / "triples_schema.json", user / "schema.json")
    (user / "test.jsonl").write_text(
        '{"text": "Ann works for Acme .", "triple_list": [["Ann", "Work_For", "Acme"]]}\n'
        '{"text": "Bob works .", "triple_list": [["Bob", "Work_For", "Acme"]]}\n',
        encoding="utf-8",
    )
    proc = _prepare(tmp_path, subprocess_env, PARAMS)
    assert proc.returncode == 1
    assert "data/user/mine/test.jsonl:2: triple 0 tail 'Acme' is not in the text" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data" / "records").exists() and not (tmp_path / "metrics").exists()
    # A zero-shot dataset that SFT would also learn from: refused before anything is converted.
    proc = _prepare(
        tmp_path,
        subprocess_env,
        PARAMS + "evaluate:\n  zero_shot: [mine]\nsft:\n  datasets: [resume, mine]\n",
    )
    assert proc.returncode == 1 and "'mine' is also in sft.datasets" in proc.stderr
    assert not (tmp_path / "data" / "records").exists()


def test_chatuie_evaluate_refuses_bad_input_before_loading_a_model(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from chatuie.cli import app

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ab", "label": [[0, 1, "X"]]}\n{"text": "ab", "label": [[0, 5, "X"]]}\n')
    out = tmp_path / "pred.jsonl"
    common = ["evaluate", "--model", str(tmp_path / "no-model"), "--data", str(bad), "--out", str(out)]
    result = CliRunner().invoke(app, [*common, "--format", "doccano"])
    assert result.exit_code == 1
    assert f"error: {bad}:2: label 0: span [0, 5) is not in the text" in result.output
    result = CliRunner().invoke(app, [*common, "--format", "conll"])
    assert result.exit_code == 1 and "unknown format 'conll'" in result.output
    bad.write_text('{"text": "ab", "label": [[0, 1, "X"]]}\n')
    result = CliRunner().invoke(app, [*common, "--format", "doccano"])
    assert result.exit_code == 1 and "no-model: no such model directory" in result.output
    assert not out.exists() and not list(tmp_path.glob("pred*"))
