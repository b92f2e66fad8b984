"""The judge's cache: a JSONL file, one line per successfully parsed answer::

    {"v": 1, "key": "<sha256>", "provider": "openai", "model": "...", "score": 7.0,
     "reason": "..."}

``key`` is ``sha256(compact JSON of [base_url, model, prompt])`` for ``openai`` and
``sha256(compact JSON of ["reference", REFERENCE_VERSION, prompt, gold])`` for ``reference``.
Lines are appended with one ``write`` + ``fsync`` under a lock; a torn or corrupt line (a
``kill -9`` mid-write) is skipped and counted on load, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chatuie.io import dumps_compact
from chatuie.reward.judge_types import MAX_SCORE, JudgeConfig

log = logging.getLogger(__name__)

CACHE_VERSION = 1
REFERENCE_VERSION = 1  # bump when the reference scoring changes, so old cache lines stop matching


def _sha256(parts: Sequence[Any]) -> str:
    return hashlib.sha256(dumps_compact(list(parts)).encode("utf-8")).hexdigest()


def cache_key(config: JudgeConfig, prompt: str, gold: str | None = None) -> str:
    """The cache key of a prompt under ``config`` (see the module docstring)."""
    if config.provider == "reference":
        return _sha256(["reference", REFERENCE_VERSION, prompt, gold])
    return _sha256([config.base_url.rstrip("/"), config.model, prompt])


class JudgeCache:
    """Append-only JSONL cache of parsed scores, safe against a kill at any instant."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self.entries: dict[str, dict[str, Any]] = {}
        self.corrupt_lines = 0
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._needs_newline = False
        if self.path is not None:
            self._load()

    def _load(self) -> None:
        assert self.path is not None
        if not self.path.exists():
            return
        with open(self.path, "rb") as handle:
            data = handle.read()
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                key = entry["key"]
                score = entry["score"]
                ok = (
                    isinstance(key, str)
                    and isinstance(score, int | float)
                    and not isinstance(score, bool)
                    and 0 <= score <= MAX_SCORE
                )
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                self.corrupt_lines += 1  # torn tail from a kill mid-write, or a damaged line
                continue
            self.entries[key] = entry
        if self.corrupt_lines:
            log.warning("judge cache %s: skipped %d corrupt line(s)", self.path, self.corrupt_lines)
        # A torn last line has no newline: start the next append on a fresh line so the new
        # entry is not glued onto the fragment.
        self._needs_newline = bool(data) and not data.endswith(b"\n")

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self.entries.get(key)

    def put(self, entry: dict[str, Any]) -> None:
        """Record ``entry`` in memory and, if there is a file, append it durably."""
        line = (dumps_compact(entry) + "\n").encode("utf-8")
        with self._lock:
            self.entries[entry["key"]] = entry
            if self.path is None:
                return
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                if self._needs_newline:
                    line = b"\n" + line
                    self._needs_newline = False
            # One write() per line (O_APPEND keeps it at the end); loop only on a short write.
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
