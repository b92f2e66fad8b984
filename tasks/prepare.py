"""Stage `prepare`: raw datasets -> unified records (data/records/) + counts (metrics/prepare.json)."""

from __future__ import annotations

from pathlib import Path

from chatuie.config import load_params
from chatuie.data.prepare import (
    PrepareConfig,
    check_zero_shot,
    convert_all,
    convert_user,
    write_records,
    write_user_extras,
)
from chatuie.io import write_json
from tasks._stage import run, section


def main() -> None:
    config = section("prepare", PrepareConfig)
    # Refused here, before any training: evaluate.zero_shot against sft.datasets (dvc.yaml lists both).
    params = load_params(Path("params.yaml"))
    check_zero_shot(
        list((params.get("evaluate") or {}).get("zero_shot") or []),
        list((params.get("sft") or {}).get("datasets") or []),
        config,
    )
    converted = convert_all(Path("data/raw"), config)
    user = convert_user(config)
    converted.update({name: result.splits for name, result in user.items()})
    counts = write_records(converted, Path("data/records"))
    write_user_extras(user, Path("data/records"), counts)
    write_json(Path("metrics/prepare.json"), counts)
    for dataset, splits in counts.items():
        print(dataset, {split: c["records"] for split, c in splits.items()})


if __name__ == "__main__":
    run(main)
