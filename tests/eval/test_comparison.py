"""Paired comparisons on the same test records (chatuie.eval.comparison), the gate's interval rule
(chatuie.eval.gate), and the `rl_compare` stage script on evaluate-shaped outputs."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from chatuie.data.records import Entity
from chatuie.eval.comparison import compare_runs, dataset_scores, paired_gain, prediction_rows, record_scores
from chatuie.eval.gate import PromotionPolicy, decide
from chatuie.eval.metrics import IEScorer

TYPES = ["NAME", "ORG", "TITLE"]


def _entity(text: str, label: str) -> dict:
    return {"type": label, "text": text, "start": 0, "end": len(text)}


def ner_predictions(n: int, hit_rate: float, seed: int) -> list[dict]:
    """``n`` records of 3 gold entities each; every gold entity is predicted with ``hit_rate``,
    a wrong one otherwise (what evaluate writes: id, gold, pred)."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        gold = [_entity(f"span{i}-{k}", TYPES[k]) for k in range(3)]
        pred = [
            e if rng.random() < hit_rate else _entity(e["text"], "TITLE" if e["type"] != "TITLE" else "ORG")
            for e in gold
        ]
        lines.append(
            {
                "id": f"r{i}",
                "text": "",
                "answers": [],
                "gold": {"entities": gold, "relations": [], "events": []},
                "pred": {"entities": pred, "relations": [], "events": []},
            }
        )
    return lines


def scores_of(lines: list[dict], chat: list[float] | None = None) -> dict:
    out = {"ie": {"resume": dataset_scores(lines, "ner", "constrained")}, "chat": {}}
    if chat is not None:
        out["chat"]["ceval_accuracy"] = {"ids": [f"q{i}" for i in range(len(chat))], "scores": chat}
    return out


def f1(lines: list[dict]) -> float:
    scorer = IEScorer("ner")
    for line in lines:
        scorer.add(
            {"entities": [Entity(**e) for e in line["gold"]["entities"]]},
            {"entities": [Entity(**e) for e in line["pred"]["entities"]]},
        )
    return scorer.result()["entity"]["f1"]


def test_record_rows_add_up_to_the_scorer_totals() -> None:
    lines = ner_predictions(40, 0.6, seed=1)
    rows = prediction_rows(lines, "ner")
    tp, pred, gold = (sum(r[i] for r in rows) for i in range(3))
    assert len(rows) == 40 and pred == gold == 120
    assert round(200 * tp / (pred + gold), 2) == f1(lines)


def test_identical_models_gain_nothing_and_the_interval_is_a_point() -> None:
    lines = ner_predictions(30, 0.5, seed=2)
    out = paired_gain(scores_of(lines, [1.0, 0.0] * 10), scores_of(lines, [1.0, 0.0] * 10))
    assert out["ie"]["resume"] == {"delta": 0.0, "ci95": [0.0, 0.0]}
    assert out["mean_ie_f1"] == {"delta": 0.0, "ci95": [0.0, 0.0]}
    assert out["chat"]["ceval_accuracy"] == {"relative_change": 0.0, "ci95": [0.0, 0.0]}


POLICY = PromotionPolicy(min_f1_gain=0.0, max_chat_drop=0.05)
SUMMARY_CHAT = {"webqa_rouge1": 20.0, "ceval_accuracy": 50.0}


def _gate(production: list[dict], candidate: list[dict]) -> tuple[bool, str, dict]:
    paired = paired_gain(scores_of(production), scores_of(candidate))
    before = {"mean_ie_f1": f1(production), **SUMMARY_CHAT}
    after = {"mean_ie_f1": f1(candidate), **SUMMARY_CHAT}
    ok, reason = decide(after, before, POLICY, paired=paired)
    return ok, reason, paired


def test_gate_refuses_a_gain_inside_the_noise() -> None:
    # Two draws of the same 50 %-accurate extractor on 48 records: any gain between them is noise.
    production, candidate = ner_predictions(48, 0.5, seed=10), ner_predictions(48, 0.5, seed=11)
    ok, reason, paired = _gate(production, candidate)
    low, high = paired["mean_ie_f1"]["ci95"]
    assert low <= 0.0 <= high
    assert not ok and "not above 0 (noise)" in reason and "95% CI" in reason, reason
    # ...though its point gain (+4.86) passes a rule on the point estimate.
    ok_point, _ = decide(
        {"mean_ie_f1": f1(candidate), **SUMMARY_CHAT}, {"mean_ie_f1": f1(production), **SUMMARY_CHAT}, POLICY
    )
    assert paired["mean_ie_f1"]["delta"] == 4.86 and ok_point


def test_gate_promotes_a_real_gap() -> None:
    production, candidate = ner_predictions(48, 0.4, seed=5), ner_predictions(48, 0.8, seed=5)
    ok, reason, paired = _gate(production, candidate)
    assert paired["mean_ie_f1"]["ci95"][0] > 0
    assert ok and "lower bound above 0" in reason, reason


def test_gate_interval_sits_in_the_reason_for_chat_too() -> None:
    lines = ner_predictions(48, 0.4, seed=6)
    better = ner_predictions(48, 0.9, seed=6)
    paired = paired_gain(scores_of(lines, [1.0] * 20), scores_of(better, [1.0] * 10 + [0.0] * 10))
    ok, reason = decide(
        {"mean_ie_f1": f1(better), "webqa_rouge1": 20.0, "ceval_accuracy": 25.0},
        {"mean_ie_f1": f1(lines), **SUMMARY_CHAT},
        POLICY,
        paired=paired,
    )
    assert not ok and "ceval_accuracy drops 50.0% > 5.0%" in reason and "relative change 95% CI" in reason


def test_paired_gain_refuses_other_records() -> None:
    a, b = scores_of(ner_predictions(10, 0.5, 7)), scores_of(ner_predictions(11, 0.5, 7))
    with pytest.raises(ValueError, match="resume: the two models were scored on different records"):
        paired_gain(a, b)


def _write_eval(root: Path, name: str, lines: list[dict], f1_value: float, chat_scores: list[float]) -> None:
    out = root / "reports" / "eval" / name
    out.mkdir(parents=True)
    (out / "predictions.resume.constrained.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (out / "predictions.ceval.jsonl").write_text(
        "".join(
            json.dumps({"id": f"q{i}", "choice": "A", "correct": s}) + "\n" for i, s in enumerate(chat_scores)
        )
    )
    accuracy = 100 * sum(chat_scores) / len(chat_scores)
    metrics = {
        "ie": {
            "resume": {
                "constrained": {"f1": f1_value, "entity": {"f1": f1_value}, "json_validity": 100.0},
                "free": {"f1": 1.0, "entity": {"f1": 1.0}},
            }
        },
        "chat": {"webqa": {"rouge1_char_f1": 10.0, "exact_match": 0.0}, "ceval": {"accuracy": accuracy}},
        "summary": {"mean_ie_f1": f1_value},
    }
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics" / f"{name}.json").write_text(json.dumps(metrics))


def test_rl_compare_stage_writes_paired_intervals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    sft, rl = ner_predictions(48, 0.4, seed=8), ner_predictions(48, 0.8, seed=8)
    _write_eval(tmp_path, "sft", sft, f1(sft), [1.0, 0.0] * 24)
    _write_eval(tmp_path, "rl", rl, f1(rl), [1.0, 0.0, 0.0, 1.0] * 12)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHATUIE_TRACKING", "off")
    stage = importlib.import_module("tasks.rl_compare")
    monkeypatch.setattr(sys, "argv", ["tasks/rl_compare.py", "sft", "rl"])
    stage.main()
    out = json.loads((tmp_path / "metrics" / "rl_vs_sft.json").read_text())
    row = out["ie"]["resume"]["constrained"]
    assert row["f1_gain"] == round(f1(rl) - f1(sft), 2) and row["f1_gain_ci95"][0] > 0
    assert "f1_gain_ci95" not in out["ie"]["resume"]["free"]  # record scores are the headline mode's
    assert out["summary"]["mean_ie_f1_gain_low"] > 0
    ceval = out["chat"]["ceval_accuracy"]
    assert (
        ceval["relative_change"] == 0.0
        and ceval["relative_change_ci95"][0] < 0 < ceval["relative_change_ci95"][1]
    )


def test_rl_compare_names_the_missing_predictions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = {"ie": {"conll04": {"free": {"f1": 1.0, "relation_strict": {}}}}, "chat": {}, "summary": {}}
    with pytest.raises(FileNotFoundError, match=r"predictions\.conll04\.free\.jsonl"):
        record_scores(tmp_path, metrics)


def test_compare_runs_without_record_scores_gives_point_changes() -> None:
    def metrics(f1_value: float, rouge: float, acc: float) -> dict:
        return {
            "ie": {
                "resume": {"constrained": {"f1": f1_value, "json_validity": 90.0, "invented_span_rate": 0.0}}
            },
            "chat": {"webqa": {"rouge1_char_f1": rouge, "exact_match": 1.0}, "ceval": {"accuracy": acc}},
            "summary": {"mean_ie_f1": f1_value},
        }

    out = compare_runs(metrics(40.0, 20.0, 30.0), metrics(45.5, 19.0, 30.0))
    assert out["ie"]["resume"]["constrained"] == {
        "sft": 40.0,
        "rl": 45.5,
        "f1_gain": 5.5,
        "json_validity_change": 0.0,
        "invented_span_rate_change": 0.0,
    }
    assert out["summary"]["f1_gain_resume_constrained"] == 5.5 and out["summary"]["mean_ie_f1_gain"] == 5.5
    assert out["chat"]["webqa_rouge1_char_f1"]["change"] == -1.0
    assert out["chat"]["webqa_rouge1_char_f1"]["relative_change"] == -0.05
    assert out["summary"]["ceval_accuracy_change"] == 0.0
