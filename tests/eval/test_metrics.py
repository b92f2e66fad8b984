"""The IE scorer: hand-checked cases, and a cross-check of NER against seqeval (strict)."""

from __future__ import annotations

import random

import pytest
from seqeval.metrics import f1_score, precision_score, recall_score
from seqeval.scheme import IOBES

from chatuie.data.records import Argument, Entity, Event, Relation, Trigger
from chatuie.eval.metrics import IEScorer, char_rouge1_f1


def test_entity_scores_by_hand() -> None:
    text = "John Smith works for IBM"
    gold = [Entity("Peop", 0, 10, "John Smith"), Entity("Org", 21, 24, "IBM")]
    pred = [Entity("Peop", 0, 4, "John"), Entity("Org", 21, 24, "IBM"), Entity("Loc", 21, 24, "IBM")]
    scorer = IEScorer("ner")
    scorer.add({"entities": gold}, {"entities": pred})
    result = scorer.result()["entity"]
    assert (result["tp"], result["pred"], result["gold"]) == (1, 3, 2)
    assert result["f1"] == pytest.approx(100 * 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2), abs=0.01)
    assert text[21:24] == "IBM"
    rows = {(r["metric"], r["label"]): r for r in scorer.per_label_rows()}
    assert rows[("entity", "Org")]["f1"] == 100.0 and rows[("entity", "Loc")]["f1"] == 0.0


def test_relations_strict_vs_boundary() -> None:
    john, ibm = Entity("Peop", 0, 4, "John"), Entity("Org", 15, 18, "IBM")
    gold = {"entities": [john, ibm], "relations": [Relation("Work_For", john, ibm)]}
    wrong_type = Entity("Loc", 15, 18, "IBM")
    pred = {"entities": [john, wrong_type], "relations": [Relation("Work_For", john, wrong_type)]}
    scorer = IEScorer("re")
    scorer.add(gold, pred)
    result = scorer.result()
    assert result["relation_strict"]["tp"] == 0
    assert result["relation_boundary"]["tp"] == 1


def test_event_levels() -> None:
    gold = [
        Event(
            "质押",
            Trigger(2, 4, "质押"),
            (Argument("sub-org", 0, 2, "公司"), Argument("number", 6, 8, "千股")),
        )
    ]
    pred = [Event("减持", Trigger(2, 4, "质押"), (Argument("sub-org", 0, 2, "公司"),))]
    scorer = IEScorer("ee")
    scorer.add({"events": gold}, {"events": pred})
    r = scorer.result()
    assert r["trigger_identification"]["tp"] == 1
    assert r["trigger_classification"]["tp"] == 0
    assert r["argument_identification"]["tp"] == 0  # the event type is part of the key


def test_text_matching_counts_multiplicity() -> None:
    gold = [Entity("ORG", 0, 2, "中国"), Entity("ORG", 5, 7, "中国")]
    pred = [Entity("ORG", 0, 2, "中国")]
    scorer = IEScorer("ner")
    scorer.add({"entities": gold}, {"entities": pred})
    assert scorer.result()["entity"]["recall"] == 50.0


def _bioes(length: int, entities: list[Entity]) -> list[str]:
    tags = ["O"] * length
    for e in entities:
        if e.end - e.start == 1:
            tags[e.start] = f"S-{e.type}"
            continue
        tags[e.start] = f"B-{e.type}"
        for i in range(e.start + 1, e.end - 1):
            tags[i] = f"I-{e.type}"
        tags[e.end - 1] = f"E-{e.type}"
    return tags


def test_ner_scorer_matches_seqeval_strict(raw_dir) -> None:
    """Real Resume test sentences, predictions made by corrupting gold (drop, shift, retype, add)."""
    from chatuie.data.converters import resume

    records = resume.convert_file(raw_dir / "resume_ner" / "test.char.bmes", "test")
    rng = random.Random(0)
    gold_tags, pred_tags = [], []
    scorer = IEScorer("ner", match="offset")
    for r in records:
        pred = []
        for e in r.entities:
            roll = rng.random()
            if roll < 0.1:
                continue
            if roll < 0.2 and e.end < len(r.text):
                pred.append(Entity(e.type, e.start, e.end + 1, r.text[e.start : e.end + 1]))
            elif roll < 0.3:
                pred.append(Entity("ORG" if e.type != "ORG" else "TITLE", e.start, e.end, e.text))
            else:
                pred.append(e)
        # Keep predictions non-overlapping so BIO tags can express them.
        taken: set[int] = set()
        kept = []
        for e in sorted(pred, key=lambda x: x.start):
            if not taken & set(range(e.start, e.end)):
                kept.append(e)
                taken |= set(range(e.start, e.end))
        scorer.add({"entities": r.entities}, {"entities": kept})
        gold_tags.append(_bioes(len(r.text), r.entities))
        pred_tags.append(_bioes(len(r.text), kept))
    ours = scorer.result()["entity"]
    kwargs = {"mode": "strict", "scheme": IOBES}
    assert ours["f1"] == pytest.approx(100 * f1_score(gold_tags, pred_tags, **kwargs), abs=0.01)
    assert ours["precision"] == pytest.approx(100 * precision_score(gold_tags, pred_tags, **kwargs), abs=0.01)
    assert ours["recall"] == pytest.approx(100 * recall_score(gold_tags, pred_tags, **kwargs), abs=0.01)
    assert 50 < ours["f1"] < 95  # the corruption really changed something


def test_char_rouge() -> None:
    assert char_rouge1_f1("纣王", "商纣王") == pytest.approx(0.8)
    assert char_rouge1_f1("", "x") == 0.0
