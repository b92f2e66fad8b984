"""`chatuie metrics`: the headline metrics per model in 80 columns, from the committed metrics/."""

from __future__ import annotations

import json
import shutil

from conftest import ROOT
from typer.testing import CliRunner

from chatuie.cli import app

runner = CliRunner()
METRICS = ROOT / "metrics"


def _read(name: str) -> dict:
    return json.loads((METRICS / f"{name}.json").read_text())


def _row(text: str, heading: str, label: str) -> str:
    """The line ``label`` after the line starting with ``heading``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    return next(line for line in lines[start + 1 :] if line.strip().startswith(label))


def test_the_committed_metrics_fit_80_columns_with_the_right_numbers() -> None:
    result = runner.invoke(app, ["metrics", "--metrics-dir", str(METRICS)])
    assert result.exit_code == 0, result.output
    text = result.output
    assert all(len(line) <= 80 for line in text.splitlines()), max(text.splitlines(), key=len)
    assert text.splitlines()[1].split() == ["base", "sft", "rl"]

    sft, rl, base = _read("sft"), _read("rl"), _read("base")
    resume = sft["ie"]["resume"]["constrained"]["entity"]
    low, high = resume["f1_ci95"]
    expected = f"{resume['f1']:.2f} [{low:.2f},{high:.2f}]"
    assert expected == "75.21 [67.50,82.86]"  # the README's numbers
    assert expected in _row(text, "resume (ner, entity F1)", "constrained")
    conll = _row(text, "conll04 (re, relation_strict F1)", "free").split()
    assert conll[:2] == ["free", "-"] and conll[-1] == "-"  # free decoding: sft only
    fewfc = rl["ie"]["fewfc"]["constrained"]["argument_classification"]
    assert _row(text, "fewfc (ee, argument_classification F1)", "constrained").endswith(
        f"{fewfc['f1']:.2f} [{fewfc['f1_ci95'][0]:.2f},{fewfc['f1_ci95'][1]:.2f}]"
    )
    ceval = [m["summary"]["ceval_accuracy"] for m in (base, sft, rl)]
    assert _row(text, "F1", "C-Eval accuracy").split()[-3:] == [f"{v:.2f}" for v in ceval]
    mean = _row(text, "F1", "mean IE F1").split()[-3:]
    assert mean == [f"{m['summary']['mean_ie_f1']:.2f}" for m in (base, sft, rl)]
    gain = _read("rl_vs_sft")["ie"]["resume"]["constrained"]
    assert _row(text, "RL - SFT", "resume, constrained").split(None, 2)[-1] == (
        f"{gain['f1_gain']:+.2f} [{gain['f1_gain_ci95'][0]:+.2f},{gain['f1_gain_ci95'][1]:+.2f}]"
    )


def test_json_holds_the_same_numbers() -> None:
    result = runner.invoke(app, ["metrics", "--json", "--metrics-dir", str(METRICS)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert list(summary["models"]) == ["base", "sft", "rl"]
    sft = _read("sft")
    resume = summary["models"]["sft"]["ie"]["resume"]["free"]
    assert resume["f1"] == sft["ie"]["resume"]["free"]["entity"]["f1"] == sft["summary"]["f1_resume_free"]
    assert resume["f1_ci95"] == sft["ie"]["resume"]["free"]["entity"]["f1_ci95"]
    assert resume["metric"] == "entity" and resume["task"] == "ner"
    assert summary["models"]["rl"]["webqa_rouge1"] == _read("rl")["summary"]["webqa_rouge1"]
    assert summary["rl_vs_sft"]["mean_ie_f1_gain"] == _read("rl_vs_sft")["summary"]["mean_ie_f1_gain"]


def test_wide_values_and_long_names_still_fit(tmp_path) -> None:
    """Worst-case numbers (100.00 with full intervals) and a user dataset with a long name."""
    head = {"f1": 100.0, "f1_ci95": [100.0, 100.0]}
    result = {"f1": 100.0, "entity": head}
    name = "a_user_dataset_with_a_rather_long_name_declared_in_prepare_datasets_of_params"
    for model in ("base", "sft", "rl"):
        data = {
            "ie": {name: {"constrained": result, "a_decoding_mode_with_a_long_name": result}},
            "chat": {"webqa": {"rouge1_char_f1": 100.0, "exact_match": 100.0}, "ceval": {"accuracy": 100.0}},
            "summary": {"mean_ie_f1": 100.0},
        }
        (tmp_path / f"{model}.json").write_text(json.dumps(data))
    out = runner.invoke(app, ["metrics", "--metrics-dir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert all(len(line) <= 80 for line in out.output.splitlines()), out.output
    assert out.output.count("100.00 [100.00,100.00]") == 6


def test_only_the_models_present_and_a_clear_error_without_any(tmp_path) -> None:
    shutil.copy(METRICS / "sft.json", tmp_path / "sft.json")
    out = runner.invoke(app, ["metrics", "--metrics-dir", str(tmp_path)])
    assert out.exit_code == 0 and out.output.splitlines()[1].split() == ["sft"]
    assert "RL - SFT" not in out.output
    (tmp_path / "sft.json").unlink()
    out = runner.invoke(app, ["metrics", "--metrics-dir", str(tmp_path)])
    assert out.exit_code == 1 and "sft.json" in out.output and "dvc repro" in out.output
