"""The promotion gate: does a registered candidate beat production? Plain Python, no MLflow.

The rule (``promote`` section of params.yaml): the candidate is promoted when the *lower bound* of
its paired 95 % interval of mean-IE-F1 gain over production (:func:`chatuie.eval.comparison.paired_gain`
on the two versions' record scores) is above ``min_f1_gain``, and no chat metric drops by more
than ``max_chat_drop``. A gain inside the noise of the test records is refused, however large its
point estimate. Where a version carries no record scores (registered before they were kept), the
point gain is compared instead and the reason says so. A first model passes floors and, given
the model it was trained from (a :class:`Baseline`, e.g. the SFT model under an RL one), must not
be worse than that: its paired interval wholly below 0, or a chat drop beyond ``max_chat_drop``,
keeps it a candidate. :func:`chatuie.eval.promotion.promote` applies it to registered versions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PromotionPolicy:
    """``promote`` section of params.yaml: the gate a registered version passes to be production."""

    # Points of mean IE F1 the lower bound of the paired 95 % interval of the gain must exceed
    # (the point gain, for versions without record scores).
    min_f1_gain: float = 0.0
    max_chat_drop: float = 0.05  # largest relative drop of each chat metric vs production (0.05 = 5 %)
    floor_mean_ie_f1: float = 1.0  # a first model (no production yet) needs at least this...
    # ...and these chat scores; their keys are also the chat metrics compared with production.
    floor_chat: dict[str, float] = field(default_factory=lambda: {"webqa_rouge1": 0.0, "ceval_accuracy": 0.0})
    ie_metric: str = "mean_ie_f1"
    # True: compare scores although production was evaluated under another protocol (evaluate
    # params changed since); a deliberate, reviewable choice for the one run after such a change.
    allow_protocol_change: bool = False


@dataclass(frozen=True)
class Baseline:
    """The model a first version was trained from, measured under the same protocol."""

    name: str  # e.g. "sft"
    metrics: Mapping[str, float]  # its summary metrics
    record_scores: Mapping[str, Any] | None = None  # chatuie.eval.comparison.record_scores


def _chat_drop(before: float, now: float, policy: PromotionPolicy) -> tuple[float, bool]:
    """(relative drop of a chat metric, whether it exceeds ``max_chat_drop``); a zero ``before``
    cannot drop."""
    drop = (before - now) / before if before > 0 else 0.0
    return drop, drop > policy.max_chat_drop + 1e-9


def _worse_than_baseline(
    candidate: Mapping[str, float],
    baseline: Mapping[str, float],
    name: str,
    policy: PromotionPolicy,
    paired: Mapping[str, Any] | None,
) -> list[str]:
    """Why ``candidate`` is worse than its baseline (empty: it is not, beyond the noise)."""
    ie = policy.ie_metric
    failures: list[str] = []
    if ie in baseline:
        gain = candidate[ie] - baseline[ie]
        interval = (paired or {}).get(ie, {}).get("ci95") if ie == "mean_ie_f1" else None
        if interval is not None and interval[1] < -1e-9:
            failures.append(
                f"{ie} {gain:+.2f} vs {name}, {_ci(interval)}: worse than {name} beyond the noise"
            )
        elif interval is None and gain < -1e-9:
            failures.append(f"{ie} {gain:+.2f} vs {name} (point estimate: no record scores)")
    for metric in policy.floor_chat:
        before, now = baseline.get(metric), candidate.get(metric)
        if before is not None and now is not None:
            drop, too_far = _chat_drop(before, now, policy)
            if too_far:
                failures.append(f"{metric} drops {drop:.1%} > {policy.max_chat_drop:.1%} vs {name}")
    return failures


def _first_model(
    candidate: Mapping[str, float],
    policy: PromotionPolicy,
    baseline: Baseline | None = None,
    baseline_paired: Mapping[str, Any] | None = None,
) -> tuple[bool, str]:
    ie = policy.ie_metric
    failures: list[str] = []
    if candidate[ie] < policy.floor_mean_ie_f1:
        failures.append(f"{ie} {candidate[ie]:g} < floor {policy.floor_mean_ie_f1:g}")
    for metric, floor in policy.floor_chat.items():
        value = candidate.get(metric)
        if value is None or value < floor:
            failures.append(f"{metric} {value if value is not None else 'missing'} < floor {floor:g}")
    if failures:
        return False, "first model below the floors: " + "; ".join(failures)
    if baseline is not None:
        worse = _worse_than_baseline(candidate, baseline.metrics, baseline.name, policy, baseline_paired)
        if worse:
            return False, f"first model worse than its baseline {baseline.name}: " + "; ".join(worse)
        gain = (baseline_paired or {}).get("mean_ie_f1", {}).get("ci95")
        versus = f"; vs {baseline.name}: " + (_ci(gain) if gain is not None else "not worse (point estimate)")
        return True, f"first production model: passes the floors ({ie} {candidate[ie]:g}){versus}"
    return True, f"first production model: passes the floors ({ie} {candidate[ie]:g})"


def _ci(interval: list[float]) -> str:
    return f"95% CI [{interval[0]:+.2f}, {interval[1]:+.2f}]"


def decide(
    candidate: Mapping[str, float],
    production: Mapping[str, float] | None,
    policy: PromotionPolicy,
    *,
    protocols: tuple[str | None, str | None] = (None, None),
    paired: Mapping[str, Any] | None = None,
    baseline: Baseline | None = None,
    baseline_paired: Mapping[str, Any] | None = None,
) -> tuple[bool, str]:
    """(promote?, why): the gate, on summary metrics (percent points, as evaluate writes them).

    ``protocols``: the candidate's and production's evaluation protocol digests; scores measured
    under different ones (another decoding, other test records) are not compared at all.
    ``paired``: :func:`chatuie.eval.comparison.paired_gain` of production's and the candidate's record
    scores; its ``mean_ie_f1`` interval decides the IE rule, its ``chat`` intervals go in the reason.
    ``baseline`` / ``baseline_paired`` (the baseline's record scores paired with the candidate's):
    only read when there is no production yet.
    """
    ie = policy.ie_metric
    if ie not in candidate:
        return False, f"candidate has no {ie} metric"
    changed = production is not None and protocols[0] != protocols[1]
    if changed and not policy.allow_protocol_change:
        return False, (
            f"not comparable: evaluated under protocol {protocols[0] or 'unrecorded'}, production under "
            f"{protocols[1] or 'unrecorded'} (evaluate params or evaluation code differ); "
            "promote.allow_protocol_change compares them anyway"
        )
    if production is None:
        return _first_model(candidate, policy, baseline, baseline_paired)
    if ie not in production:
        return False, f"production has no {ie} metric to compare with"
    failures: list[str] = []
    passes: list[str] = []
    gain = candidate[ie] - production[ie]
    interval = (paired or {}).get("mean_ie_f1", {}).get("ci95") if ie == "mean_ie_f1" else None
    if interval is not None:
        low = interval[0]
        text = f"{ie} gain {gain:+.2f}, {_ci(interval)}"
        if low <= policy.min_f1_gain + 1e-9:
            failures.append(f"{text}: lower bound {low:+.2f} not above {policy.min_f1_gain:g} (noise)")
        else:
            passes.append(f"{text}: lower bound above {policy.min_f1_gain:g}")
    else:
        if gain + 1e-9 < policy.min_f1_gain:
            failures.append(
                f"{ie} gain {gain:+.2f} < {policy.min_f1_gain:g} "
                f"(candidate {candidate[ie]:g}, production {production[ie]:g}; "
                "point estimate: no record scores)"
            )
        else:
            passes.append(
                f"{ie} gain {gain:+.2f} >= {policy.min_f1_gain:g} (point estimate: no record scores)"
            )
    chat_intervals = (paired or {}).get("chat", {})
    for metric in policy.floor_chat:
        before, now = production.get(metric), candidate.get(metric)
        if before is None or now is None:
            failures.append(f"{metric} missing")
            continue
        drop, too_far = _chat_drop(before, now, policy)
        detail = ""
        if metric in chat_intervals:
            low, high = chat_intervals[metric]["ci95"]
            detail = f", relative change 95% CI [{low:+.1%}, {high:+.1%}]"
        if too_far:
            failures.append(
                f"{metric} drops {drop:.1%} > {policy.max_chat_drop:.1%} ({now:g} vs {before:g}{detail})"
            )
        elif detail:
            passes.append(f"{metric} {now:g} vs {before:g}{detail}")
    if failures:
        return False, "; ".join(failures)
    return True, (
        "; ".join(passes)
        + f"; chat drops within {policy.max_chat_drop:.1%}"
        + ("; evaluation protocol changed (allowed)" if changed else "")
    )
