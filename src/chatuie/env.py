"""Environment hygiene the project sets for itself, so users do not have to.

Applied with ``setdefault`` on import of :mod:`chatuie`: a value the user exported wins.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]

DEFAULTS: dict[str, str] = {
    # Prefect keeps its database and settings inside the project, never in ~/.prefect.
    "PREFECT_HOME": str(PROJECT_ROOT / ".prefect"),
    # A Prefect ephemeral API takes 10-30 s to start on 2 cores; the default 20 s is too tight.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
