from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
RAW = ROOT / "data" / "raw"
VENV_BIN = Path(sys.executable).parent



@pytest.fixture(scope="session")
def raw_dir() -> Path:
    if not (RAW / "resume_ner" / "train.char.bmes").exists():
        pytest.fail("data/raw is missing: run the README setup (it does `dvc pull`)")
    return RAW


@pytest.fixture()
def subprocess_env() -> dict[str, str]:
    """Environment for running stages and tools from this venv in a subprocess."""
    from tests.helpers.pipeline_repo import tool_env

    return tool_env()


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The one tracked `dvc repro` of the smoke pipeline in this test process (smoke_pipeline.py)."""
    from tests.helpers.smoke_pipeline import smoke

    return smoke(tmp_path_factory)


@pytest.fixture(scope="session")
def smoke_repo(smoke_run, tmp_path_factory) -> Path:
    """A copy of that run's repo (outputs, DVC cache; an empty MLflow store) for tests that rerun stages."""
    from tests.helpers.smoke_pipeline import clone

    return clone(smoke_run.snapshot, tmp_path_factory.mktemp("smoke-copy") / "repo")


def params_with(tmp_path: Path, base: str = "params.yaml", **dotted: Any) -> Path:
    """``base`` (a params file of the repo) with ``section__key=value`` overrides: tmp_path/params.yaml."""
    params = yaml.safe_load((ROOT / base).read_text())
    for key, value in dotted.items():
        *parents, leaf = key.split("__")
        node = params
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path
