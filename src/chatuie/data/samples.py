"""The ``samples`` stage's library side: unified records -> chat samples, one JSONL per split."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatuie.data.prompts import ChatOptions, build_samples
from chatuie.data.records import Record
from chatuie.io import write_jsonl

# Which sample split a record split feeds. C-Eval's dev (5 per subject) is training material,
# its val is the evaluation set.
SAMPLE_SPLIT = {"train": "train", "dev": "dev", "test": "test", "val": "test"}
SAMPLE_SPLIT_BY_DATASET = {("ceval", "dev"): "train"}


@dataclass(frozen=True)
class SamplesConfig:
    """``samples`` section of params.yaml."""

    chat: ChatOptions = field(default_factory=ChatOptions)
    # Drop training records whose text also occurs in a dev/test record of the same dataset.
    decontaminate: bool = True


def sample_split(record: Record) -> str:
    return SAMPLE_SPLIT_BY_DATASET.get((record.dataset, record.split), SAMPLE_SPLIT[record.split])


def build_all(records: list[Record], config: SamplesConfig) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    held_out: dict[str, set[str]] = defaultdict(set)
    for record in records:
        if sample_split(record) != "train":
            held_out[record.dataset].add(record.text)
    out: dict[str, list[dict]] = {"train": [], "dev": [], "test": []}
    dropped: Counter[str] = Counter()
    for record in records:
        split = sample_split(record)
        if split == "train" and config.decontaminate and record.text in held_out[record.dataset]:
            dropped[record.dataset] += 1
            continue
        for sample in build_samples(record, config.chat, train=split == "train"):
            out[split].append({**sample, "split": split})
    counts: dict[str, Any] = {
        split: dict(sorted(Counter(s["dataset"] for s in rows).items())) for split, rows in out.items()
    }
    counts["decontaminated_train_records"] = dict(sorted(dropped.items()))
    return out, counts


def write_samples(samples: dict[str, list[dict]], out_dir: Path) -> None:
    for split, rows in samples.items():
        write_jsonl(out_dir / f"{split}.jsonl", rows)
