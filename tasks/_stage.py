"""What every stage entry point shares: params loading, logging, a clean error exit."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from chatuie.config import ConfigError, build, load_params
from chatuie.records import ConversionError

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]


def section(name: str, cls: type[T], params_path: Path | None = None) -> T:
    params = load_params(params_path or Path("params.yaml"))
    return build(cls, params.get(name), f"params.yaml: {name}")


def run(main: Callable[[], Any]) -> None:
    """Run a stage; expected failures print one clear line and exit 1 (no traceback noise)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        main()
    except (ConversionError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def set_threads(threads: int) -> None:
    """torch intra-op threads for this stage (0 = torch's default, one per core)."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
