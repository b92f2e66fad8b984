"""The run report: the paper's tables and plots for this pipeline run, as Markdown and HTML.

Reads ``metrics/<model>.json`` (written by ``tasks/evaluate.py``; ``rl`` when it exists), the
training summaries and loss curves ``metrics/train/<model>.json`` / ``<model>_loss.csv`` and the RL
stage's ``metrics/rl_train.json`` when they exist; writes ``report.md`` (tables, plots
linked as SVG files in ``report_plots/``) and a self-contained ``report.html`` (inline CSS and
SVG). The charts are drawn by ``chatuie.eval.charts`` (matplotlib, byte-identical for the same metrics).

Tables:

* IE F1 per dataset: base (free decoding), SFT, SFT + constraint, RL (constrained; when
  ``metrics/rl.json`` exists), with the headline metric of each task (strict relation F1 for
  ``re``, argument classification F1 for ``ee``); zero-shot datasets get their own table.
* Per dataset and decoding mode: precision / recall / F1, valid-JSON rate, invented-span rate
  (predicted spans that are not substrings of the text).
* Chat retention: WebQA exact match and character ROUGE-1, C-Eval accuracy, each also as a
  percentage of the base model's value.

A missing value (a model, a mode or a dataset not evaluated) shows as ``—``.
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatuie.errors import ChatuieError
from chatuie.eval.charts import bar_chart, line_chart
from chatuie.eval.metrics import HEADLINE

DASH = "—"
KNOWN_TASKS = {"resume": "ner", "conll04": "re", "fewfc": "ee"}
MODEL_NAMES = {"base": "Base", "sft": "SFT", "rl": "RL"}
PLOTS_DIR = "report_plots"


class ReportError(ChatuieError, ValueError):
    pass


@dataclass(frozen=True)
class Column:
    title: str
    model: str
    mode: str


# The paper's comparison: the chat model as is, after SFT, with the constraint, after RL.
COLUMNS = (
    Column("Base", "base", "free"),
    Column("SFT", "sft", "free"),
    Column("SFT + constraint", "sft", "constrained"),
    Column("RL", "rl", "constrained"),
)


@dataclass(frozen=True)
class ReportConfig:
    """``report`` section of params.yaml."""

    title: str = "ChatUIE run report"
    models: list[str] = field(default_factory=lambda: ["base", "sft", "rl"])  # metrics/<model>.json
    zero_shot: list[str] = field(default_factory=list)  # datasets not taught in SFT (own table)


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""
    text_columns: int = 1  # leading columns aligned left in Markdown


@dataclass
class Report:
    title: str
    tables: list[Table]
    plots: dict[str, tuple[str, str]]  # file stem -> (title, svg)
    sources: list[str]

    def markdown(self) -> str:
        out = [f"# {self.title}", "", f"Sources: {', '.join(f'`{s}`' for s in self.sources)}", ""]
        for table in self.tables:
            out += [f"## {table.title}", ""]
            if table.note:
                out += [table.note, ""]
            out.append("| " + " | ".join(_md_cell(h) for h in table.header) + " |")
            aligns = ["---"] * table.text_columns + ["---:"] * (len(table.header) - table.text_columns)
            out.append("|" + "|".join(aligns) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
            out.append("")
        if self.plots:
            out += ["## Plots", ""]
            for stem, (title, _) in self.plots.items():
                out += [f"![{title}]({PLOTS_DIR}/{stem}.svg)", ""]
        return "\n".join(out)

    def html(self) -> str:
        parts = [
            "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>",
            f"<title>{html.escape(self.title)}</title><style>{CSS}</style></head><body>",
            f"<h1>{html.escape(self.title)}</h1>",
            f"<p class='meta'>Sources: {html.escape(', '.join(self.sources))}</p>",
        ]
        for table in self.tables:
            parts.append(f"<h2>{html.escape(table.title)}</h2>")
            if table.note:
                parts.append(f"<p class='note'>{html.escape(table.note)}</p>")

            def cell(tag: str, i: int, value: str, n: int = table.text_columns) -> str:
                return f"<{tag}{' class=t' if i < n else ''}>{html.escape(value)}</{tag}>"

            head = "".join(cell("th", i, h) for i, h in enumerate(table.header))
            body = "".join(
                "<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in table.rows
            )
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        if self.plots:
            parts.append("<h2>Plots</h2><div class='plots'>")
            parts += [f"<figure>{svg}</figure>" for _, svg in self.plots.values()]
            parts.append("</div>")
        parts.append("</body></html>\n")
        return "".join(parts)


CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI","Noto Sans CJK SC",sans-serif;max-width:1100px;
 margin:24px auto;padding:0 16px;color:#1d1d1f}
h1{font-size:24px} h2{font-size:18px;margin-top:28px}
.meta,.note{color:#666;font-size:13px}
table{border-collapse:collapse;font-size:14px}
th,td{border:1px solid #ddd;padding:3px 10px;text-align:right}
th.t,td.t{text-align:left} thead th{background:#f4f4f6}
tbody tr:nth-child(even){background:#fafafa}
.plots{display:flex;flex-wrap:wrap;gap:16px} figure{margin:0}
"""


def _md_cell(value: str) -> str:
    return value.replace("|", "\\|")


# ----------------------------------------------------------------------------------------------
# reading metrics


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _fmt(value: float | None, digits: int = 2) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def task_of(dataset: str, result: dict[str, Any] | None) -> str | None:
    """The IE task of a dataset's metrics (known datasets by name, others by their metric keys)."""
    if dataset in KNOWN_TASKS:
        return KNOWN_TASKS[dataset]
    if isinstance(result, dict):
        if "argument_classification" in result:
            return "ee"
        if "relation_strict" in result:
            return "re"
        if "entity" in result:
            return "ner"
    return None


def load_metrics(metrics_dir: str | Path, models: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{model: metrics}`` for every ``metrics/<model>.json`` that exists."""
    out: dict[str, dict[str, Any]] = {}
    for model in models:
        path = Path(metrics_dir) / f"{model}.json"
        if not path.exists():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ReportError(f"{path}: cannot read metrics: {err}") from None
        if not isinstance(data, dict):
            raise ReportError(f"{path}: expected a JSON object")
        out[model] = data
    return out


def load_losses(train_dir: str | Path, models: Sequence[str]) -> dict[str, list[tuple[float, float]]]:
    """Training loss curves ``metrics/train/<model>_loss.csv`` (step, loss) that exist."""
    out: dict[str, list[tuple[float, float]]] = {}
    for model in models:
        path = Path(train_dir) / f"{model}_loss.csv"
        if not path.exists():
            continue
        points = []
        with open(path, encoding="utf-8", newline="") as handle:
            for row in csv.DictReader(handle):
                try:
                    points.append((float(row["step"]), float(row["loss"])))
                except (KeyError, TypeError, ValueError):
                    continue  # a malformed row does not stop the report
        if points:
            out[model] = points
    return out


# ----------------------------------------------------------------------------------------------
# tables


def _datasets(metrics: dict[str, dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for data in metrics.values():
        for dataset in _get(data, "ie") or {}:
            seen.setdefault(dataset, None)
    return list(seen)


def _f1(metrics: dict[str, dict[str, Any]], column: Column, dataset: str) -> float | None:
    return _num(_get(metrics.get(column.model), "ie", dataset, column.mode, "f1"))


def _invented(result: Any) -> float | None:
    """The invented-span rate, None where no span was parsed (0 % of nothing is not a result)."""
    if not _num(_get(result, "spans")):
        return None
    return _num(_get(result, "invented_span_rate"))


def _modes(data: Any) -> set[str]:
    return {mode for result in (_get(data, "ie") or {}).values() for mode in result}


def _columns(metrics: dict[str, dict[str, Any]]) -> list[Column]:
    # The RL column only when the RL model was evaluated; the others always (a dash shows a gap).
    columns = [c for c in COLUMNS if c.model != "rl" or c.model in metrics]
    base_modes = _modes(metrics.get("base"))
    if base_modes and "free" not in base_modes and "constrained" in base_modes:
        # Base evaluated under the constraint alone (evaluate.model_constraint_modes): say so.
        columns[0] = Column("Base + constraint", "base", "constrained")
    return columns


def f1_table(metrics: dict[str, dict[str, Any]], datasets: list[str], title: str) -> Table:
    columns = _columns(metrics)
    rows = []
    sums: list[list[float]] = [[] for _ in columns]
    for dataset in datasets:
        sample = next(
            (
                _get(m, "ie", dataset, mode)
                for m in metrics.values()
                for mode in ("constrained", "free")
                if _get(m, "ie", dataset, mode)
            ),
            None,
        )
        task = task_of(dataset, sample)
        metric = HEADLINE.get(task or "", "f1")
        records = _num(_get(sample, "records"))
        row = [dataset, f"{task or '?'} ({metric})", DASH if records is None else str(int(records))]
        for i, column in enumerate(columns):
            value = _f1(metrics, column, dataset)
            row.append(_fmt(value))
            if value is not None:
                sums[i].append(value)
        rows.append(row)
    if len(datasets) > 1:
        mean = [_fmt(sum(v) / len(v)) if len(v) == len(datasets) else DASH for v in sums]
        rows.append(["mean", "", "", *mean])
    return Table(
        title,
        ["dataset", "task (metric)", "records", *[c.title for c in columns]],
        rows,
        "F1 in %. Base and SFT decode freely; SFT + constraint and RL decode with the generation "
        "constraint (spans copied from the text, labels from the schema).",
        text_columns=2,
    )


def detail_table(metrics: dict[str, dict[str, Any]], datasets: list[str]) -> Table:
    rows = []
    for dataset in datasets:
        for model, data in metrics.items():
            for mode, result in (_get(data, "ie", dataset) or {}).items():
                task = task_of(dataset, result)
                head = _get(result, HEADLINE.get(task or "", "")) or {}
                rows.append(
                    [
                        dataset,
                        MODEL_NAMES.get(model, model),
                        mode,
                        _fmt(_num(head.get("precision"))),
                        _fmt(_num(head.get("recall"))),
                        _fmt(_num(_get(result, "f1"))),
                        _fmt(_num(_get(result, "json_validity"))),
                        _fmt(_invented(result)),
                        DASH if _num(_get(result, "spans")) is None else str(int(result["spans"])),
                    ]
                )
    return Table(
        "Decoding modes: validity and invented spans",
        ["dataset", "model", "mode", "P", "R", "F1", "valid JSON %", "invented spans %", "spans"],
        rows,
        "Invented spans: predicted spans that are not substrings of the input (0 by construction "
        "with the constraint); — where no span could be parsed at all.",
        text_columns=3,
    )


CHAT_METRICS = (
    ("WebQA exact match", ("chat", "webqa", "exact_match")),
    ("WebQA ROUGE-1 (char)", ("chat", "webqa", "rouge1_char_f1")),
    ("C-Eval accuracy", ("chat", "ceval", "accuracy")),
)


def chat_table(metrics: dict[str, dict[str, Any]]) -> Table:
    models = [m for m in ("base", "sft", "rl") if m in metrics] + [
        m for m in metrics if m not in ("base", "sft", "rl")
    ]
    header = ["metric"]
    for model in models:
        header.append(MODEL_NAMES.get(model, model))
        if model != "base" and "base" in metrics:
            header.append(f"{MODEL_NAMES.get(model, model)} / Base")
    rows = []
    for name, keys in CHAT_METRICS:
        base = _num(_get(metrics.get("base"), *keys))
        row = [name]
        for model in models:
            value = _num(_get(metrics[model], *keys))
            row.append(_fmt(value))
            if model != "base" and "base" in metrics:
                row.append(DASH if value is None or not base else f"{100 * value / base:.1f}%")
        rows.append(row)
    return Table(
        "Chat ability retained",
        header,
        rows,
        "Scores in %; 'X / Base' is the model's score as a percentage of the base model's "
        "(100% = nothing lost to IE training).",
    )


def rl_table(rl_train: dict[str, Any] | None) -> Table | None:
    """metrics/rl_train.json (the RL stage's own summary)."""
    if not rl_train:
        return None
    row = [
        str(rl_train.get("algorithm", DASH)),
        DASH if _num(rl_train.get("steps")) is None else str(int(rl_train["steps"])),
        _fmt(_num(rl_train.get("kl_coef")), 3),
        _fmt(_num(rl_train.get("reward_start")), 3),
        _fmt(_num(rl_train.get("reward_end")), 3),
        _fmt(_num(rl_train.get("kl_mean")), 4),
        _fmt(_num(rl_train.get("seconds")), 1),
    ]
    header = ["algorithm", "steps", "KL coef", "reward (start)", "reward (end)", "mean KL", "seconds"]
    return Table("RL training", header, [row], "Reward averaged over the first and last updates.")


def rl_rewards(rl_train: dict[str, Any] | None) -> list[tuple[float, float]]:
    points = []
    for row in (rl_train or {}).get("log", []) or []:
        step, reward = _num(_get(row, "step")), _num(_get(row, "reward"))
        if step is not None and reward is not None:
            points.append((step, reward))
    return points


def training_table(train_metrics: dict[str, dict[str, Any]]) -> Table | None:
    if not train_metrics:
        return None
    rows = []
    for model, data in train_metrics.items():
        rows.append(
            [
                MODEL_NAMES.get(model, model),
                DASH if _num(data.get("samples")) is None else str(int(data["samples"])),
                DASH if _num(data.get("steps")) is None else str(int(data["steps"])),
                _fmt(_num(data.get("final_loss")), 4),
                _fmt(_num(data.get("seconds")), 1),
            ]
        )
    return Table("Training", ["stage", "samples", "steps", "final loss", "seconds"], rows)


# ----------------------------------------------------------------------------------------------
# the report


def _fold_zero_shot(metrics: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """The evaluate stage writes zero-shot datasets under their own key (``zero_shot``, beside
    ``ie``): read them as IE results, and remember which they are."""
    names: set[str] = set()
    out: dict[str, dict[str, Any]] = {}
    for model, data in metrics.items():
        extra = _get(data, "zero_shot")
        if isinstance(extra, dict) and extra:
            names.update(extra)
            out[model] = {**data, "ie": {**(_get(data, "ie") or {}), **extra}}
        else:
            out[model] = data
    return out, names


def build_report(
    metrics: dict[str, dict[str, Any]],
    config: ReportConfig | None = None,
    *,
    losses: dict[str, list[tuple[float, float]]] | None = None,
    train_metrics: dict[str, dict[str, Any]] | None = None,
    rl_train: dict[str, Any] | None = None,
    sources: Sequence[str] = (),
) -> Report:
    config = config or ReportConfig()
    if not metrics:
        raise ReportError("no metrics to report: run the evaluate stage first (metrics/<model>.json)")
    metrics, evaluated_zero_shot = _fold_zero_shot(metrics)
    datasets = _datasets(metrics)
    zero_shot = [d for d in datasets if d in config.zero_shot or d in evaluated_zero_shot]
    in_domain = [d for d in datasets if d not in zero_shot]
    tables = [f1_table(metrics, in_domain, "IE F1 per dataset")]
    if zero_shot:
        tables.append(f1_table(metrics, zero_shot, "Zero-shot IE F1 (datasets not taught in SFT)"))
    tables.append(detail_table(metrics, datasets))
    tables.append(chat_table(metrics))
    for extra in (training_table(train_metrics or {}), rl_table(rl_train)):
        if extra is not None:
            tables.append(extra)

    plots: dict[str, tuple[str, str]] = {}
    columns = _columns(metrics)
    if datasets:
        title = "IE F1 per dataset"
        series = [(c.title, [_f1(metrics, c, d) for d in datasets]) for c in columns]
        plots["f1_per_dataset"] = (title, bar_chart(title, datasets, series, "F1 (%)", min_top=10))
        title = "Invented-span rate"
        modes = [
            (f"{MODEL_NAMES.get(m, m)} {mode}", m, mode)
            for m in metrics
            for mode in ("free", "constrained")
            if any(_get(metrics[m], "ie", d, mode) for d in datasets)
        ]
        series = [
            (name, [_invented(_get(metrics[m], "ie", d, mode)) for d in datasets]) for name, m, mode in modes
        ]
        plots["invented_spans"] = (
            title,
            bar_chart(title, datasets, series, "invented spans (%)", min_top=10),
        )
    chat_models = [m for m in metrics if any(_get(metrics[m], *keys) is not None for _, keys in CHAT_METRICS)]
    if chat_models:
        title = "Chat ability"
        series = [
            (MODEL_NAMES.get(m, m), [_num(_get(metrics[m], *keys)) for _, keys in CHAT_METRICS])
            for m in chat_models
        ]
        groups = [name for name, _ in CHAT_METRICS]
        plots["chat_ability"] = (title, bar_chart(title, groups, series, "score (%)", min_top=10))
    if losses:
        title = "Training loss"
        series = [(MODEL_NAMES.get(m, m), pts) for m, pts in losses.items()]
        plots["training_loss"] = (title, line_chart(title, series, "step", "loss"))
    rewards = rl_rewards(rl_train)
    if rewards:
        title = "RL reward"
        plots["rl_reward"] = (title, line_chart(title, [("reward", rewards)], "update", "reward"))
    return Report(config.title, tables, plots, list(sources))


def write_report(
    metrics_dir: str | Path = "metrics", out_dir: str | Path = "reports", config: ReportConfig | None = None
) -> list[Path]:
    """Write ``report.md``, ``report.html`` and ``report_plots/*.svg``; returns the paths."""
    from chatuie.io import atomic_open

    config = config or ReportConfig()
    metrics_dir, out_dir = Path(metrics_dir), Path(out_dir)
    metrics = load_metrics(metrics_dir, config.models)
    train_dir = metrics_dir / "train"
    train_metrics = {}
    for model in config.models:
        path = train_dir / f"{model}.json"
        if path.exists():
            try:
                train_metrics[model] = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as err:
                raise ReportError(f"{path}: cannot read: {err}") from None
    rl_path = metrics_dir / "rl_train.json"
    try:
        rl_train = json.loads(rl_path.read_text(encoding="utf-8")) if rl_path.exists() else None
    except ValueError as err:
        raise ReportError(f"{rl_path}: cannot read: {err}") from None
    report = build_report(
        metrics,
        config,
        losses=load_losses(train_dir, config.models),
        train_metrics=train_metrics,
        rl_train=rl_train if isinstance(rl_train, dict) else None,
        sources=[str(metrics_dir / f"{m}.json") for m in metrics],
    )
    plots_dir = out_dir / PLOTS_DIR
    written = []
    for stem, (_, svg) in report.plots.items():
        written.append(_write(plots_dir / f"{stem}.svg", svg + "\n", atomic_open))
    for stale in plots_dir.glob("*.svg") if plots_dir.exists() else []:
        if stale.stem not in report.plots:  # a plot this run cannot draw must not linger
            stale.unlink()
    written.append(_write(out_dir / "report.md", report.markdown(), atomic_open))
    written.append(_write(out_dir / "report.html", report.html(), atomic_open))
    return written


def _write(path: Path, content: str, atomic_open: Any) -> Path:
    with atomic_open(path) as handle:
        handle.write(content)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # readable like any other report, not mkstemp's 0600
    return path
