"""The run report: tables from metrics/<model>.json, SVG plots (matplotlib), the `report` stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from chatuie.eval.charts import PALETTE, bar_chart, line_chart
from chatuie.eval.report import ReportConfig, ReportError, build_report, write_report
from tests.helpers.pipeline_repo import stage_process

ROOT = Path(__file__).resolve().parents[2]


def ie_result(
    f1: float, *, spans: int = 10, invented: float = 0.0, headline: str = "entity"
) -> dict[str, Any]:
    return {
        headline: {"precision": f1, "recall": f1, "f1": f1, "tp": 1, "pred": 1, "gold": 1},
        "f1": f1,
        "json_validity": 100.0,
        "invented_span_rate": invented,
        "spans": spans,
        "records": 20,
        "instructions": 40,
    }


def metrics_of(scale: float, *, ceval: float, webqa: float, zero_shot: bool = False) -> dict[str, Any]:
    ie = {
        "resume": {"constrained": ie_result(50 * scale), "free": ie_result(40 * scale, invented=12.5)},
        "conll04": {
            "constrained": ie_result(30 * scale, headline="relation_strict"),
            "free": ie_result(20 * scale, spans=0, headline="relation_strict"),
        },
        "fewfc": {
            "constrained": ie_result(25 * scale, headline="argument_classification"),
            "free": ie_result(15 * scale, invented=3.0, headline="argument_classification"),
        },
    }
    if zero_shot:
        ie["msra"] = {"constrained": ie_result(11.0), "free": ie_result(9.0)}
    return {
        "ie": ie,
        "chat": {
            "webqa": {"exact_match": webqa, "rouge1_char_f1": webqa * 2, "examples": 100},
            "ceval": {"accuracy": ceval, "per_category": {}, "examples": 100},
        },
        "summary": {},
    }


def table(report: Any, title: str) -> Any:
    return next(t for t in report.tables if t.title == title)


def test_f1_table_columns_and_rl_column() -> None:
    metrics = {
        "base": metrics_of(0.2, ceval=40.0, webqa=20.0),
        "sft": metrics_of(1.0, ceval=30.0, webqa=25.0),
        "rl": metrics_of(1.2, ceval=36.0, webqa=0.0),
    }
    report = build_report(metrics)
    f1 = table(report, "IE F1 per dataset")
    assert f1.header == ["dataset", "task (metric)", "records", "Base", "SFT", "SFT + constraint", "RL"]
    rows = {r[0]: r for r in f1.rows}
    # Base and SFT columns are free decoding, SFT + constraint and RL constrained.
    assert rows["resume"] == ["resume", "ner (entity)", "20", "8.00", "40.00", "50.00", "60.00"]
    assert rows["conll04"][1] == "re (relation_strict)" and rows["conll04"][3:] == [
        "4.00",
        "20.00",
        "30.00",
        "36.00",
    ]
    assert rows["fewfc"][1] == "ee (argument_classification)"
    assert rows["mean"][3:] == ["5.00", "25.00", "35.00", "42.00"]

    chat = table(report, "Chat ability retained")
    assert chat.header == ["metric", "Base", "SFT", "SFT / Base", "RL", "RL / Base"]
    ceval = next(r for r in chat.rows if r[0] == "C-Eval accuracy")
    assert ceval == ["C-Eval accuracy", "40.00", "30.00", "75.0%", "36.00", "90.0%"]
    webqa = next(r for r in chat.rows if r[0] == "WebQA exact match")
    assert webqa[4:] == ["0.00", "0.0%"]

    detail = table(report, "Decoding modes: validity and invented spans")
    inv = {(r[0], r[1], r[2]): r[7] for r in detail.rows}
    assert inv[("resume", "SFT", "free")] == "12.50" and inv[("resume", "SFT", "constrained")] == "0.00"
    assert inv[("conll04", "SFT", "free")] == "—"  # no span parsed: no rate to speak of

    # Without metrics/rl.json there is no RL column.
    report = build_report({k: v for k, v in metrics.items() if k != "rl"})
    assert table(report, "IE F1 per dataset").header[-1] == "SFT + constraint"
    assert "RL" not in table(report, "Chat ability retained").header

    # Base evaluated under the constraint alone (evaluate.model_constraint_modes): its column says so.
    base_constrained = {
        **metrics["base"],
        "ie": {d: {"constrained": r["constrained"]} for d, r in metrics["base"]["ie"].items()},
    }
    report = build_report({**metrics, "base": base_constrained})
    f1 = table(report, "IE F1 per dataset")
    assert f1.header[3] == "Base + constraint"
    rows = {r[0]: r for r in f1.rows}
    assert rows["resume"][3] == f"{metrics['base']['ie']['resume']['constrained']['f1']:.2f}"


def test_zero_shot_table_and_missing_values() -> None:
    metrics = {"sft": metrics_of(1.0, ceval=30.0, webqa=25.0, zero_shot=True)}
    report = build_report(metrics, ReportConfig(zero_shot=["msra"]))
    main = table(report, "IE F1 per dataset")
    assert [r[0] for r in main.rows] == ["resume", "conll04", "fewfc", "mean"]
    assert main.rows[0][3] == "—"  # no base model evaluated
    assert main.rows[-1][3] == "—" and main.rows[-1][4] == "25.00"
    zero = table(report, "Zero-shot IE F1 (datasets not taught in SFT)")
    assert zero.rows == [["msra", "ner (entity)", "20", "—", "9.00", "11.00"]]
    with pytest.raises(ReportError, match="run the evaluate stage first"):
        build_report({})


def test_zero_shot_key_of_the_evaluate_stage_fills_the_zero_shot_table() -> None:
    """metrics/<model>.json from `evaluate` with `evaluate.zero_shot`: the datasets sit under
    "zero_shot", not "ie"; the report needs no report.zero_shot for them."""
    metrics = {}
    for model, f1 in (("base", 1.0), ("sft", 7.5)):
        data = metrics_of(1.0, ceval=30.0, webqa=25.0)
        data["zero_shot"] = {"mine": {"constrained": ie_result(f1 + 1), "free": ie_result(f1)}}
        metrics[model] = data
    report = build_report(metrics, ReportConfig())
    assert [r[0] for r in table(report, "IE F1 per dataset").rows] == ["resume", "conll04", "fewfc", "mean"]
    zero = table(report, "Zero-shot IE F1 (datasets not taught in SFT)")
    assert zero.rows == [["mine", "ner (entity)", "20", "1.00", "7.50", "8.50"]]
    assert "mine" in report.markdown()


def svg_texts(svg: str) -> list[str]:
    """The text of an SVG's ``<text>`` elements (matplotlib keeps text as text: svg.fonttype none)."""
    root = ET.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    return ["".join(el.itertext()) for el in root.iter("{http://www.w3.org/2000/svg}text")]


def test_svg_charts_are_valid_xml() -> None:
    svg = bar_chart(
        "F1 <per> dataset", ["resume", "中文"], [("Base", [1.0, None]), ("SFT", [50.0, 20.0])], "F1"
    )
    assert svg.startswith("<svg") and svg.endswith("</svg>")  # no XML prolog: it inlines in HTML
    texts = svg_texts(svg)
    for expected in ("F1 <per> dataset", "resume", "中文", "Base", "SFT", "F1", "n/a", "1", "50", "20"):
        assert expected in texts, expected
    bars = [c for c in PALETTE[:2] for _ in range(svg.count(f"fill: {c}"))]
    assert len(bars) == 3 + 2  # three values (one n/a draws no bar) and two legend swatches
    # The y axis reaches a round number above the largest value (50 -> 50, with min_top 60 -> 100).
    assert "50" in texts and "60" not in texts
    assert "100" in svg_texts(bar_chart("t", ["a"], [("s", [50.0])], "y", min_top=60))

    line = line_chart("RL reward", [("reward", [(1.0, -0.5), (2.0, 0.25)])], "update", "reward")
    texts = svg_texts(line)
    for expected in ("RL reward", "reward", "update", "−0.5", "0.2"):  # a negative axis for rewards
        assert expected in texts, expected


def test_charts_are_deterministic_and_matplotlib_is_imported_lazily(tmp_path: Path) -> None:
    """The same metrics give byte-identical files, in this process and in another one (another hash
    seed); importing the report does not import matplotlib."""
    metrics_dir = tmp_path / "metrics"
    (metrics_dir / "train").mkdir(parents=True)
    for name, scale in (("base", 0.2), ("sft", 1.0)):
        (metrics_dir / f"{name}.json").write_text(json.dumps(metrics_of(scale, ceval=30.0, webqa=10.0)))
        (metrics_dir / "train" / f"{name}_loss.csv").write_text("step,loss\n1,7.5\n10,6.0\n20,5.25\n")
    first = write_report(metrics_dir, tmp_path / "a")
    again = write_report(metrics_dir, tmp_path / "a")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in first]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "PYTHONHASHSEED": "12345",
        "MPLCONFIGDIR": str(tmp_path / "mpl"),
    }
    code = (
        "import sys\n"
        "from chatuie.eval.report import write_report\n"
        "assert 'matplotlib' not in sys.modules, 'importing the report imports matplotlib'\n"
        "write_report(sys.argv[1], sys.argv[2])\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(metrics_dir), str(tmp_path / "b")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    for path in first:
        other = tmp_path / "b" / path.relative_to(tmp_path / "a")
        assert path.read_bytes() == other.read_bytes(), path.name


def test_write_report_files(tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    (metrics_dir / "train").mkdir(parents=True)
    for name, scale in (("base", 0.2), ("sft", 1.0)):
        (metrics_dir / f"{name}.json").write_text(json.dumps(metrics_of(scale, ceval=30.0, webqa=10.0)))
        (metrics_dir / "train" / f"{name}_loss.csv").write_text("step,loss\n1,7.5\n10,6.0\n20,bad\n")
        (metrics_dir / "train" / f"{name}.json").write_text(json.dumps({"steps": 20, "final_loss": 6.0}))
    (metrics_dir / "rl.json").write_text(json.dumps(metrics_of(1.1, ceval=29.0, webqa=10.0)))
    rl_log = [{"step": 1, "reward": -0.5, "kl": 0.0}, {"step": 2, "reward": 0.25, "kl": 0.01}]
    rl_train = {"algorithm": "grpo", "steps": 2, "kl_coef": 0.05, "reward_start": -0.5, "reward_end": 0.25}
    (metrics_dir / "rl_train.json").write_text(json.dumps({**rl_train, "log": rl_log}))
    out = tmp_path / "reports"
    (out / "report_plots").mkdir(parents=True)
    (out / "report_plots" / "stale.svg").write_text("<svg/>")
    written = write_report(metrics_dir, out)
    assert {p.name for p in written} == {
        "f1_per_dataset.svg",
        "invented_spans.svg",
        "chat_ability.svg",
        "training_loss.svg",
        "rl_reward.svg",
        "report.md",
        "report.html",
    }
    assert not (out / "report_plots" / "stale.svg").exists()
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| resume | ner (entity) | 20 | 8.00 | 40.00 | 50.00 | 55.00 |" in md
    assert "| grpo | 2 | 0.050 | -0.500 | 0.250 | — | — |" in md
    assert "![IE F1 per dataset](report_plots/f1_per_dataset.svg)" in md
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("<svg") == 5 and "<link" not in page and "<script" not in page
    plots = {svg.stem: svg_texts(svg.read_text(encoding="utf-8")) for svg in out.glob("report_plots/*.svg")}
    columns = ["Base", "SFT", "SFT + constraint", "RL"]
    datasets = ["resume", "conll04", "fewfc"]
    assert set(plots["f1_per_dataset"]) >= {"IE F1 per dataset", "F1 (%)", *columns, *datasets, "55", "33"}
    modes = ["Base free", "Base constrained", "SFT free", "SFT constrained", "RL free", "RL constrained"]
    assert set(plots["invented_spans"]) >= {"Invented-span rate", *modes, *datasets, "12.5", "n/a"}
    chat = ["WebQA exact match", "WebQA ROUGE-1 (char)", "C-Eval accuracy"]
    assert set(plots["chat_ability"]) >= {"Chat ability", "score (%)", "Base", "SFT", "RL", *chat, "29"}
    assert set(plots["training_loss"]) >= {"Training loss", "Base", "SFT", "step", "loss"}
    assert set(plots["rl_reward"]) >= {"RL reward", "reward", "update"}
    assert oct((out / "report.md").stat().st_mode & 0o777) != "0o600"


def test_report_stage_runs_from_params(tmp_path: Path) -> None:
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "sft.json").write_text(json.dumps(metrics_of(1.0, ceval=30.0, webqa=10.0)))
    (tmp_path / "params.yaml").write_text("report:\n  title: Smoke run\n  zero_shot: []\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}  # stage_process adds the repository
    run = stage_process("report", tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "reports" / "report.md").read_text(encoding="utf-8").startswith("# Smoke run")
    assert (tmp_path / "reports" / "report.html").exists()

    (tmp_path / "params.yaml").write_text("report:\n  titel: typo\n")
    run = stage_process("report", tmp_path, env=env)
    assert run.returncode == 1 and "params.yaml: report.titel: unknown key" in run.stderr

    (tmp_path / "params.yaml").write_text("prepare: {}\n")  # no report section: the defaults
    (tmp_path / "metrics" / "sft.json").unlink()
    run = stage_process("report", tmp_path, env=env)
    assert run.returncode == 1 and "run the evaluate stage first" in run.stderr
