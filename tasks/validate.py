"""Stage `validate`: great-expectations suites over records and chat samples.

Writes reports/validation.json (every expectation's outcome), reports/validation_docs/ (GX's HTML)
and metrics/validation.json; exits 1 naming the failed expectation, table and example rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

from chatuie.data.records import load_records
from chatuie.data.validation import (
    ValidateConfig,
    failure_message,
    record_tables,
    run_suites,
    sample_tables,
)
from chatuie.io import read_jsonl, write_json
from tasks._stage import run, section


def main() -> None:
    config = section("validate", ValidateConfig)
    records = [r for path in sorted(Path("data/records").glob("*/*.jsonl")) for r in load_records(path)]
    samples = {
        split: list(read_jsonl(Path("data/samples") / f"{split}.jsonl")) for split in ("train", "dev", "test")
    }
    tables = record_tables(records, config) + sample_tables(samples, records)
    summary = run_suites(tables, Path("reports/validation_docs"), config.max_examples)
    write_json(Path("reports/validation.json"), summary)
    write_json(
        Path("metrics/validation.json"),
        {
            "tables": len(summary["tables"]),
            "expectations": summary["expectations"],
            "failed_expectations": summary["failed_expectations"],
            "success": summary["success"],
        },
    )
    if not summary["success"]:
        print(failure_message(summary), file=sys.stderr)
        sys.exit(1)
    print(f"validation passed: {summary['expectations']} expectations on {len(summary['tables'])} tables")


if __name__ == "__main__":
    run(main)
