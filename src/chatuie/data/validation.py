"""Data validation with great-expectations 1.x: an expectation suite per prepared table.

Tables are pandas frames derived from the records and chat samples (one row per record, span
or sample). Derived columns (``sliced = text[start:end]``, ``in_schema``...) turn per-row
Python facts into columns GX can check; GX does the checking, the reporting and the HTML docs.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from chatuie.data.answers import ground
from chatuie.data.records import TASKS, Record, Schema
from chatuie.errors import ChatuieError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidateConfig:
    """``validate`` section of params.yaml: expected record counts as ``[min, max]`` per table."""

    expected_counts: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    max_examples: int = 5


@dataclass
class Table:
    name: str
    frame: pd.DataFrame
    expectations: list[Any]
    id_column: str = "id"


class ValidationFailed(ChatuieError, RuntimeError):
    """The data broke an expectation; the message names the table and what failed."""


def _gx():
    import great_expectations as gx

    return gx


# ---------------------------------------------------------------- tables


def _labels_of(schema: Schema) -> set[str]:
    labels = {f"entity:{x}" for x in schema.entities} | {f"relation:{x}" for x in schema.relations}
    for event_type, roles in schema.events.items():
        labels.add(f"event:{event_type}")
        labels |= {f"role:{event_type}:{role}" for role in roles}
    return labels


def _span_rows(record: Record) -> Iterable[dict[str, Any]]:
    def row(kind: str, label: str, start: int, end: int, span: str) -> dict[str, Any]:
        return {
            "record_id": record.id,
            "split": record.split,
            "kind": kind,
            "label": label,
            "start": start,
            "end": end,
            "span_text": span,
            "sliced": record.text[start:end],
            "text_length": len(record.text),
        }

    for e in record.entities:
        yield row("entity", f"entity:{e.type}", e.start, e.end, e.text)
    for r in record.relations:
        yield row("relation", f"relation:{r.type}", r.head.start, r.head.end, r.head.text)
        yield row("relation", f"relation:{r.type}", r.tail.start, r.tail.end, r.tail.text)
    for ev in record.events:
        yield row("trigger", f"event:{ev.type}", ev.trigger.start, ev.trigger.end, ev.trigger.text)
        for a in ev.arguments:
            yield row("argument", f"role:{ev.type}:{a.role}", a.start, a.end, a.text)


def record_tables(records: list[Record], config: ValidateConfig) -> list[Table]:
    gxe = _gx().expectations
    tables: list[Table] = []
    frame = pd.DataFrame(
        [
            {"id": r.id, "dataset": r.dataset, "split": r.split, "task": r.task, "text": r.text}
            for r in records
        ]
    )
    tables.append(
        Table(
            "records",
            frame,
            [
                gxe.ExpectColumnValuesToBeUnique(column="id"),
                gxe.ExpectColumnValuesToBeInSet(column="task", value_set=list(TASKS)),
                gxe.ExpectColumnValuesToNotBeNull(column="text"),
                gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=r"^\s*$"),
            ],
        )
    )
    by_table: dict[tuple[str, str], list[Record]] = {}
    for r in records:
        by_table.setdefault((r.dataset, r.split), []).append(r)
    for (dataset, split), rows in sorted(by_table.items()):
        expected = config.expected_counts.get(dataset, {}).get(split)
        checks = []
        if expected:
            checks.append(gxe.ExpectTableRowCountToBeBetween(min_value=expected[0], max_value=expected[1]))
        else:
            checks.append(gxe.ExpectTableRowCountToBeBetween(min_value=1))
        tables.append(Table(f"records.{dataset}.{split}", pd.DataFrame({"id": [r.id for r in rows]}), checks))

    for dataset in sorted({r.dataset for r in records}):
        rows = [r for r in records if r.dataset == dataset]
        if rows[0].task in ("ner", "re", "ee"):
            span_rows = []
            for r in rows:
                allowed = _labels_of(r.schema)
                for s in _span_rows(r):
                    s["in_schema"] = s["label"] in allowed
                    span_rows.append(s)
            frame = pd.DataFrame(span_rows)
            label_set = sorted(set().union(*(_labels_of(r.schema) for r in rows)))
            tables.append(
                Table(
                    f"spans.{dataset}",
                    frame,
                    [
                        gxe.ExpectColumnPairValuesToBeEqual(column_A="span_text", column_B="sliced"),
                        gxe.ExpectColumnPairValuesAToBeGreaterThanB(column_A="end", column_B="start"),
                        gxe.ExpectColumnValuesToBeBetween(column="start", min_value=0),
                        gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                            column_A="text_length", column_B="end", or_equal=True
                        ),
                        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=label_set),
                        gxe.ExpectColumnValuesToBeInSet(column="in_schema", value_set=[True]),
                    ],
                    id_column="record_id",
                )
            )
        elif rows[0].task == "mcq":
            frame = pd.DataFrame(
                [
                    {
                        "id": r.id,
                        "answer": r.answer,
                        "answer_option": (r.options or {}).get(r.answer or "", None) or None,
                    }
                    for r in rows
                ]
            )
            tables.append(
                Table(
                    f"mcq.{dataset}",
                    frame,
                    [
                        gxe.ExpectColumnValuesToBeInSet(column="answer", value_set=["A", "B", "C", "D"]),
                        gxe.ExpectColumnValuesToNotBeNull(column="answer_option"),
                    ],
                )
            )
        elif rows[0].task == "qa":
            frame = pd.DataFrame(
                [
                    {
                        "id": r.id,
                        "question": r.question,
                        "answer": r.answer,
                        "answer_in_text": bool(r.meta.get("answer_in_text")),
                    }
                    for r in rows
                ]
            )
            tables.append(
                Table(
                    f"qa.{dataset}",
                    frame,
                    [
                        gxe.ExpectColumnValuesToNotMatchRegex(column="question", regex=r"^\s*$"),
                        gxe.ExpectColumnValuesToNotMatchRegex(column="answer", regex=r"^\s*$"),
                        # 18 of 3,024 WebQA answers are not in their evidence: known and kept.
                        gxe.ExpectColumnValuesToBeInSet(
                            column="answer_in_text", value_set=[True], mostly=0.99
                        ),
                    ],
                )
            )
    return tables


def sample_tables(samples: dict[str, list[dict]], records: list[Record]) -> list[Table]:
    gxe = _gx().expectations
    by_id = {r.id: r for r in records}
    held_out = sorted(
        {f"{r.dataset}\x1f{r.text}" for s in ("dev", "test") for r in records if _feeds(r) == s}
    )
    tables = []
    for split, rows in samples.items():
        frame_rows = []
        for s in rows:
            record = by_id.get(s["record_id"])
            roles = [m["role"] for m in s["messages"]]
            answer = s["messages"][-1]["content"] if roles and roles[-1] == "assistant" else ""
            grounded = True
            if s["task"] in ("ner", "re", "ee") and record is not None:
                try:
                    grounded = (
                        ground(s["task"], answer, record.text, Schema.from_dict(s["schema"]))["dropped"] == 0
                    )
                except ValueError:
                    grounded = False
            frame_rows.append(
                {
                    "id": s["id"],
                    "record_id": s["record_id"],
                    "roles": "/".join(roles),
                    "answer": answer,
                    "answer_grounded": grounded,
                    "has_record": record is not None,
                    "dataset_text": f"{s['dataset']}\x1f{record.text if record else ''}",
                }
            )
        frame = pd.DataFrame(frame_rows)
        checks = [
            gxe.ExpectTableRowCountToBeBetween(min_value=1),
            gxe.ExpectColumnValuesToBeUnique(column="id"),
            gxe.ExpectColumnValuesToBeInSet(
                column="roles", value_set=["system/user/assistant", "user/assistant"]
            ),
            gxe.ExpectColumnValuesToNotMatchRegex(column="answer", regex=r"^\s*$"),
            gxe.ExpectColumnValuesToBeInSet(column="answer_grounded", value_set=[True]),
            gxe.ExpectColumnValuesToBeInSet(column="has_record", value_set=[True]),
        ]
        if split == "train":
            checks.append(gxe.ExpectColumnValuesToNotBeInSet(column="dataset_text", value_set=held_out))
        tables.append(Table(f"samples.{split}", frame, checks))
    return tables


def _feeds(record: Record) -> str:
    from chatuie.data.samples import sample_split

    return sample_split(record)


# ---------------------------------------------------------------- running


def _summarise(table: Table, result: Any, max_examples: int) -> dict[str, Any]:
    expectations = []
    for r in result.results:
        config = r.expectation_config
        kwargs = {k: v for k, v in config.kwargs.items() if k not in ("value_set", "batch_id")}
        entry: dict[str, Any] = {"expectation": config.type, "kwargs": kwargs, "success": bool(r.success)}
        res = r.result or {}
        if "unexpected_count" in res:
            entry["unexpected_count"] = int(res["unexpected_count"] or 0)
        if "observed_value" in res:
            entry["observed_value"] = res["observed_value"]
        if not r.success:
            index = list(res.get("unexpected_index_list") or [])[:max_examples]
            if index and table.id_column in table.frame.columns:
                entry["example_rows"] = [
                    {
                        k: _plain(v)
                        for k, v in table.frame.loc[i].items()
                        if k in (table.id_column, "label", "span_text", "sliced", "answer", "dataset_text")
                    }
                    for i in index
                    if not isinstance(i, dict)
                ]
            else:
                entry["examples"] = [
                    _plain(x) for x in (res.get("partial_unexpected_list") or [])[:max_examples]
                ]
        expectations.append(entry)
    return {"rows": len(table.frame), "success": bool(result.success), "expectations": expectations}


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def run_suites(tables: list[Table], docs_dir: Path | None, max_examples: int = 5) -> dict[str, Any]:
    """Validate every table; build GX data docs into ``docs_dir``; return the JSON summary."""
    gx = _gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    staging = None
    if docs_dir is not None:
        staging = Path(tempfile.mkdtemp(prefix="gx-docs-"))
        for site in list(context.get_docs_sites_urls()):
            context.delete_data_docs_site(site["site_name"])
        context.add_data_docs_site(
            site_name="chatuie",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(staging),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    source = context.data_sources.add_pandas("chatuie")
    summary: dict[str, Any] = {"tables": {}}
    for table in tables:
        asset = source.add_dataframe_asset(table.name)
        batch = asset.add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=table.name))
        for expectation in table.expectations:
            suite.add_expectation(expectation)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=table.name, data=batch, suite=suite)
        )
        actions = [gx.checkpoint.UpdateDataDocsAction(name="docs")] if docs_dir is not None else []
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"check.{table.name}",
                validation_definitions=[definition],
                actions=actions,
                result_format={"result_format": "COMPLETE"},
            )
        )
        run = checkpoint.run(batch_parameters={"dataframe": table.frame})
        (result,) = run.run_results.values()
        summary["tables"][table.name] = _summarise(table, result, max_examples)
        log.info("validated %s: %s", table.name, "ok" if result.success else "FAILED")
    summary["success"] = all(t["success"] for t in summary["tables"].values())
    summary["expectations"] = sum(len(t["expectations"]) for t in summary["tables"].values())
    summary["failed_expectations"] = sum(
        1 for t in summary["tables"].values() for e in t["expectations"] if not e["success"]
    )
    if docs_dir is not None and staging is not None:
        if docs_dir.exists():
            shutil.rmtree(docs_dir)
        shutil.move(str(staging), str(docs_dir))
    return summary


def failure_message(summary: dict[str, Any]) -> str:
    lines = [f"validation failed: {summary['failed_expectations']} expectation(s)"]
    for name, table in summary["tables"].items():
        for e in table["expectations"]:
            if e["success"]:
                continue
            column = e["kwargs"].get("column") or (
                f"{e['kwargs'].get('column_A')}/{e['kwargs'].get('column_B')}"
                if "column_A" in e["kwargs"]
                else ""
            )
            detail = f"{e.get('unexpected_count', '?')} unexpected"
            if "observed_value" in e:
                detail = f"observed {e['observed_value']}"
            examples = e.get("example_rows") or e.get("examples") or []
            lines.append(
                f"  table {name}: {e['expectation']}({column}) failed, {detail}; examples: {examples}"
            )
    return "\n".join(lines)
