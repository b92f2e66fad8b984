"""Promotion: the gate's rule (:mod:`chatuie.eval.gate`, paired intervals of
:mod:`chatuie.eval.comparison`) applied to registered versions (:mod:`chatuie.tracking`).

``production`` moves only through :func:`promote`; :func:`chatuie.tracking.rollback` moves it back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatuie.eval.comparison import paired_gain
from chatuie.eval.gate import Baseline, PromotionPolicy, decide
from chatuie.tracking import PROTOCOL_TAG, REGISTERED_MODEL, Decision, VersionView, gate_version

log = logging.getLogger(__name__)


def paired_scores(before: Mapping | None, after: Mapping | None, what: str) -> dict[str, Any] | None:
    """:func:`paired_gain` of two record-score sets; None where either is missing or they differ."""
    if before is None or after is None:
        return None
    try:
        return paired_gain(before, after)
    except ValueError as err:  # other records: the protocol check refuses these anyway
        log.warning("no paired comparison of %s: %s", what, err)
        return None


def promote(
    version: int | None = None,
    policy: PromotionPolicy | None = None,
    *,
    name: str = REGISTERED_MODEL,
    root: str | Path | None = None,
    baseline: Baseline | None = None,
) -> Decision:
    """Gate ``version`` (default: the latest) against production; alias it production or candidate.

    ``baseline``: the model ``version`` was trained from; with no production yet, a version worse
    than it (beyond the noise of the paired record scores) stays a candidate.
    """
    policy = policy or PromotionPolicy()

    def judge(candidate: VersionView, production: VersionView | None) -> tuple[bool, str, dict[str, str]]:
        paired = None
        if production is not None:
            paired = paired_scores(
                production.record_scores,
                candidate.record_scores,
                f"versions {production.version} and {candidate.version}",
            )
        baseline_paired = None
        if production is None and baseline is not None:
            baseline_paired = paired_scores(
                baseline.record_scores, candidate.record_scores, f"{baseline.name} and {candidate.version}"
            )
        promoted, reason = decide(
            candidate.metrics,
            None if production is None else production.metrics,
            policy,
            protocols=(
                candidate.tags.get(PROTOCOL_TAG),
                None if production is None else production.tags.get(PROTOCOL_TAG),
            ),
            paired=paired,
            baseline=baseline,
            baseline_paired=baseline_paired,
        )
        tags: dict[str, str] = {}
        if paired and "mean_ie_f1" in paired:
            gain = paired["mean_ie_f1"]
            tags["promotion.mean_ie_f1_gain"] = str(gain["delta"])
            tags["promotion.mean_ie_f1_gain_ci95"] = json.dumps(gain["ci95"])
        return promoted, reason, tags

    return gate_version(judge, version, name=name, root=root)


@dataclass(frozen=True)
class RegisterConfig:
    """``register`` section."""

    model: str = "sft"  # models/<model> and metrics/<model>.json (later: rl)
    registered_model: str = "chatuie"
    gate: bool = True  # run the promotion gate right after registering
    # The model `model` was trained from (metrics/<baseline>.json, reports/eval/<baseline>/): with
    # no production yet, a version worse than it stays a candidate. The same as `model`: none.
    baseline: str = "sft"
