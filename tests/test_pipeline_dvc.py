"""The real pipeline: `dvc pull` + `dvc repro validate` in a temporary git repo."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT

SHARED_STORE = (ROOT / ".." / "shared" / "dvc-store").resolve()
PROJECT_FILES = [
    "dvc.yaml",
    "params.yaml",
    "tasks",
    "src",
    "data/raw.dvc",
    "data/.gitignore",
    ".dvc/config",
    ".dvcignore",
    "pyproject.toml",
]


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory) -> Path:
    if not SHARED_STORE.is_dir():
        pytest.fail(f"DVC remote not found at {SHARED_STORE}")
    repo = tmp_path_factory.mktemp("pipeline")
    for name in PROJECT_FILES:
        src = ROOT / name
        dst = repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    return repo


@pytest.mark.slow
def test_dvc_pull_and_repro_validate(pipeline_repo: Path, subprocess_env) -> None:
    env = subprocess_env
    _run(["git", "init", "-q"], pipeline_repo, env)
    # The committed remote is relative to the checkout (../../shared/dvc-store); here it is elsewhere.
    _run(["dvc", "remote", "modify", "--local", "shared", "url", str(SHARED_STORE)], pipeline_repo, env)
    _run(["dvc", "pull", "-q", "data/raw.dvc"], pipeline_repo, env)
    assert sum(1 for p in (pipeline_repo / "data" / "raw").rglob("*") if p.is_file()) == 182

    _run(["dvc", "repro", "validate"], pipeline_repo, env)
    summary = json.loads((pipeline_repo / "reports" / "validation.json").read_text())
    assert summary["success"] and summary["failed_expectations"] == 0
    assert (pipeline_repo / "reports" / "validation_docs" / "index.html").exists()
    for split in ("train", "dev", "test"):
        assert (pipeline_repo / "data" / "samples" / f"{split}.jsonl").stat().st_size > 0

    metrics = json.loads(_run(["dvc", "metrics", "show", "--json"], pipeline_repo, env).stdout)
    (workspace,) = metrics.values()
    prepare = workspace["data"]["metrics/prepare.json"]["data"]
    assert prepare["resume"]["train"] == {"records": 3821, "entities": 13438, "repaired": 4}
    assert prepare["conll04"]["test"]["relations"] == 422
    assert prepare["fewfc"]["train"]["records"] == 7185

    start = time.monotonic()
    again = _run(["dvc", "repro", "validate"], pipeline_repo, env)
    elapsed = time.monotonic() - start
    assert "Data and pipelines are up to date" in again.stdout
    print(f"second `dvc repro validate`: {elapsed:.2f}s")  # measured, not asserted (see bench/)


@pytest.mark.slow
def test_changed_param_reruns_only_downstream(pipeline_repo: Path, subprocess_env) -> None:
    params = pipeline_repo / "params.yaml"
    params.write_text(params.read_text().replace("absent_label_rate: 1.0", "absent_label_rate: 0.5"))
    proc = _run(["dvc", "repro", "validate"], pipeline_repo, subprocess_env)
    assert "Stage 'prepare' didn't change, skipping" in proc.stdout
    assert "Running stage 'samples'" in proc.stdout
