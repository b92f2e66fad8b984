"""End to end: the real pipeline (`dvc repro`) on the smoke profile, and what it must guarantee."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.pipeline_repo import run, up_to_date

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
    assert up_to_date(status), status
    before = _metrics(smoke_repo, "sft")
    run(["dvc", "repro", "--force", "--single-item", "evaluate@sft"], smoke_repo)
    after = _metrics(smoke_repo, "sft")
    before.pop("seconds"), after.pop("seconds")
    assert after == before


def test_declared_datasets_are_taught_scored_and_reported(smoke_repo: Path) -> None:
    """The smoke profile declares smoke_ner (doccano; SFT and evaluate) and smoke_re (triples with
    a schema file; zero-shot only), under data/user/smoke tracked with `dvc add`."""
    from chatuie.config import build, load_params
    from chatuie.io import read_jsonl
    from chatuie.train.trainer import SFTStageConfig
    from tasks.sft import select_samples

    records = smoke_repo / "data" / "records"
    assert json.loads((records / "smoke_re" / "schema.json").read_text())["relations"][0] == {
        "type": "Work_For",
        "head": "Peop",
        "tail": "Org",
    }
    assert json.loads((records / "smoke_ner" / "schema.json").read_text()) == {
        "entities": ["LOC", "ORG", "PER"]
    }
    prepare = _metrics(smoke_repo, "prepare")
    assert prepare["smoke_ner"]["train"]["records"] == 8 and prepare["smoke_re"] == {
        "test": {"records": 3, "entities": 6, "relations": 3}
    }
    params = load_params(smoke_repo / "params.yaml")
    taught = select_samples(
        list(read_jsonl(smoke_repo / "data" / "samples" / "train.jsonl")),
        build(SFTStageConfig, params["sft"], "sft"),
    )
    assert {s["dataset"] for s in taught} >= {"smoke_ner", "resume"}
    assert "smoke_re" not in {s["dataset"] for s in taught}
    for model in ("base", "sft", "rl"):
        metrics = _metrics(smoke_repo, model)
        assert set(metrics["ie"]) == {"resume", "conll04", "fewfc", "smoke_ner"}
        assert set(metrics["zero_shot"]) == {"smoke_re"}
        zero = metrics["zero_shot"]["smoke_re"]["constrained"]
        assert zero["records"] == 3 and zero["invented_span_rate"] == 0.0 and "relation_strict" in zero
        assert metrics["summary"]["zero_shot_f1_smoke_re_constrained"] == zero["f1"]
    report = (smoke_repo / "reports" / "report.md").read_text()
    zero_table = report.split("Zero-shot IE F1")[1].split("\n## ")[0]
    assert "| smoke_re | re (relation_strict) | 3 |" in zero_table
    assert "smoke_ner" in report.split("Zero-shot IE F1")[0]


def test_chatuie_evaluate_matches_the_pipeline(smoke_repo: Path, tmp_path: Path) -> None:
    """`chatuie evaluate` on the zero-shot file: the same metrics (counts of predicted spans
    included) and the same predictions as evaluate@sft; the predictions render in `chatuie view`."""
    import sys

    from chatuie.cli import _f1_text

    out = tmp_path / "pred.jsonl"
    proc = run(
        [
            sys.executable, "-m", "chatuie.cli", "evaluate",
            "--model", "models/sft",
            "--data", "data/user/smoke/re_test.json",
            "--format", "triples",
            "--schema", "data/user/smoke/re_schema.json",
            "--name", "smoke_re",
            "--out", str(out), "--json",
        ],
        smoke_repo,
    )  # fmt: skip
    printed = json.loads(proc.stdout)["smoke_re"]
    pipeline = _metrics(smoke_repo, "sft")["zero_shot"]["smoke_re"]
    assert printed == pipeline and pipeline["constrained"]["spans"] > 0
    for mode in ("constrained", "free"):
        mine = out.with_name(f"pred.{mode}.jsonl").read_text()
        assert mine == (smoke_repo / "reports/eval/sft" / f"predictions.smoke_re.{mode}.jsonl").read_text()
    table = _f1_text("smoke_re", "re", printed)
    assert f"{pipeline['constrained']['f1']:.2f}" in table and "relation_boundary F1" in table
    view = tmp_path / "view.html"
    run(
        [
            sys.executable,
            "-m",
            "chatuie.cli",
            "view",
            str(out.with_name("pred.constrained.jsonl")),
            "-o",
            str(view),
        ],
        smoke_repo,
    )
    assert view.read_text().count("Prague") >= 1
