"""The SFT stage's training mix (tasks/sft.py): dataset copies, held-out records, QA replay."""

from __future__ import annotations

from collections import Counter

import pytest

from chatuie.config import ConfigError, build
from chatuie.data.splits import HeldoutSplit
from chatuie.train.trainer import SFTStageConfig
from tasks.sft import select_samples


def _samples() -> list[dict]:
    return [
        {"dataset": dataset, "record_id": f"{dataset}-{i}", "id": f"{dataset}-{i}"}
        for dataset in ("resume", "conll04", "webqa")
        for i in range(50)
    ]


def test_repeats_copy_a_dataset_and_replay_follows_the_mix() -> None:
    base = dict(datasets=["resume", "conll04"], heldout=HeldoutSplit(0.0, 13), qa_replay_fraction=0.1)
    once = Counter(s["dataset"] for s in select_samples(_samples(), SFTStageConfig(**base)))
    thrice = Counter(
        s["dataset"] for s in select_samples(_samples(), SFTStageConfig(**base, repeats={"conll04": 3}))
    )
    assert once == {"resume": 50, "conll04": 50, "webqa": 10}
    assert thrice == {"resume": 50, "conll04": 150, "webqa": 20}


@pytest.mark.parametrize(
    ("repeats", "message"),
    [({"fewfc": 2}, r"sft\.repeats\.fewfc: not one of sft\.datasets"), ({"conll04": 0}, r"integer >= 1")],
)
def test_bad_repeats_name_the_field(repeats: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(SFTStageConfig, {"datasets": ["resume", "conll04"], "repeats": repeats}, "params.yaml: sft")
