"""The ``prepare`` stage's library side: raw datasets -> unified records, and their counts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from chatuie.config import ConfigError
from chatuie.data.converters import ceval, conll04, fewfc, resume, webqa
from chatuie.data.converters.formats import DeclaredDataset, DeclaredResult, convert_declared, notes_summary
from chatuie.data.records import Record
from chatuie.io import write_json, write_jsonl

log = logging.getLogger(__name__)
BUILTIN = ("resume", "conll04", "fewfc", "webqa", "ceval")
# Declared datasets' files live here: the folder is a dependency of the prepare stage (dvc.yaml).
USER_DATA = "data/user"


@dataclass(frozen=True)
class PrepareConfig:
    """``prepare`` section of params.yaml."""

    webqa_test_size: int = 1000
    seed: int = 13
    # Your own data (docs/datasets.md): converted beside the built-in five.
    datasets: list[DeclaredDataset] = field(default_factory=list)

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for spec in self.datasets:
            where = f"params.yaml: prepare.datasets ({spec.name})"
            if spec.name in BUILTIN or spec.name in seen:
                raise ConfigError(f"{where}: name {spec.name!r} is already taken")
            seen.add(spec.name)
            for path in spec.paths():
                pure = PurePosixPath(path)
                if pure.is_absolute() or ".." in pure.parts or pure.parts[:2] != tuple(USER_DATA.split("/")):
                    raise ConfigError(
                        f"{where}: {path}: must be a path under {USER_DATA}/ (the folder the prepare "
                        "stage depends on; see docs/datasets.md)"
                    )


def check_zero_shot(zero_shot: list[str], sft_datasets: list[str], config: PrepareConfig) -> None:
    """Zero-shot datasets are never taught: not in ``sft.datasets``, no train split, and known."""
    declared = {d.name: d for d in config.datasets}
    for name in zero_shot:
        where = f"params.yaml: evaluate.zero_shot: {name!r}"
        if name in sft_datasets:
            raise ConfigError(f"{where} is also in sft.datasets (zero-shot data is never taught)")
        if name not in declared and name not in BUILTIN:
            raise ConfigError(f"{where} is not a dataset (declare it in prepare.datasets)")
        if name in declared and "test" not in declared[name].files:
            raise ConfigError(f"{where} has no test split (prepare.datasets files.test)")
        if name in declared and "train" in declared[name].files:
            raise ConfigError(f"{where} declares a train split: zero-shot data is never taught, leave it out")


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
    """Every built-in dataset converted in memory (a bad raw line raises before anything is written)."""
    return {name: convert(raw_dir / folder) for name, (folder, convert) in _converters(config).items()}


def convert_user(config: PrepareConfig, root: Path = Path(".")) -> dict[str, DeclaredResult]:
    """Every declared dataset converted in memory."""
    return {spec.name: convert_declared(spec, root) for spec in config.datasets}


def write_user_extras(results: dict[str, DeclaredResult], out_dir: Path, counts: dict[str, Any]) -> None:
    """Beside each declared dataset's records: ``schema.json`` (given or inferred, as a schema
    file) and ``conversion.json`` (counted notes, the first ones located); notes join the counts."""
    for name, result in results.items():
        write_json(out_dir / name / "schema.json", result.schema)
        every = [note for notes in result.notes.values() for note in notes]
        write_json(
            out_dir / name / "conversion.json",
            {"schema_inferred": result.inferred, "notes": notes_summary(every)},
        )
        for split, notes in result.notes.items():
            summary = notes_summary(notes)
            if summary["counts"]:
                counts[name][split]["notes"] = summary["counts"]
        for note in every[:5]:
            log.warning("%s: %s: %s (%s)", name, note.where, note.detail, note.kind)
        if len(every) > 5:
            log.warning("%s: %d notes in all (%s)", name, len(every), out_dir / name / "conversion.json")


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
    ambiguous = sum(r.meta.get("ambiguous_spans", 0) for r in records)
    if ambiguous:
        counts["ambiguous_spans"] = ambiguous
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
