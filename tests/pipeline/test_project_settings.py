"""Settings that must hold for tools run in the project without importing chatuie: Prefect's
telemetry off for a plain `prefect server start`, tool outputs git-ignored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_PREFECT_PROBE = """
import json, sys
from prefect.settings import get_current_settings
settings = get_current_settings()
print(json.dumps({
    "analytics": settings.server.analytics_enabled,
    "orchestration_telemetry": settings.cloud.enable_orchestration_telemetry,
    "chatuie_imported": "chatuie" in sys.modules,
}))
"""


def _prefect_settings(cwd: Path, home: Path) -> dict[str, bool]:
    # Nothing inherited from this test process, where chatuie.env has exported its defaults.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "DO_NOT_TRACK"}
    env.update(PREFECT_HOME=str(home), HOME=str(home), PYTHONPATH="")
    done = subprocess.run(
        [sys.executable, "-c", _PREFECT_PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_prefect_telemetry_is_off_in_the_project_without_chatuie(tmp_path: Path) -> None:
    inside = _prefect_settings(ROOT, tmp_path / "home")
    assert inside == {"analytics": False, "orchestration_telemetry": False, "chatuie_imported": False}
    # The setting comes from the project (prefect.toml, read from the working directory).
    outside = _prefect_settings(tmp_path, tmp_path / "home")
    assert outside["analytics"] is True


def test_dvc_plots_output_is_ignored() -> None:
    # `dvc plots show` writes dvc_plots/index.html in the working directory.
    done = subprocess.run(
        ["git", "check-ignore", "-q", "dvc_plots/index.html"], cwd=ROOT, capture_output=True, timeout=30
    )
    assert done.returncode == 0, "dvc_plots/ is not git-ignored"
