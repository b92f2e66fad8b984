"""Two evaluated models compared on the same test records, with paired bootstrap intervals.

The evaluate stage writes each record's prediction next to its gold (reports/eval/<model>/
predictions.<dataset>.<mode>.jsonl) and each chat example's score (predictions.webqa.jsonl,
predictions.ceval.jsonl). :func:`record_scores` turns those into per-record counts of each
dataset's headline metric; :func:`paired_gain` resamples the *same* record indices for both models,
so the interval is that of the difference, much narrower than two independent intervals. The RL
comparison (stage ``rl_compare``) and the promotion gate both read it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from chatuie.data.records import Record
from chatuie.eval.metrics import HEADLINE, IEScorer, paired_bootstrap_deltas, percentile_interval
from chatuie.io import read_jsonl

# The per-record counts a registered version carries (an artifact of its run), for the gate.
# Chat metrics: summary key -> (dataset: its predictions file and metrics/<model>.json "chat" key,
# the metric there, the per-question field of predictions.<dataset>.jsonl that averages to it).
CHAT_METRICS = {
    "webqa_rouge1": ("webqa", "rouge1_char_f1", "rouge1_char_f1"),
    "webqa_exact_match": ("webqa", "exact_match", "exact_match"),
    "ceval_accuracy": ("ceval", "accuracy", "correct"),
}


def task_of(result: Mapping[str, Any]) -> str:
    """The task of one dataset's evaluate result, from the metrics it carries."""
    if "argument_classification" in result:
        return "ee"
    if "relation_strict" in result:
        return "re"
    return "ner"


def _structures(plain: Mapping[str, Any]) -> dict[str, list]:
    record = Record.from_dict({"id": "", "dataset": "", "split": "", "task": "", "text": "", **plain})
    return {"entities": record.entities, "relations": record.relations, "events": record.events}


def prediction_rows(predictions: Sequence[Mapping[str, Any]], task: str) -> list[list[int]]:
    """Each record's (tp, pred, gold) of ``task``'s headline metric, rescored from its prediction."""
    scorer = IEScorer(task)
    for line in predictions:
        scorer.add(_structures(line["gold"]), _structures(line["pred"]))
    metric = HEADLINE[task]
    return [list(counts.get(metric, (0, 0, 0))) for counts in scorer.record_counts]


def dataset_scores(predictions: Sequence[Mapping[str, Any]], task: str, mode: str) -> dict[str, Any]:
    """One IE dataset's entry of :func:`record_scores`: its record ids and count rows."""
    return {
        "mode": mode,
        "metric": HEADLINE[task],
        "ids": [line["id"] for line in predictions],
        "rows": prediction_rows(predictions, task),
    }


def record_scores(eval_dir: str | Path, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Per-record scores of one evaluated model: each IE dataset's headline metric in its headline
    (first) constraint mode, and each chat example's score where its predictions file exists."""
    eval_dir = Path(eval_dir)
    datasets: dict[str, Any] = {}
    for dataset, modes in metrics.get("ie", {}).items():
        mode, result = next(iter(modes.items()))
        path = eval_dir / f"predictions.{dataset}.{mode}.jsonl"
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: no predictions for {dataset} ({mode}); evaluate the model again"
            )
        datasets[dataset] = dataset_scores(list(read_jsonl(path)), task_of(result), mode)
    chat: dict[str, Any] = {}
    for key, (name, _, field) in CHAT_METRICS.items():
        path = eval_dir / f"predictions.{name}.jsonl"
        if path.exists():
            lines = list(read_jsonl(path))
            chat[key] = {
                "ids": [line["id"] for line in lines],
                "scores": [float(line[field]) for line in lines],
            }
    return {"ie": datasets, "chat": chat}


def _same_ids(what: str, a: Sequence[str], b: Sequence[str]) -> None:
    if list(a) != list(b):
        raise ValueError(
            f"{what}: the two models were scored on different records ({len(a)} vs {len(b)}); "
            "a paired comparison needs the same evaluation protocol"
        )


def paired_gain(
    base: Mapping[str, Any],
    new: Mapping[str, Any],
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """``new`` minus ``base`` (two :func:`record_scores`) on the same records, with intervals.

    ``ie``: per dataset, the F1 change in points; ``mean_ie_f1``: the change of the mean over
    datasets (each dataset's records resampled on their own, the mean taken per resample); ``chat``:
    each chat metric's relative change (0.01 = +1 %). Intervals: ``level`` percentile bootstrap.
    """
    import numpy as np

    ie: dict[str, Any] = {}
    mean_deltas = np.zeros(resamples)
    datasets = sorted(set(base.get("ie", {})) & set(new.get("ie", {})))
    for position, dataset in enumerate(datasets):
        a, b = base["ie"][dataset], new["ie"][dataset]
        _same_ids(dataset, a["ids"], b["ids"])
        if not a["rows"]:
            ie[dataset] = {"delta": 0.0, "ci95": [0.0, 0.0]}
            continue
        # One set of resamples per dataset gives its own interval and its share of the mean's;
        # a seed per dataset keeps datasets of equal size from drawing the same record indices.
        point, deltas = paired_bootstrap_deltas(a["rows"], b["rows"], resamples, seed + position)
        ie[dataset] = {"delta": round(point, 2), "ci95": percentile_interval(deltas, level)}
        mean_deltas += deltas
    out: dict[str, Any] = {"ie": ie, "chat": {}}
    if datasets:
        out["mean_ie_f1"] = {
            "delta": round(sum(ie[d]["delta"] for d in datasets) / len(datasets), 2),
            "ci95": percentile_interval(mean_deltas / len(datasets), level),
        }
    rng = np.random.default_rng(seed)
    for key in sorted(set(base.get("chat", {})) & set(new.get("chat", {}))):
        a, b = base["chat"][key], new["chat"][key]
        _same_ids(key, a["ids"], b["ids"])
        sa, sb = np.asarray(a["scores"], dtype=np.float64), np.asarray(b["scores"], dtype=np.float64)
        if not len(sa) or sa.sum() == 0:
            continue  # a relative change of a zero score is undefined
        picks = rng.integers(0, len(sa), size=(resamples, len(sa)))
        ma, mb = sa[picks].mean(axis=1), sb[picks].mean(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            relative = np.nan_to_num((mb - ma) / ma)
        out["chat"][key] = {
            "relative_change": round(float((sb.mean() - sa.mean()) / sa.mean()), 4),
            "ci95": [round(x / 100, 4) for x in percentile_interval(100 * relative, level)],
        }
    return out


def compare_runs(
    base: dict[str, Any],
    new: dict[str, Any],
    base_name: str = "sft",
    new_name: str = "rl",
    *,
    paired: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """F1 gained per dataset and mode, and the chat-metric change, between two evaluate metrics;
    with ``paired`` (:func:`paired_gain` of their record scores) the headline mode's gains and the
    chat changes carry their paired 95 % intervals."""

    def delta(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(b - a, 2)

    paired = paired or {}
    ie: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for dataset, modes in new.get("ie", {}).items():
        for position, (mode, result) in enumerate(modes.items()):
            before = base.get("ie", {}).get(dataset, {}).get(mode, {})
            row = {
                base_name: before.get("f1"),
                new_name: result.get("f1"),
                "f1_gain": delta(before.get("f1"), result.get("f1")),
            }
            interval = paired.get("ie", {}).get(dataset)
            if position == 0 and interval is not None:  # record scores are the headline mode's
                row["f1_gain_ci95"] = interval["ci95"]
                summary[f"f1_gain_{dataset}_{mode}_low"] = interval["ci95"][0]
                summary[f"f1_gain_{dataset}_{mode}_high"] = interval["ci95"][1]
            row["json_validity_change"] = delta(before.get("json_validity"), result.get("json_validity"))
            row["invented_span_rate_change"] = delta(
                before.get("invented_span_rate"), result.get("invented_span_rate")
            )
            ie.setdefault(dataset, {})[mode] = row
            summary[f"f1_gain_{dataset}_{mode}"] = row["f1_gain"]
    chat: dict[str, Any] = {}
    for key, (dataset, metric, _) in CHAT_METRICS.items():
        a = base.get("chat", {}).get(dataset, {}).get(metric)
        b = new.get("chat", {}).get(dataset, {}).get(metric)
        name = f"{dataset}_{metric}"
        entry: dict[str, Any] = {base_name: a, new_name: b, "change": delta(a, b)}
        entry["relative_change"] = round((b - a) / a, 4) if a and b is not None else None
        if key in paired.get("chat", {}):
            entry["relative_change_ci95"] = paired["chat"][key]["ci95"]
        chat[name] = entry
        summary[f"{name}_change"] = entry["change"]
        summary[f"{name}_relative_change"] = entry["relative_change"]
    summary["mean_ie_f1_gain"] = delta(
        base.get("summary", {}).get("mean_ie_f1"), new.get("summary", {}).get("mean_ie_f1")
    )
    if "mean_ie_f1" in paired:
        summary["mean_ie_f1_gain_low"], summary["mean_ie_f1_gain_high"] = paired["mean_ie_f1"]["ci95"]
    return {"models": [base_name, new_name], "ie": ie, "chat": chat, "summary": summary}
