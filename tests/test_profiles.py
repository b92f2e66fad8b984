"""`make profile P=...` (scripts/profile.sh) in a fresh clone: the profile's params as params.yaml and,
for smoke, its declared datasets where params.smoke.yaml expects them, tracked by DVC."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from tests.helpers.pipeline_repo import run, tool_env

FILES = [
    "Makefile",
    "scripts/profile.sh",
    "params.yaml",
    "params.tiny.yaml",
    "params.smoke.yaml",
    "params.gpu.yaml",
    "tests/fixtures/user",
    "data/user/README.md",
    "data/.gitignore",
    ".dvc/config",
    ".dvc/.gitignore",
    ".dvcignore",
    ".gitignore",
]


@pytest.fixture()
def clone(tmp_path) -> Path:
    """A committed repo holding what the profile switch touches (a fresh clone, as far as it goes)."""
    repo = tmp_path / "repo"
    for name in FILES:
        src, dst = ROOT / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "clone"]):
        run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args], repo)
    return repo


def _profile(repo: Path, name: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-s", "profile", f"P={name}"],
        cwd=repo,
        env=tool_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _status(repo: Path) -> list[str]:
    return run(["git", "status", "--porcelain"], repo).stdout.splitlines()


def test_smoke_then_tiny_then_default(clone: Path) -> None:
    proc = _profile(clone, "smoke")
    assert proc.returncode == 0, proc.stderr
    assert filecmp.cmp(clone / "params.yaml", clone / "params.smoke.yaml", shallow=False)
    # Every file the smoke profile declares is where it says (the new user's `no such file`).
    declared = yaml.safe_load((clone / "params.yaml").read_text())["prepare"]["datasets"]
    paths = [p for d in declared for p in [*d["files"].values(), d.get("schema")] if p]
    assert paths and all((clone / p).is_file() for p in paths)
    smoke = clone / "data" / "user" / "smoke"
    assert not filecmp.dircmp(ROOT / "tests" / "fixtures" / "user", smoke).diff_files
    assert "up to date" in run(["dvc", "status", "data/user/smoke.dvc"], clone).stdout
    assert sorted(_status(clone)) == [" M params.yaml", "?? data/user/.gitignore", "?? data/user/smoke.dvc"]
    assert _profile(clone, "smoke").returncode == 0  # again: nothing to redo
    assert sorted(_status(clone)) == [" M params.yaml", "?? data/user/.gitignore", "?? data/user/smoke.dvc"]

    proc = _profile(clone, "tiny")
    assert proc.returncode == 0, proc.stderr
    assert filecmp.cmp(clone / "params.yaml", clone / "params.tiny.yaml", shallow=False)
    # data/user (a dependency of prepare) is as committed again: no smoke data in the tiny run.
    assert not smoke.exists() and _status(clone) == [" M params.yaml"]

    proc = _profile(clone, "default")
    assert proc.returncode == 0, proc.stderr
    assert _status(clone) == []


def test_gpu_switches_too(clone: Path) -> None:
    assert _profile(clone, "gpu").returncode == 0
    assert filecmp.cmp(clone / "params.yaml", clone / "params.gpu.yaml", shallow=False)


@pytest.mark.parametrize("name", ["bogus", "", "params.smoke.yaml"])
def test_an_unknown_profile_changes_nothing(clone: Path, name: str) -> None:
    proc = _profile(clone, name)
    assert proc.returncode == 2
    assert "profile:" in proc.stderr and "default tiny smoke gpu" in proc.stderr.replace("|", " ")
    assert _status(clone) == []


def test_edits_of_ones_own_are_kept_unless_forced(clone: Path) -> None:
    params = clone / "params.yaml"
    edited = params.read_text() + "# mine\n"
    params.write_text(edited)
    proc = _profile(clone, "smoke")
    assert proc.returncode == 2 and "FORCE=1" in proc.stderr
    assert params.read_text() == edited and _status(clone) == [" M params.yaml"]
    assert _profile(clone, "smoke", FORCE="1").returncode == 0
    assert filecmp.cmp(params, clone / "params.smoke.yaml", shallow=False)
