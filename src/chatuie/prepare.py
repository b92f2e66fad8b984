"""The ``prepare`` stage's library side: raw datasets -> unified records, and their counts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatuie.converters import ceval, conll04, fewfc, resume, webqa
from chatuie.io import write_jsonl
from chatuie.records import Record


@dataclass(frozen=True)
class PrepareConfig:
    """``prepare`` section of params.yaml."""

    webqa_test_size: int = 1000
    seed: int = 13


def _converters(config: PrepareConfig) -> dict[str, tuple[str, Callable[[Path], dict[str, list[Record]]]]]:
    """dataset name -> (raw folder under data/raw, converter)."""
    return {
        "resume": ("resume_ner", resume.convert),
        "conll04": ("conll04", conll04.convert),
        "fewfc": ("fewfc", fewfc.convert),
        "webqa": ("webqa", lambda d: webqa.convert(d, config.webqa_test_size, config.seed)),
        "ceval": ("ceval", ceval.convert),
    }


def convert_all(raw_dir: Path, config: PrepareConfig) -> dict[str, dict[str, list[Record]]]:
    """Every dataset converted in memory (a bad raw line raises before anything is written)."""
    return {name: convert(raw_dir / folder) for name, (folder, convert) in _converters(config).items()}


def record_counts(records: list[Record]) -> dict[str, int]:
    counts = {"records": len(records)}
    task = records[0].task if records else ""
    if task in ("ner", "re"):
        counts["entities"] = sum(len(r.entities) for r in records)
    if task == "re":
        counts["relations"] = sum(len(r.relations) for r in records)
    if task == "ee":
        counts["events"] = sum(len(r.events) for r in records)
        counts["arguments"] = sum(len(e.arguments) for r in records for e in r.events)
    if task == "qa":
        counts["answers_not_in_evidence"] = sum(not r.meta.get("answer_in_text", True) for r in records)
    repaired = sum("repaired" in r.meta for r in records)
    if repaired:
        counts["repaired"] = repaired
    return counts


def write_records(converted: dict[str, dict[str, list[Record]]], out_dir: Path) -> dict[str, Any]:
    """Write ``<out_dir>/<dataset>/<split>.jsonl`` for every table; return the counts."""
    counts: dict[str, Any] = {}
    for dataset, splits in converted.items():
        counts[dataset] = {}
        for split, records in splits.items():
            write_jsonl(out_dir / dataset / f"{split}.jsonl", (r.to_dict() for r in records))
            counts[dataset][split] = record_counts(records)
    return counts


def load_records(path: Path) -> list[Record]:
    from chatuie.io import read_jsonl

    return [Record.from_dict(row) for row in read_jsonl(path)]
