"""How the test suite shares the machine between pytest-xdist workers."""

from __future__ import annotations

import os


def threads_per_worker() -> int:
    """Torch threads for one test process: the cores divided among the running workers (all of
    them without xdist)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // max(1, workers))
