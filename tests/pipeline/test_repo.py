"""The repository keeps its promises: README commands = CI commands, no shadowing, pins."""

from __future__ import annotations

import re
import tomllib

from conftest import ROOT


def _readme_commands() -> list[str]:
    block = re.search(r"## Use\n\n```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README has no ## Use command block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_has_three_commands_and_ci_runs_setup_and_test_verbatim() -> None:
    setup, run, test = _readme_commands()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert ci.index(setup) < ci.index(test)
    assert run not in ci


def test_mlflow_store_dir_never_shadows_the_package() -> None:
    assert (ROOT / "mlflow").is_dir()
    assert not (ROOT / "mlflow" / "__init__.py").exists()
    import mlflow

    assert "site-packages" in mlflow.__file__


def test_dependencies_are_exact_pins() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        assert "==" in dep or dep.startswith("fastapi"), dep


def test_no_cuda_packages_installed() -> None:
    from importlib import metadata

    names = {d.metadata["Name"].lower() for d in metadata.distributions()}
    assert not [n for n in names if n.startswith("nvidia-")]
    import torch

    assert torch.__version__.startswith("2.13.0")


def test_environment_defaults_are_set() -> None:
    import os

    import chatuie  # noqa: F401

    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert os.environ["PREFECT_HOME"]
