"""Environment hygiene the project sets for itself, so users do not have to.

Applied with ``setdefault`` on import of :mod:`chatuie`: a value the user exported wins.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]

DEFAULTS: dict[str, str] = {
    # Prefect keeps its database and settings inside the project, never in ~/.prefect.
    "PREFECT_HOME": str(PROJECT_ROOT / ".prefect"),
    # A Prefect ephemeral API takes 10-30 s to start on 2 cores; the default 20 s is too tight.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # Also in prefect.toml at the project root, for prefect commands run without chatuie
    # (`prefect server start`): Prefect reads it from the working directory.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


# glibc's malloc serves large blocks from mmap (returned to the system when freed) only up to a
# threshold that grows with every large free, up to 32 MB. Decoding a 262 k-token vocabulary frees
# 8-17 MB logits every step; once the threshold passes them they are carved from the heap and kept:
# a Gemma 3 270M process decoding FewFC under the constraint grew to 10.6 GB after 96 records
# (and past 23 GB in a whole evaluate stage) against 1.6 GB with the threshold fixed at 4 MB, for
# 4 % more time (141 s against 135 s; docs/experiments.md).
MMAP_THRESHOLD_BYTES = 4 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def bound_heap(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (no-op off glibc, or when the user set
    ``MALLOC_MMAP_THRESHOLD_``, which glibc applied at start). True when it was set."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        # The process's own symbols: libc is loaded already, and find_library would spawn ldconfig
        # on every import of chatuie.
        return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False


def apply_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    bound_heap()
