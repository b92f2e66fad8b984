"""The user-facing error family: every error a user fixes from its message is a ChatuieError, and
a stage or the CLI turns one into a single `error: ...` line with exit status 1."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import chatuie
from chatuie.config import ConfigError, build
from chatuie.errors import ChatuieError, printable
from tasks import _stage

ROOT = Path(__file__).resolve().parents[1]
# Errors that are not the user's to fix from a message: the HTTP server's own (a status code).
NOT_USER_ERRORS = {"chatuie.serve.request_parsing.ApiError"}


def _error_classes() -> dict[str, type]:
    found = {}
    for info in pkgutil.walk_packages(chatuie.__path__, "chatuie."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, Exception)
                and obj.__module__ == info.name
                and not name.startswith("_")
                and (name.endswith("Error") or name.endswith("Failed"))
            ):
                found[f"{info.name}.{name}"] = obj
    return found


def test_every_public_error_is_in_the_family() -> None:
    classes = _error_classes()
    assert {"chatuie.config.params.ConfigError", "chatuie.data.records.ConversionError"} <= set(classes)
    outside = sorted(
        n for n, c in classes.items() if not issubclass(c, ChatuieError) and n not in NOT_USER_ERRORS
    )
    assert not outside, f"user-facing errors outside chatuie.errors.ChatuieError: {outside}"


@dataclasses.dataclass(frozen=True)
class _Pair:
    low: int = 0
    high: int = 1

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError("low must not exceed high")


def test_a_dataclass_check_is_reported_with_where_it_was_read() -> None:
    with pytest.raises(ConfigError, match=r"^params.yaml: pair: low must not exceed high$"):
        build(_Pair, {"low": 3}, "params.yaml: pair")


def test_messages_are_always_printable() -> None:
    err = ChatuieError("bad label '\ud800'")
    str(err).encode("utf-8")  # no UnicodeEncodeError
    assert printable("a\ud800b") == "a\\ud800b"


def _run_stage(raise_: str) -> subprocess.CompletedProcess:
    code = (
        "from tasks import _stage\n"
        "from chatuie.tracking import TrackingError\n"
        "from chatuie.data.records import ConversionError\n"
        f"def main():\n    raise {raise_}\n"
        "_stage.run(main, track=False, reuse_freed_memory=False)\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "raise_", ["TrackingError('mlflow: no such store')", "ConversionError('data/x.jsonl', 3, 'bad span')"]
)
def test_a_stage_prints_one_line_and_exits_1(raise_: str) -> None:
    proc = _run_stage(raise_)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in proc.stderr


def test_a_bug_keeps_its_traceback() -> None:
    proc = _run_stage("KeyError('oops')")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "KeyError" in proc.stderr


def test_stage_module_exposes_run() -> None:
    assert callable(_stage.run)
