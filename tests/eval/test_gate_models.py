"""The promotion gate on two real small models: tiny Llamas built and trained here (no hub),
decoded under the constraint by the evaluate stage's own code, their per-record scores paired.

A model taught 48 records, scored on 24 others, against one never taught: a real gap, promoted.
Two models taught the same way but for their seeds: a gain of some points that is noise, refused.
"""

from __future__ import annotations

import dataclasses
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the hub

import pytest

from chatuie.data.prompts import ChatOptions, build_samples, ie_user_prompt
from chatuie.data.records import Entity, Record, Schema
from chatuie.eval.comparison import dataset_scores, paired_gain
from chatuie.eval.evaluation import EvalSettings, evaluate_ie
from chatuie.eval.gate import Baseline, PromotionPolicy, decide
from chatuie.models.modeling import TinyModelConfig, build_tiny_model, train_tokenizer
from chatuie.train.trainer import TeachSettings, train_sft

# Sentences of three shapes with a person and an organisation: a model taught 48 of them finds
# the two in 24 others about half the time (30 steps), by the shape, not by the names.
SURNAMES = "张王李刘陈杨赵黄周吴徐孙胡朱高林何郭马罗"
GIVEN = ["伟", "芳", "娜", "洋", "静", "帆", "磊", "敏", "杰", "昊", "丽", "强", "军", "霞", "鹏"]
ORGS = ["中国银行", "华为公司", "北京大学", "万科集团", "腾讯公司", "招商银行", "平安保险", "联想集团"]
SHAPES = ["{name}现任{org}董事。", "{name}曾在{org}工作。", "{org}聘任{name}为经理。"]
SCHEMA = Schema(entities=["NAME", "ORG"])
CHAT = ChatOptions(system_prompt=False, format_hint=False, seed=13)
EVAL = EvalSettings(max_records_per_dataset=0, max_new_tokens=40, batch_size=12, repetition_penalty=1.3)
POLICY = PromotionPolicy(min_f1_gain=0.0, max_chat_drop=0.05)
TINY = TinyModelConfig(
    vocab_size=500,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=256,
    seed=3,
)


def records(count: int, rng: random.Random, prefix: str) -> list[Record]:
    out = []
    for i in range(count):
        name = rng.choice(SURNAMES) + rng.choice(GIVEN) + ("" if rng.random() < 0.5 else rng.choice(GIVEN))
        org = rng.choice(ORGS)
        text = rng.choice(SHAPES).format(name=name, org=org)
        a, b = text.index(name), text.index(org)
        entities = sorted(
            [Entity("NAME", a, a + len(name), name), Entity("ORG", b, b + len(org), org)],
            key=lambda e: e.start,
        )
        out.append(Record(f"{prefix}{i}", "names", "test", "ner", text, SCHEMA, entities))
    return out


def settings(seed: int) -> TeachSettings:
    return TeachSettings(
        max_steps=30,
        learning_rate=3e-3,
        per_device_batch_size=4,
        max_length=128,
        save_steps=0,
        logging_steps=20,
        seed=seed,
    )


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> dict[str, dict]:
    """Held-out F1 and per-record scores of three real models: untaught, taught (seed 1), taught (seed 2)."""
    rng = random.Random(0)
    train, test = records(48, rng, "train"), records(24, rng, "test")
    samples = [s for r in train for s in build_samples(r, CHAT, train=True)]
    texts = [m["content"] for s in samples for m in s["messages"]]
    texts += [ie_user_prompt("ner", r.text, SCHEMA, CHAT) for r in test]
    tokenizer = train_tokenizer(texts * 3, TINY.vocab_size, min_frequency=2)
    root = tmp_path_factory.mktemp("gate-models")
    models = {"untaught": build_tiny_model(TINY, tokenizer)}
    for seed in (1, 2):
        model = build_tiny_model(TINY, tokenizer)
        models[f"taught{seed}"] = train_sft(
            model, tokenizer, samples, settings(seed), root / f"s{seed}"
        ).model
    out = {}
    for name, model in models.items():
        metrics, _, predictions = evaluate_ie(model.eval(), tokenizer, test, CHAT, EVAL, constrained=True)
        out[name] = {
            "f1": metrics["entity"]["f1"],
            "scores": {"ie": {"names": dataset_scores(predictions, "ner", "constrained")}, "chat": {}},
        }
    return out


CHAT_SCORES = {"webqa_rouge1": 20.0, "ceval_accuracy": 50.0}


def _first(baseline: dict, candidate: dict) -> tuple[bool, str, dict]:
    """A first version (no production) gated against the model it came from."""
    paired = paired_gain(baseline["scores"], candidate["scores"])
    ok, reason = decide(
        {"mean_ie_f1": candidate["f1"], **CHAT_SCORES},
        None,
        dataclasses.replace(POLICY, floor_mean_ie_f1=0.0),
        baseline=Baseline("sft", {"mean_ie_f1": baseline["f1"], **CHAT_SCORES}, baseline["scores"]),
        baseline_paired=paired,
    )
    return ok, reason, paired["mean_ie_f1"]


def _gate(production: dict, candidate: dict) -> tuple[bool, str, dict]:
    paired = paired_gain(production["scores"], candidate["scores"])
    ok, reason = decide(
        {"mean_ie_f1": candidate["f1"], **CHAT_SCORES},
        {"mean_ie_f1": production["f1"], **CHAT_SCORES},
        POLICY,
        paired=paired,
    )
    return ok, reason, paired["mean_ie_f1"]


def test_gate_promotes_a_taught_model_over_an_untaught_one(evaluated) -> None:
    untaught, taught = evaluated["untaught"], evaluated["taught1"]
    assert untaught["f1"] < 10 and taught["f1"] > 40, (untaught["f1"], taught["f1"])
    ok, reason, gain = _gate(untaught, taught)
    assert gain["ci95"][0] > 0, gain
    assert ok and "lower bound above 0" in reason, reason


def test_gate_refuses_a_model_that_differs_by_noise(evaluated) -> None:
    first, second = evaluated["taught1"], evaluated["taught2"]
    ok, reason, gain = _gate(first, second)
    low, high = gain["ci95"]
    # The seeds differ by points on 24 records (a rule on the point gain would promote one)...
    assert gain["delta"] != 0.0, gain
    # ...but the paired interval reaches 0: noise (here a couple of records, 4 points apart).
    assert gain["delta"] > 0 and low <= 0.0 < high, gain
    assert not ok and "not above 0" in reason and "95% CI" in reason, reason


def test_first_version_worse_than_its_baseline_stays_candidate(evaluated) -> None:
    # The untaught model as if RL had ruined the taught one: above the floors, far below its SFT.
    ok, reason, gain = _first(evaluated["taught1"], evaluated["untaught"])
    assert gain["ci95"][1] < 0, gain
    assert not ok and "worse than its baseline sft" in reason and "beyond the noise" in reason, reason
    # Without its baseline only the floors decide: the same scores pass them.
    floors_only = dataclasses.replace(POLICY, floor_mean_ie_f1=0.0)
    assert decide({"mean_ie_f1": evaluated["untaught"]["f1"], **CHAT_SCORES}, None, floors_only)[0]


def test_first_version_within_the_noise_of_its_baseline_is_production(evaluated) -> None:
    ok, reason, gain = _first(evaluated["taught1"], evaluated["taught2"])
    assert gain["ci95"][0] <= 0 <= gain["ci95"][1], gain
    assert ok and "first production model" in reason and "vs sft: 95% CI" in reason, reason
    # A chat drop beyond max_chat_drop against the baseline refuses it all the same.
    dropped = {"mean_ie_f1": evaluated["taught2"]["f1"], "webqa_rouge1": 18.0, "ceval_accuracy": 50.0}
    ok, reason = decide(
        dropped,
        None,
        POLICY,
        baseline=Baseline("sft", {"mean_ie_f1": evaluated["taught1"]["f1"], **CHAT_SCORES}),
        baseline_paired=paired_gain(evaluated["taught1"]["scores"], evaluated["taught2"]["scores"]),
    )
    assert not ok and "webqa_rouge1 drops 10.0% > 5.0% vs sft" in reason, reason
