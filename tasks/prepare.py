"""Stage `prepare`: raw datasets -> unified records (data/records/) + counts (metrics/prepare.json)."""

from __future__ import annotations

from pathlib import Path

from _stage import run, section

from chatuie.io import write_json
from chatuie.prepare import PrepareConfig, convert_all, write_records


def main() -> None:
    config = section("prepare", PrepareConfig)
    converted = convert_all(Path("data/raw"), config)
    counts = write_records(converted, Path("data/records"))
    write_json(Path("metrics/prepare.json"), counts)
    for dataset, splits in counts.items():
        print(dataset, {split: c["records"] for split, c in splits.items()})


if __name__ == "__main__":
    run(main)
