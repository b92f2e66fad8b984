"""End to end: the real pipeline (`dvc repro`) on the smoke profile, and what it must guarantee."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pipeline_repo import run

pytestmark = pytest.mark.slow


def _metrics(repo: Path, name: str) -> dict:
    return json.loads((repo / "metrics" / f"{name}.json").read_text())


def test_every_model_is_evaluated_with_and_without_the_constraint(smoke_repo: Path) -> None:
    for model in ("base", "sft"):
        metrics = _metrics(smoke_repo, model)
        for dataset in ("resume", "conll04", "fewfc"):
            constrained = metrics["ie"][dataset]["constrained"]
            assert constrained["json_validity"] == 100.0
            assert constrained["invented_span_rate"] == 0.0
            assert "free" in metrics["ie"][dataset]
        assert 0 <= metrics["chat"]["ceval"]["accuracy"] <= 100
        assert "rouge1_char_f1" in metrics["chat"]["webqa"]
        assert (smoke_repo / "reports" / "eval" / model / "per_label.csv").exists()


def test_constrained_predictions_are_grounded(smoke_repo: Path) -> None:
    path = smoke_repo / "reports" / "eval" / "sft" / "predictions.resume.constrained.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows
    for row in rows:
        for entity in row["pred"]["entities"]:
            assert row["text"][entity["start"] : entity["end"]] == entity["text"]


def test_training_wrote_loss_curves_and_metrics_show_them(smoke_repo: Path) -> None:
    for stage in ("base", "sft"):
        lines = (smoke_repo / "metrics" / "train" / f"{stage}_loss.csv").read_text().splitlines()
        assert lines[0] == "step,loss" and len(lines) > 2
    shown = run(["dvc", "metrics", "show", "--json"], smoke_repo).stdout
    assert "metrics/sft.json" in shown and "metrics/train/sft.json" in shown
    plots = run(["dvc", "plots", "show", "--json"], smoke_repo).stdout
    assert "sft_loss.csv" in plots


def test_rerun_is_up_to_date_and_forced_eval_is_deterministic(smoke_repo: Path) -> None:
    status = run(["dvc", "status"], smoke_repo).stdout
    assert "up to date" in status
    before = _metrics(smoke_repo, "sft")
    run(["dvc", "repro", "--force", "--single-item", "evaluate@sft"], smoke_repo)
    after = _metrics(smoke_repo, "sft")
    before.pop("seconds"), after.pop("seconds")
    assert after == before
