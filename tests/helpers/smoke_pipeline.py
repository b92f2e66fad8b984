"""One tracked smoke-profile pipeline run per test session, shared by test_tracking, test_registry,
test_flows and others: built by the first process that asks (under pytest-xdist, the workers of
one session share it through a file lock and a JSON record beside their temp folders).

``smoke(tmp_path_factory)`` builds a temporary git repo from this checkout (`make profile P=smoke`:
the smoke profile active), commits it and runs ``dvc repro`` once (the judge's key exported, to
prove it is never recorded); later calls return the same run. Tests only read ``Smoke.repo`` (its
MLflow store), and change copies of ``Smoke.snapshot``, the repo (store included) as that run left it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.helpers.pipeline_repo import make_repo, run, tool_env

VENV_BIN = Path(sys.executable).parent
FAKE_SECRET = "sk-chatuie-test-0123456789abcdef"  # exported as the judge key during the smoke run


@dataclass
class Smoke:
    repo: Path
    snapshot: Path  # the repo and its store right after that `dvc repro`: clone it, never change it
    commit: str  # HEAD during that run
    seconds: float
    stdout: str


_cache: dict[str, Smoke | BaseException] = {}


def env(**extra: str) -> dict[str, str]:
    """A clean environment for dvc and stages (no inherited tracking settings)."""
    return tool_env(clean=True, **extra)


def sh(args: list[str], cwd: Path, environ: dict[str, str] | None = None, timeout: int = 900) -> str:
    return run(args, cwd, environ or env(), timeout).stdout


@contextmanager
def stage_running_until(
    repo: Path, stage: str, file: Path, *, own_group: bool = False, timeout: float = 300
) -> Iterator[subprocess.Popen]:
    """Start ``dvc repro --single-item stage`` in ``repo``; yield the process once ``file`` exists.

    Fails if the stage ends first or ``file`` does not appear within ``timeout`` seconds. The caller
    kills what it means to kill (``own_group``: dvc and the stage in a process group of their own, to
    be killed together as in a crash); on leaving, the process is waited for.
    """
    with subprocess.Popen(
        ["dvc", "repro", "--single-item", stage],
        cwd=repo,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=own_group,
    ) as dvc:
        deadline = time.monotonic() + timeout
        while not file.exists():
            assert dvc.poll() is None, dvc.stdout.read() if dvc.stdout else ""
            assert time.monotonic() < deadline, f"no {file.name} within {timeout} s"
            time.sleep(0.02)
        yield dvc


def commit(repo: Path, message: str) -> str:
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", message, "--allow-empty"], repo)
    return sh(["git", "rev-parse", "HEAD"], repo).strip()


def smoke(tmp_path_factory) -> Smoke:
    if "smoke" not in _cache:
        try:
            _cache["smoke"] = _shared_build(tmp_path_factory)
        except BaseException as err:  # one failed build fails every user, without building again
            _cache["smoke"] = err
    result = _cache["smoke"]
    if isinstance(result, BaseException):
        raise AssertionError(f"the smoke pipeline failed to build: {result}") from result
    return result


def _shared_build(tmp_path_factory) -> Smoke:
    """``_build`` once per session: xdist workers wait on a lock for the first one's run."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _build(tmp_path_factory)
    shared = tmp_path_factory.getbasetemp().parent  # this session's, above every worker's own
    record = shared / "smoke-run.json"
    with open(shared / "smoke-run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if record.exists():
            built = json.loads(record.read_text())
            if "error" in built:
                raise AssertionError(f"another worker's build failed: {built['error']}")
            return Smoke(**{**built, "repo": Path(built["repo"]), "snapshot": Path(built["snapshot"])})
        try:
            result = _build(tmp_path_factory)
        except BaseException as err:
            record.write_text(json.dumps({"error": f"{type(err).__name__}: {err}"[:4000]}))
            raise
        paths = {"repo": str(result.repo), "snapshot": str(result.snapshot)}
        record.write_text(json.dumps({**asdict(result), **paths}))
        return result


def _build(tmp_path_factory) -> Smoke:
    repo = make_repo(tmp_path_factory.mktemp("smoke") / "repo", profile="smoke")
    head = commit(repo, "smoke project")
    started = time.monotonic()
    # The judge's key is exported and the execution's name (a parent run name) carries it:
    # nothing of it may reach the store.
    secret_env = env(CHATUIE_JUDGE_API_KEY=FAKE_SECRET, CHATUIE_EXECUTION_NAME=f"nightly {FAKE_SECRET}")
    stdout = sh(["dvc", "repro"], repo, secret_env, timeout=1800)
    seconds = time.monotonic() - started
    commit(repo, "smoke run")  # a clean baseline for `dvc exp run`
    snapshot = tmp_path_factory.mktemp("snapshot") / "repo"
    shutil.copytree(repo, snapshot, symlinks=True)
    return Smoke(repo, snapshot, head, seconds, stdout)


def clone(source: Path, dst: Path, *, store: bool = False) -> Path:
    """A copy of a repo (git, DVC cache, outputs). Its MLflow store starts empty unless ``store``:
    a copied store still writes artifacts where its experiment was created (an absolute path), so
    keep it only for reading or for runs that must not happen."""
    ignore = None if store else shutil.ignore_patterns("mlflow.db", "artifacts")
    shutil.copytree(source, dst, symlinks=True, ignore=ignore)
    return dst


def params(repo: Path) -> dict:
    """The params the stages of ``repo`` read: params.yaml, its active profile merged in."""
    from chatuie.config import load_params

    return load_params(repo / "params.yaml")
