from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
RAW = ROOT / "data" / "raw"
VENV_BIN = Path(sys.executable).parent

# Stage scripts import their shared helper as a top-level module.
sys.path.insert(0, str(ROOT / "tasks"))


@pytest.fixture(scope="session")
def raw_dir() -> Path:
    if not (RAW / "resume_ner" / "train.char.bmes").exists():
        pytest.fail("data/raw is missing: run the README setup (it does `dvc pull`)")
    return RAW


@pytest.fixture()
def subprocess_env() -> dict[str, str]:
    """Environment for running stages and tools from this venv in a subprocess."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="session")
def smoke_repo(tmp_path_factory) -> Path:
    """One real `dvc repro` of the whole pipeline on the smoke profile, shared by the e2e tests."""
    from pipeline_repo import make_repo, run

    repo = make_repo(tmp_path_factory.mktemp("smoke"), profile="smoke")
    run(["dvc", "repro"], repo)
    return repo
