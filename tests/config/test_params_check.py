"""The check_params stage: every section of params.yaml built before any stage runs (tasks/check_params.py).

The slow test runs real `dvc repro` on the smoke profile: a typo in sft.train stops it at the check,
before DVC deletes the outputs of a stage it was about to rerun.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, params_with, profiled_params

from tasks.check_params import SECTIONS, check
from tests.helpers.pipeline_repo import make_repo, run, tool_env


@pytest.fixture()
def smoke_data(tmp_path, monkeypatch) -> Path:
    """A working directory with the smoke profile's declared datasets (as `make profile P=smoke`)."""
    work = tmp_path / "work"
    shutil.copytree(ROOT / "tests" / "fixtures" / "user", work / "data" / "user" / "smoke")
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize("profile", ["default", "tiny", "smoke", "gpu"])
def test_every_profile_passes(profile: str, smoke_data: Path) -> None:
    assert check(profiled_params(smoke_data, profile)) == []


def test_declared_files_must_exist(tmp_path, monkeypatch) -> None:
    """The smoke profile set without `make profile` (its data not copied): the overlay that declares
    them is named, before prepare deletes anything."""
    monkeypatch.chdir(tmp_path)
    errors = check(profiled_params(tmp_path, "smoke"))
    assert errors[0] == (
        f"{tmp_path / 'profiles' / 'smoke.yaml'}: prepare.datasets[0].files.train: "
        "data/user/smoke/ner_train.jsonl: no such file (dataset 'smoke_ner') "
        "(`make profile P=smoke` puts them there)"
    )
    assert len(errors) == 4  # smoke_ner train and test, smoke_re test and schema


def test_every_section_of_the_default_is_checked() -> None:
    assert set(yaml.safe_load((ROOT / "params.yaml").read_text())) == {*SECTIONS, "profile"}


def test_mistakes_name_the_file_and_key(tmp_path, smoke_data: Path) -> None:
    path = params_with(
        tmp_path,
        "smoke",
        sft__train__max_stepz=3,
        rl__grpo__learning_rate="fast",
        judge__modle="x",
        sftt={"train": {}},
    )
    errors = check(path)
    assert errors[0] == f"{path}: sftt: unknown section (known: {', '.join(sorted(SECTIONS))})"
    assert any(e.startswith(f"{path}: sft.train.max_stepz: unknown key (known: ") for e in errors), errors
    assert any(e.startswith(f"{path}: rl.grpo.learning_rate: expected float") for e in errors), errors
    assert any(e.startswith(f"{path}: judge.modle: unknown key") for e in errors), errors
    assert len(errors) == 4


def test_a_mistake_is_named_in_the_file_that_made_it(tmp_path, smoke_data: Path) -> None:
    """Under a profile, a value the overlay sets is its overlay's mistake; the rest params.yaml's."""
    params = profiled_params(tmp_path / "repo", "smoke")
    overlay = params.parent / "profiles" / "smoke.yaml"
    overlay.write_text(overlay.read_text().replace("    max_steps: 10\n", "    max_steps: -3\n", 1))
    params.write_text(params.read_text().replace("  webqa_test_size: 1000", "  webqa_test_size: 0", 1))
    errors = check(params)
    assert errors == [
        f"{params}: prepare.webqa_test_size: expected an integer >= 1, got 0",
        f"{overlay}: sft.train.max_steps: expected an integer >= 1, got -3",
    ]
    # A key the overlay has that params.yaml has not: refused when read, the file and key named.
    overlay.write_text(overlay.read_text().replace("    max_steps: -3\n", "    max_stepz: 3\n", 1))
    (error,) = check(params)
    assert error == (
        f"{overlay}: sft.train.max_stepz: not a key of params.yaml (to add one it leaves out: +max_stepz)"
    )


def test_a_profile_may_not_set_what_dvc_yaml_reads(tmp_path, smoke_data: Path) -> None:
    """dvc.yaml's ${register.model} comes from params.yaml alone: a profile setting it is refused."""
    params = profiled_params(tmp_path / "repo", "smoke")
    shutil.copy(ROOT / "dvc.yaml", params.parent / "dvc.yaml")
    assert check(params) == []
    overlay = params.parent / "profiles" / "smoke.yaml"
    overlay.write_text(overlay.read_text() + "\nregister: {model: sft}\n")
    assert check(params) == [
        f"{overlay}: register.model: dvc.yaml reads ${{register.model}} from params.yaml itself: "
        "set it there, not in a profile"
    ]


def test_an_unknown_profile_is_one_error(tmp_path) -> None:
    params = profiled_params(tmp_path, "smoke")
    params.write_text(params.read_text().replace("profile: smoke", "profile: smok"))
    assert check(params) == [f"{params}: profile: no profile 'smok' (known: default, gpu, smoke, tiny)"]


def test_a_cross_section_refusal_of_prepare_too(tmp_path, smoke_data: Path) -> None:
    # resume is taught (sft.datasets)
    path = params_with(tmp_path, "smoke", evaluate__zero_shot=["resume"])
    errors = check(path)
    # prepare's refusal (evaluate.zero_shot against sft.datasets), besides evaluate's own
    prepare = f"{path}: evaluate.zero_shot: 'resume' is also in sft.datasets"
    assert any(e.startswith(prepare) for e in errors), errors


def test_a_broken_file_is_one_error(tmp_path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("sft:\n  train: [1,\n")
    (error,) = check(path)
    assert error.startswith(f"{path}:") and "invalid YAML" in error


def _lock_md5(repo: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]
    return next(o["md5"] for o in lock["outs"] if o["path"] == path)


@pytest.mark.slow
def test_a_typo_stops_dvc_repro_before_any_stage_deletes_outputs(tmp_path) -> None:
    repo = make_repo(tmp_path / "repo", profile="smoke")
    env = tool_env(clean=True, CHATUIE_TRACKING="off")
    run(["dvc", "repro", "prepare"], repo, env)
    records = repo / "data" / "records"
    assert (repo / "reports" / "params_check.json").is_file()
    before = {p: p.stat().st_mtime_ns for p in records.rglob("*") if p.is_file()}
    assert before
    recorded = _lock_md5(repo, "prepare", "data/records")

    # A changed prepare section (prepare would rerun, its outputs deleted first) and a typo in sft.
    params = repo / "params.yaml"
    clean = params.read_text()
    changed = yaml.safe_load(clean)
    changed["prepare"]["seed"] += 1
    changed["sft"]["train"]["max_stepz"] = 3
    params.write_text(yaml.safe_dump(changed))

    proc = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "params.yaml: sft.train.max_stepz: unknown key (known: " in proc.stderr + proc.stdout
    assert "Running stage 'prepare'" not in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in records.rglob("*") if p.is_file()} == before  # untouched

    # Fixed: the check reruns, its output is the same, so prepare reruns only for its own change.
    params.write_text(clean)
    proc = run(["dvc", "repro", "prepare"], repo, env)
    assert "Running stage 'check_params'" in proc.stdout
    assert "Stage 'prepare' didn't change, skipping" in proc.stdout
    assert _lock_md5(repo, "prepare", "data/records") == recorded
