"""C-Eval: one CSV per subject and split, header ``id,question,A,B,C,D,answer[,explanation]``.

``dev`` (5 per subject) serves as few-shot exemplars and chat training data, ``val`` for
evaluation. ``test`` has no answers and is not converted.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from chatuie.data.converters._raw import load_json_document, read_text
from chatuie.data.records import ConversionError, Record

DATASET = "ceval"
SPLITS = ("dev", "val")
LETTERS = ("A", "B", "C", "D")


def _read_csv(path: Path, split: str, subject: str, category: str) -> list[Record]:
    reader = csv.reader(io.StringIO(read_text(path)))
    header = next(reader, None)
    expected = ["id", "question", *LETTERS, "answer"]
    if header is None or header[: len(expected)] != expected:
        raise ConversionError(path, 1, f"expected header starting {','.join(expected)}, got {header!r}")
    records = []
    for row in reader:
        line = reader.line_num
        if len(row) != len(header):
            raise ConversionError(path, line, f"expected {len(header)} columns, got {len(row)}")
        cells = dict(zip(header, row, strict=True))
        if cells["answer"] not in LETTERS:
            raise ConversionError(path, line, f"answer must be one of A/B/C/D, got {cells['answer']!r}")
        if not cells["question"].strip():
            raise ConversionError(path, line, "empty question")
        meta = {"subject": subject, "category": category}
        if cells.get("explanation"):
            meta["explanation"] = cells["explanation"]
        records.append(
            Record(
                id=f"{DATASET}-{split}-{subject}-{cells['id']}",
                dataset=DATASET,
                split=split,
                task="mcq",
                text=cells["question"],
                question=cells["question"],
                options={letter: cells[letter] for letter in LETTERS},
                answer=cells["answer"],
                meta=meta,
            )
        )
    return records


def convert(raw_dir: Path) -> dict[str, list[Record]]:
    mapping_path = raw_dir / "subject_mapping.json"
    mapping = load_json_document(mapping_path)
    out: dict[str, list[Record]] = {}
    for split in SPLITS:
        records: list[Record] = []
        for path in sorted((raw_dir / split).glob(f"*_{split}.csv")):
            subject = path.name.removesuffix(f"_{split}.csv")
            if subject not in mapping:
                raise ConversionError(mapping_path, None, f"no entry for subject {subject!r} ({path.name})")
            records.extend(_read_csv(path, split, subject, mapping[subject][2]))
        out[split] = records
    return out
