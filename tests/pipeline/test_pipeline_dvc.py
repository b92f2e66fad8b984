"""The real pipeline: `dvc pull` + `dvc repro validate` in a temporary git repo."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.helpers.pipeline_repo import make_repo, run, up_to_date


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("pipeline"))


@pytest.mark.slow
def test_dvc_pull_and_repro_validate(pipeline_repo: Path, subprocess_env) -> None:
    env = subprocess_env
    assert sum(1 for p in (pipeline_repo / "data" / "raw").rglob("*") if p.is_file()) == 182

    run(["dvc", "repro", "validate"], pipeline_repo, env)
    summary = json.loads((pipeline_repo / "reports" / "validation.json").read_text())
    assert summary["success"] and summary["failed_expectations"] == 0
    assert (pipeline_repo / "reports" / "validation_docs" / "index.html").exists()
    for split in ("train", "dev", "test"):
        assert (pipeline_repo / "data" / "samples" / f"{split}.jsonl").stat().st_size > 0

    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], pipeline_repo, env).stdout)
    (workspace,) = metrics.values()
    prepare = workspace["data"]["metrics/prepare.json"]["data"]
    assert prepare["resume"]["train"] == {"records": 3821, "entities": 13438, "repaired": 4}
    assert prepare["conll04"]["test"]["relations"] == 422
    assert prepare["fewfc"]["train"]["records"] == 7185

    start = time.monotonic()
    again = run(["dvc", "repro", "validate"], pipeline_repo, env)
    elapsed = time.monotonic() - start
    assert up_to_date(again.stdout), again.stdout
    print(f"second `dvc repro validate`: {elapsed:.2f}s")  # measured, not asserted (see bench/)


@pytest.mark.slow
def test_changed_param_reruns_only_downstream(pipeline_repo: Path, subprocess_env) -> None:
    params = pipeline_repo / "params.yaml"
    text, changed = re.subn(r"absent_label_rate: [0-9.]+", "absent_label_rate: 0.125", params.read_text())
    assert changed == 1
    params.write_text(text)
    proc = run(["dvc", "repro", "validate"], pipeline_repo, subprocess_env)
    assert "Stage 'prepare' didn't change, skipping" in proc.stdout
    assert "Running stage 'samples'" in proc.stdout
