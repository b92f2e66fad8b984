"""`make profile P=...` (scripts/profile.sh) in a fresh clone: params.yaml's `profile:` line set (its
overlay, profiles/<name>.yaml, then merged over params.yaml by every reader) and, for smoke, its
declared datasets where profiles/smoke.yaml expects them, tracked by DVC."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from chatuie.config import load_params, read_yaml
from tests.helpers.pipeline_repo import run, tool_env

FILES = [
    "Makefile",
    "scripts/profile.sh",
    "params.yaml",
    "profiles",
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


def _diff(repo: Path) -> list[str]:
    """The lines `git diff` changes in params.yaml."""
    out = run(["git", "diff", "-U0", "params.yaml"], repo).stdout.splitlines()
    return [line for line in out if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def test_smoke_then_tiny_then_default(clone: Path) -> None:
    committed = (clone / "params.yaml").read_text()
    proc = _profile(clone, "smoke")
    assert proc.returncode == 0, proc.stderr
    # One line of params.yaml changes; the overlay is merged in where params are read.
    assert _diff(clone) == ["-profile: default", "+profile: smoke"]
    assert read_yaml(clone / "params.yaml")["profile"] == "smoke"
    merged = load_params(clone / "params.yaml")
    assert merged["sft"]["train"]["max_steps"] == 10 and merged["model"]["base"] == "tiny"
    # Every file the smoke profile declares is where it says (the new user's `no such file`).
    declared = merged["prepare"]["datasets"]
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
    assert _diff(clone) == ["-profile: default", "+profile: tiny"]
    assert load_params(clone / "params.yaml")["model"]["lora"] is None
    # data/user (a dependency of prepare) is as committed again: no smoke data in the tiny run.
    assert not smoke.exists() and _status(clone) == [" M params.yaml"]

    proc = _profile(clone, "default")
    assert proc.returncode == 0, proc.stderr
    assert _status(clone) == [] and (clone / "params.yaml").read_text() == committed


def test_gpu_switches_too(clone: Path) -> None:
    assert _profile(clone, "gpu").returncode == 0
    assert _diff(clone) == ["-profile: default", "+profile: gpu"]
    assert load_params(clone / "params.yaml")["sft"]["launch"]["processes"] == 8


@pytest.mark.parametrize("name", ["bogus", "", "params.smoke.yaml", "smoke.yaml"])
def test_an_unknown_profile_changes_nothing(clone: Path, name: str) -> None:
    proc = _profile(clone, name)
    assert proc.returncode == 2
    assert "profile:" in proc.stderr and "default gpu smoke tiny" in proc.stderr.replace("|", " ")
    assert _status(clone) == []


def test_edits_of_ones_own_are_kept(clone: Path) -> None:
    """Switching sets one line: an edit of params.yaml stays, and applies where no profile overrides
    it (FORCE=1, once needed to overwrite it, changes nothing)."""
    params = clone / "params.yaml"
    edited = params.read_text().replace("  webqa_test_size: 1000", "  webqa_test_size: 999", 1)
    edited = edited.replace("profile: default", "profile: default   # mine", 1) + "# mine\n"
    params.write_text(edited)
    for force in ("0", "1"):
        proc = _profile(clone, "tiny", FORCE=force)
        assert proc.returncode == 0, proc.stderr
        assert params.read_text() == edited.replace("profile: default", "profile: tiny", 1)
        assert load_params(params)["prepare"]["webqa_test_size"] == 999
        assert _profile(clone, "default").returncode == 0
        assert params.read_text() == edited


def test_a_params_yaml_without_its_profile_line_is_refused(clone: Path) -> None:
    params = clone / "params.yaml"
    params.write_text(params.read_text().replace("profile: default\n", ""))
    proc = _profile(clone, "smoke")
    assert proc.returncode == 2 and "profile: <name>" in proc.stderr
    assert _status(clone) == [" M params.yaml"] and not (clone / "data" / "user" / "smoke").exists()


def test_overlays_hold_only_what_differs() -> None:
    """No overlay sets a key to params.yaml's own value (it would hide a later change of the default)."""
    from chatuie.config.params import ADD, REMOVE

    def same(base: dict, overlay: dict, where: str) -> list[str]:
        found = []
        for key, value in overlay.items():
            if isinstance(key, str) and key[:1] in (ADD, REMOVE):
                continue
            if isinstance(value, dict) and isinstance(base[key], dict):
                found += same(base[key], value, f"{where}{key}.")
            elif value == base[key] and type(value) is type(base[key]):
                found.append(f"{where}{key}")
        return found

    base = read_yaml(ROOT / "params.yaml")
    profiles = sorted(p.stem for p in (ROOT / "profiles").glob("*.yaml"))
    assert profiles == ["default", "gpu", "smoke", "tiny"]
    default = read_yaml(ROOT / "profiles" / "default.yaml")
    assert all(value == {} for value in default.values())  # every section named, none changed
    for name in profiles:
        assert same(base, yaml.safe_load((ROOT / "profiles" / f"{name}.yaml").read_text()) or {}, "") == []
