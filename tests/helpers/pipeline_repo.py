"""Temporary git repos holding a copy of the pipeline, for tests that run real `dvc repro`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED_STORE = (ROOT / ".." / "shared" / "dvc-store").resolve()
PROJECT_FILES = [
    "dvc.yaml",
    "params.yaml",
    "profiles",  # the profiles' overlays (params.yaml's `profile` picks one)
    "Makefile",
    "scripts/profile.sh",
    "tests/fixtures/user",  # the smoke profile's declared datasets
    "tasks",
    "src",
    "flows",
    "data/raw.dvc",
    "data/.gitignore",
    "data/user/README.md",
    ".dvc/config",
    ".dvcignore",
    "pyproject.toml",
    ".gitignore",
    "mlflow/.gitignore",
]


def up_to_date(out: str) -> bool:
    """Whether `dvc repro` or `dvc status` output says there was nothing to do, ``check_raw`` aside.

    That stage (data/raw against its pin, data/raw.dvc) runs on every `dvc repro` (always_changed),
    so DVC no longer says "Data and pipelines are up to date" for a whole pipeline: here that is
    check_raw the one stage run (`dvc repro`), or the one stage listed, as always changed (`dvc status`).
    """
    if "Data and pipelines are up to date" in out:
        return True
    if "Running stage" in out:
        return re.findall(r"Running stage '([^']+)'", out) == ["check_raw"]
    return out.strip() == "check_raw:\n\talways changed"


def tool_env(*, clean: bool = False, **extra: str) -> dict[str, str]:
    """The environment for dvc, stages and tools: this venv first on PATH, then ``extra``.

    ``clean``: without inherited MLflow / chatuie / Prefect API settings, so a developer's shell
    cannot point a tracked test run at a real store.
    """
    prefixes = ("MLFLOW_", "CHATUIE_", "PREFECT_API")
    env = {k: v for k, v in os.environ.items() if not (clean and k.startswith(prefixes))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # `python -m tasks.<stage>` from any folder: a temp repo's own tasks/ (the cwd) comes first
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def stage_process(
    stage: str, cwd: Path, *args: str, env: Mapping[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """``python -m tasks.<stage> args`` in ``cwd`` (a temp project without tasks/ of its own), as it
    ended: the caller checks its exit status. ``env``: the environment (default :func:`tool_env`);
    this repository goes on its PYTHONPATH, so the stage module is found from any folder."""
    env = dict(tool_env() if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", f"tasks.{stage}", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 900):
    """Run a command that must succeed; the failure message carries its stderr and stdout."""
    proc = subprocess.run(
        args, cwd=cwd, env=env or tool_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"{' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}\n"
        f"--- stdout:\n{proc.stdout[-3000:]}"
    )
    return proc


def make_repo(dest: Path, profile: str | None = None) -> Path:
    """Copy the pipeline into ``dest`` (a fresh git repo); ``profile='smoke'``: then ``make profile
    P=smoke`` as the README says (params.yaml's ``profile: smoke``, its datasets in data/user/smoke)."""
    if not SHARED_STORE.is_dir():
        raise RuntimeError(f"DVC remote not found at {SHARED_STORE}")
    for name in PROJECT_FILES:
        src, dst = ROOT / name, dest / name
        if not src.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    run(["git", "init", "-q"], dest)
    run(["git", "config", "user.email", "test@example.com"], dest)
    run(["git", "config", "user.name", "test"], dest)
    # The committed remote is relative to the checkout (../../shared/dvc-store); here it is elsewhere.
    run(["dvc", "remote", "modify", "--local", "shared", "url", str(SHARED_STORE)], dest)
    run(["dvc", "pull", "-q", "data/raw.dvc"], dest)
    if profile:
        run(["make", "-s", "profile", f"P={profile}"], dest)
    return dest
