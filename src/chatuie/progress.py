"""Progress of long work, with its rate and ETA: a tqdm bar on a terminal, plain log lines elsewhere.

A stage run by ``dvc repro`` in a terminal shows a bar; the same stage under a Prefect worker, in CI
or with its output sent to a file logs one line at a steady interval instead (and always after
the first unit, so the first minute of a run already says how long it will take)::

    sft: step 40/800 (5 %), 4.6 s/step, loss 0.41, ETA 58 min

The rate and ETA follow the last 20 updates, so a paused process or a busy start ages out.

``CHATUIE_PROGRESS``: ``auto`` (default: a bar when stderr is a terminal), ``bar``, ``plain`` or
``off``. ``CHATUIE_PROGRESS_INTERVAL``: seconds between plain lines (default 30).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("chatuie.progress")

DEFAULT_INTERVAL_S = 30.0
# The rate and ETA follow the last 20 updates (sft: ~2 min of steps; evaluate: ~20 batches), so a
# busy start, a paused process or a suspended laptop ages out instead of skewing the ETA for hours.
RATE_WINDOW_UPDATES = 20


def _mode() -> str:
    mode = os.environ.get("CHATUIE_PROGRESS", "auto").strip().lower()
    if mode == "auto":
        return "bar" if sys.stderr.isatty() else "plain"
    return mode if mode in ("bar", "plain", "off") else "plain"


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("CHATUIE_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def duration(seconds: float) -> str:
    """45 s, 58 min, 2 h 05 min."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes:02d} min"


def rate_text(seconds: float, units: float, unit: str) -> str:
    """``4.6 s/step`` when a unit takes a second or more, else ``12.3 records/s``."""
    if units <= 0 or seconds <= 0:
        return f"- s/{unit}"
    per_unit = seconds / units
    return f"{per_unit:.1f} s/{unit}" if per_unit >= 1 else f"{units / seconds:.1f} {unit}s/s"


class Progress:
    """Counts units of work toward ``total`` and reports rate and ETA (see the module doc).

    ``initial`` units were done before (a resumed run): they count toward the position, not the rate.
    """

    def __init__(
        self,
        desc: str,
        total: int | None,
        *,
        unit: str = "step",
        initial: int = 0,
        interval_s: float | None = None,
        mode: str | None = None,
    ) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.position = self.initial = initial
        self.fields: dict[str, Any] = {}
        self.mode = mode or _mode()
        self.interval = _interval() if interval_s is None else interval_s
        self.started = time.monotonic()
        # (time, position) at the end of each of the last updates; the first is the first unit's end,
        # so rates leave out loading and other warm-up.
        self.marks: deque[tuple[float, int]] = deque(maxlen=RATE_WINDOW_UPDATES + 1)
        self.first_mark: tuple[float, int] | None = None
        self.last_line = self.started
        self.lines = 0
        self._bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)

    @property
    def done(self) -> int:
        return self.position - self.initial

    def seconds_per_unit(self) -> float | None:
        """Over the last ``RATE_WINDOW_UPDATES`` updates once there are two (loading, a first slow
        step and other warm-up then count for nothing), from the start before."""
        now = time.monotonic()
        if len(self.marks) >= 2:
            since, position = self.marks[0]
            return (now - since) / (self.position - position)
        return (now - self.started) / self.done if self.done > 0 else None

    def average_seconds_per_unit(self) -> float | None:
        """Over the whole run after the first unit (a stage's recorded time per step)."""
        if self.first_mark is None or self.position == self.first_mark[1]:
            return self.seconds_per_unit()
        since, position = self.first_mark
        return (time.monotonic() - since) / (self.position - position)

    def eta_seconds(self) -> float | None:
        per_unit = self.seconds_per_unit()
        if not self.total or per_unit is None:
            return None
        return max(0.0, (self.total - self.position) * per_unit)

    def line(self) -> str:
        """``sft: step 40/800 (5 %), 4.6 s/step, loss 0.41, ETA 58 min``."""
        where = f"{self.unit} {self.position}"
        if self.total:
            where += f"/{self.total} ({100 * self.position / self.total:.0f} %)"
        per_unit = self.seconds_per_unit()
        parts = [f"{self.desc}: {where}", rate_text(per_unit or 0.0, 1 if per_unit else 0, self.unit)]
        parts += [f"{key} {_fmt(value)}" for key, value in self.fields.items()]
        eta = self.eta_seconds()
        if eta is not None:
            parts.append(f"ETA {duration(eta)}")
        return ", ".join(parts)

    def update(self, n: int = 1, **fields: Any) -> None:
        self.position += n
        if n > 0:
            self.marks.append((time.monotonic(), self.position))
            self.first_mark = self.first_mark or self.marks[0]
        self.fields.update({k: v for k, v in fields.items() if v is not None})
        if self._bar is not None:
            if self.fields:
                self._bar.set_postfix({k: _fmt(v) for k, v in self.fields.items()}, refresh=False)
            self._bar.update(n)
            return
        now = time.monotonic()
        if self.mode == "plain" and (self.lines == 0 or now - self.last_line >= self.interval):
            self._emit(now)

    def set(self, **fields: Any) -> None:
        """Values shown with the next report (a loss logged between steps)."""
        self.fields.update({k: v for k, v in fields.items() if v is not None})

    def _emit(self, now: float) -> None:
        log.info("%s", self.line())
        self.lines += 1
        self.last_line = now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "plain" and self.done and time.monotonic() - self.last_line > 0.5:
            self._emit(time.monotonic())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(
    items: Iterable[T], desc: str, *, total: int | None = None, unit: str = "item", weight: Any = None
) -> Iterator[T]:
    """Iterate ``items`` with progress; ``weight(item)`` units per item (a batch of 16 records)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(desc, total, unit=unit) as progress:
        for item in items:
            yield item
            progress.update(weight(item) if weight else 1)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
