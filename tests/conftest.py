from __future__ import annotations

import os
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.workers import threads_per_worker

# Under pytest-xdist the workers share the cores: each (and every subprocess it starts) gets its
# share of threads, set before torch is first imported; OpenMP threads that outnumber the cores
# spin-wait on each other and crawl.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, str(threads_per_worker()))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The order xdist hands out modules in (``make test``: ``--dist loadscope``, a module's tests
    on one worker, so its module fixtures are built once, and ``--no-loadscope-reorder``): the one
    smoke pipeline run is built by the first worker that needs it while the other gets on with
    modules that do not, so one smoke module goes first and the rest last. (``--dist loadgroup``
    would not do: its groups do not reach pytest 9's node ids.)"""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return

    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]

    sizes = Counter(module(i) for i in items)
    smoke = {module(i) for i in items if "smoke_run" in getattr(i, "fixturenames", ())}
    first = min(smoke, key=lambda name: (sizes[name], name), default=None)  # the build, then little else
    rank = {name: 0 if name == first else 2 for name in smoke}
    items.sort(key=lambda item: rank.get(module(item), 1))


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


def profile_params(profile: str = "default") -> dict[str, Any]:
    """The repo's params.yaml with ``profiles/<profile>.yaml`` merged in, as a plain params file (no
    ``profile`` key): what the stages read under that profile."""
    from chatuie.config import merge, read_yaml

    overlay = ROOT / "profiles" / f"{profile}.yaml"
    params = merge(read_yaml(ROOT / "params.yaml"), read_yaml(overlay), str(overlay))
    params.pop("profile")
    return params


def params_with(tmp_path: Path, profile: str = "default", **dotted: Any) -> Path:
    """A profile's params (``profile_params``) with ``section__key=value`` overrides, written as one
    plain params file: tmp_path/params.yaml."""
    params = profile_params(profile)
    for key, value in dotted.items():
        *parents, leaf = key.split("__")
        node = params
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def profiled_params(dest: Path, profile: str) -> Path:
    """params.yaml and profiles/ of the repo copied to ``dest``, ``profile`` the active one (the line
    `make profile` sets): dest/params.yaml."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "profiles", dest / "profiles", dirs_exist_ok=True)
    text = (ROOT / "params.yaml").read_text(encoding="utf-8")
    text, found = re.subn(r"(?m)^profile: *\S+", f"profile: {profile}", text)
    assert found == 1
    (dest / "params.yaml").write_text(text, encoding="utf-8")
    return dest / "params.yaml"
