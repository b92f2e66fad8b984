"""WebQA annotated test set (``me_test.ann.json``): question + one evidence passage + answer.

Only this file exists in the release we have, so it is split deterministically (by a hash of the
question id, independent of file order) into a ``train`` part, used to teach the tiny default
model to answer, and a held-back ``test`` part for chat evaluation. 18 answers do not occur in
their evidence; they are kept and flagged with ``meta.answer_in_text = false``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from chatuie.data.converters._raw import load_json_document
from chatuie.data.records import ConversionError, Record

DATASET = "webqa"
FILE = "me_test.ann.json"


def _rank(question_id: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{question_id}".encode()).hexdigest()


def convert(raw_dir: Path, test_size: int = 1000, seed: int = 13) -> dict[str, list[Record]]:
    path = raw_dir / FILE
    data = load_json_document(path)
    if not isinstance(data, dict):
        raise ConversionError(path, 1, f"expected a JSON object of questions, got {type(data).__name__}")
    if not 0 < test_size < len(data):
        raise ValueError(f"prepare.webqa.test_size={test_size} must be in (0, {len(data)})")
    records = []
    for question_id, item in data.items():
        where = f"question {question_id}"
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            raise ConversionError(path, None, f"{where}: missing 'question' string")
        evidences = item.get("evidences")
        if not isinstance(evidences, dict) or len(evidences) != 1:
            raise ConversionError(path, None, f"{where}: expected exactly one evidence")
        ((evidence_id, evidence),) = evidences.items()
        answers = evidence.get("answer") if isinstance(evidence, dict) else None
        text = evidence.get("evidence") if isinstance(evidence, dict) else None
        if not (isinstance(answers, list) and len(answers) == 1 and isinstance(answers[0], str)):
            raise ConversionError(path, None, f"{where}: expected one answer string, got {answers!r}")
        if not isinstance(text, str) or not text.strip():
            raise ConversionError(path, None, f"{where}: empty evidence")
        records.append(
            Record(
                id=f"{DATASET}-{question_id}",
                dataset=DATASET,
                split="",
                task="qa",
                text=text,
                question=item["question"],
                answer=answers[0],
                meta={"evidence_id": evidence_id, "answer_in_text": answers[0] in text},
            )
        )
    ranked = sorted(records, key=lambda r: _rank(r.id, seed))
    test_ids = {r.id for r in ranked[:test_size]}
    out: dict[str, list[Record]] = {"train": [], "test": []}
    for record in sorted(records, key=lambda r: r.id):
        record.split = "test" if record.id in test_ids else "train"
        out[record.split].append(record)
    return out
