"""Progress with rate and ETA (chatuie.progress): plain log lines off a terminal."""

from __future__ import annotations

import logging

import pytest

from chatuie import progress as progress_module
from chatuie.progress import RATE_WINDOW_UPDATES, Progress, duration, rate_text, track


@pytest.fixture()
def clock(monkeypatch):
    """A clock the test moves: rates and ETAs are then exact."""
    now = [1000.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    return now


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "chatuie.progress"]


def test_plain_lines_carry_position_rate_eta_and_loss(clock, caplog):
    caplog.set_level(logging.INFO, logger="chatuie.progress")
    shown = Progress("sft", 800, interval_s=30, mode="plain")
    clock[0] += 4.6
    shown.update(1, loss=0.9)  # the first unit is always reported: the first minute says how long
    for _ in range(39):
        clock[0] += 4.6
        shown.update(1, loss=0.41)  # every 30 s of simulated time
    shown.close()
    got = lines(caplog)
    assert got[0] == "sft: step 1/800 (0 %), 4.6 s/step, loss 0.9, ETA 61 min"
    assert "sft: step 40/800 (5 %), 4.6 s/step, loss 0.41, ETA 58 min" in got
    assert 6 <= len(got) <= 8  # 184 s at one line per 30 s, not one per step


def test_fast_work_reports_units_per_second_and_a_resumed_run_counts_only_new_units(clock, caplog):
    caplog.set_level(logging.INFO, logger="chatuie.progress")
    shown = Progress("extract", 1000, unit="doc", initial=400, interval_s=0, mode="plain")
    clock[0] += 10
    shown.update(100)
    assert lines(caplog)[-1] == "extract: doc 500/1000 (50 %), 10.0 docs/s, ETA 50 s"


def test_off_is_silent_and_track_weights_batches(clock, caplog):
    caplog.set_level(logging.INFO, logger="chatuie.progress")
    with Progress("quiet", 3, mode="off") as shown:
        shown.update(3)
    assert lines(caplog) == []
    seen = list(
        track(range(0, 40, 16), "evaluate resume", total=40, unit="record", weight=lambda s: min(16, 40 - s))
    )
    assert seen == [0, 16, 32]


def test_formats():
    assert duration(45) == "45 s" and duration(58 * 60) == "58 min" and duration(7500) == "2 h 05 min"
    assert rate_text(9.2, 2, "step") == "4.6 s/step" and rate_text(1, 0, "step") == "- s/step"


def test_rate_follows_recent_updates_so_a_pause_ages_out(clock, caplog):
    caplog.set_level(logging.INFO, logger="chatuie.progress")
    shown = Progress("sft", 800, interval_s=0, mode="plain")
    for _ in range(10):
        clock[0] += 5
        shown.update(1)
    clock[0] += 1800  # the process was stopped for half an hour
    shown.update(1)
    assert lines(caplog)[-1].startswith("sft: step 11/800 (1 %), 184.5 s/step")
    for _ in range(RATE_WINDOW_UPDATES):
        clock[0] += 5
        shown.update(1)
    assert lines(caplog)[-1] == "sft: step 31/800 (4 %), 5.0 s/step, ETA 64 min"
    # the stage's recorded time per step is the whole run's
    assert shown.average_seconds_per_unit() == pytest.approx((29 * 5 + 1800) / 30)
