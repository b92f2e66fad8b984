"""Stage `samples`: unified records -> chat samples (data/samples/{train,dev,test}.jsonl)."""

from __future__ import annotations

from pathlib import Path

from chatuie.data.records import load_records
from chatuie.data.samples import SamplesConfig, build_all, write_samples
from chatuie.io import write_json
from tasks._stage import run, section


def main() -> None:
    config = section("samples", SamplesConfig)
    records = [r for path in sorted(Path("data/records").glob("*/*.jsonl")) for r in load_records(path)]
    samples, counts = build_all(records, config)
    write_samples(samples, Path("data/samples"))
    write_json(Path("metrics/samples.json"), counts)
    print({split: sum(c.values()) for split, c in counts.items() if split in samples})


if __name__ == "__main__":
    run(main)
