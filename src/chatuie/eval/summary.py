"""The headline metrics of the evaluated models, readable in a terminal (``chatuie metrics``).

``dvc metrics show`` prints every number of every metrics file in one table (lines of thousands of
characters). This reads ``metrics/<model>.json`` (the ``evaluate`` stage) and
``metrics/rl_vs_sft.json`` (``rl_compare``) and keeps what the README reports: per dataset and
decoding mode the headline F1 (``chatuie.eval.metrics.HEADLINE``) with its 95 % bootstrap interval, the
mean IE F1, the chat metrics, and RL − SFT per dataset with its paired interval. One column per
model, one row per metric, so the text fits 80 columns.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chatuie.eval.metrics import HEADLINE
from chatuie.eval.report import ReportError, _num, load_metrics, task_of

MODELS = ("base", "sft", "rl")
WIDTH = 80
DASH = "-"
# (label, key in the summary, where in metrics/<model>.json)
CHAT = (
    ("mean IE F1", "mean_ie_f1", ("summary", "mean_ie_f1")),
    ("WebQA ROUGE-1", "webqa_rouge1", ("chat", "webqa", "rouge1_char_f1")),
    ("WebQA exact match", "webqa_exact_match", ("chat", "webqa", "exact_match")),
    ("C-Eval accuracy", "ceval_accuracy", ("chat", "ceval", "accuracy")),
)


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _interval(value: Any) -> list[float] | None:
    if isinstance(value, list) and len(value) == 2 and all(_num(v) is not None for v in value):
        return [float(value[0]), float(value[1])]
    return None


def collect(metrics_dir: str | Path = "metrics", models: tuple[str, ...] = MODELS) -> dict[str, Any]:
    """The summary as data (``chatuie metrics --json``): per model, per dataset and mode the headline
    F1 and its interval; the chat metrics; RL − SFT when ``rl_vs_sft.json`` exists."""
    loaded = load_metrics(metrics_dir, models)
    if not loaded:
        names = ", ".join(f"{m}.json" for m in models)
        raise ReportError(f"{metrics_dir}: none of {names} (the evaluate stage writes them: dvc repro)")
    out: dict[str, Any] = {"models": {}}
    for model, data in loaded.items():
        ie: dict[str, Any] = {}
        for dataset, modes in (_get(data, "ie") or {}).items():
            for mode, result in (modes or {}).items():
                task = task_of(dataset, result)
                metric = HEADLINE.get(task or "", "")
                head = _get(result, metric) if metric else None
                ie.setdefault(dataset, {})[mode] = {
                    "task": task,
                    "metric": metric or "f1",
                    "f1": _num(_get(head, "f1")) if head else _num(_get(result, "f1")),
                    "f1_ci95": _interval(_get(head, "f1_ci95")),
                }
        chat = {key: _num(_get(data, *where)) for _, key, where in CHAT}
        out["models"][model] = {"ie": ie, **chat}
    compare = Path(metrics_dir) / "rl_vs_sft.json"
    if compare.exists():
        try:
            data = json.loads(compare.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ReportError(f"{compare}: cannot read metrics: {err}") from None
        gains: dict[str, Any] = {}
        for dataset, modes in (_get(data, "ie") or {}).items():
            for mode, result in (modes or {}).items():
                gains.setdefault(dataset, {})[mode] = {
                    "f1_gain": _num(_get(result, "f1_gain")),
                    "f1_gain_ci95": _interval(_get(result, "f1_gain_ci95")),
                }
        summary = _get(data, "summary") or {}
        out["rl_vs_sft"] = {
            "ie": gains,
            "mean_ie_f1_gain": _num(summary.get("mean_ie_f1_gain")),
            "mean_ie_f1_gain_ci95": _interval(
                [summary.get("mean_ie_f1_gain_low"), summary.get("mean_ie_f1_gain_high")]
            ),
            "ceval_accuracy_change": _num(summary.get("ceval_accuracy_change")),
            "webqa_rouge1_char_f1_change": _num(summary.get("webqa_rouge1_char_f1_change")),
        }
    return out


def _value(point: float | None, interval: list[float] | None = None, sign: bool = False) -> str:
    if point is None:
        return DASH
    text = f"{point:+.2f}" if sign else f"{point:.2f}"
    if interval:
        low, high = (f"{v:+.2f}" if sign else f"{v:.2f}" for v in interval)
        text += f" [{low},{high}]"
    return text


def _fit(label: str, width: int) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    """Rows of [label, value...]: values right-aligned, the label column gets what is left of 80
    characters (a longer label is cut); a row of one cell is a heading line."""
    columns = len(header)
    widths = [max(len(r[i]) for r in [header, *rows] if len(r) == columns) for i in range(1, columns)]
    label_width = max(len(r[0]) for r in [header, *rows] if len(r) == columns)
    label_width = min(label_width, max(8, WIDTH - sum(w + 2 for w in widths)))
    lines = []
    for row in [header, *rows]:
        if len(row) == 1:
            lines.append(_fit(row[0], WIDTH))
            continue
        cells = [_fit(row[0], label_width).ljust(label_width)]
        cells += [cell.rjust(w) for cell, w in zip(row[1:], widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return lines


def render(summary: dict[str, Any]) -> str:
    """The summary as text lines of at most 80 characters (one column per model)."""
    models = list(summary["models"])
    data = summary["models"]
    datasets: dict[str, dict[str, None]] = {}
    for model in models:
        for dataset, modes in data[model]["ie"].items():
            datasets.setdefault(dataset, {}).update(dict.fromkeys(modes))
    rows: list[list[str]] = []
    for dataset, modes in datasets.items():
        first = next(
            data[m]["ie"][dataset][mode]
            for m in models
            for mode in modes
            if mode in data[m]["ie"].get(dataset, {})
        )
        rows.append([f"{dataset} ({first['task'] or '?'}, {first['metric']} F1)"])
        for mode in modes:
            cells = [f"  {mode}"]
            for model in models:
                result = data[model]["ie"].get(dataset, {}).get(mode)
                cells.append(_value(result["f1"], result["f1_ci95"]) if result else DASH)
            rows.append(cells)
    for label, key, _ in CHAT:
        rows.append([label, *(_value(data[m][key]) for m in models)])
    lines = [
        "F1 and chat metrics in %, [95 % bootstrap interval over records]",
        *_table(rows, ["", *models]),
    ]
    compare = summary.get("rl_vs_sft")
    if compare:
        gains: list[list[str]] = []
        for dataset, modes in compare["ie"].items():
            for mode, gain in modes.items():
                value = _value(gain["f1_gain"], gain["f1_gain_ci95"], sign=True)
                gains.append([f"{dataset}, {mode}", value])
        mean = _value(compare["mean_ie_f1_gain"], compare["mean_ie_f1_gain_ci95"], sign=True)
        gains.append(["mean IE F1", mean])
        gains.append(["C-Eval accuracy", _value(compare["ceval_accuracy_change"], sign=True)])
        gains.append(["WebQA ROUGE-1", _value(compare["webqa_rouge1_char_f1_change"], sign=True)])
        lines += ["", "RL - SFT in points, [paired 95 % interval] (metrics/rl_vs_sft.json)"]
        lines += _table(gains, ["", "rl - sft"])
    return "\n".join(lines)
