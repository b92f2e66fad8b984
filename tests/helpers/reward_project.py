"""A temp project for the reward and RL stages: fixture records, an untrained tiny chat model,
params, and a stage runner."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from chatuie.data.prepare import PrepareConfig, convert_all, write_records
from chatuie.data.prompts import ChatOptions, build_samples
from chatuie.data.records import Record
from chatuie.models.modeling import TinyModelConfig, build_tiny_model, chat_texts, save_model, train_tokenizer
from tests.helpers.pipeline_repo import stage_process

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"

KEY_ENV = "CHATUIE_TEST_RM_JUDGE_KEY"
SECRET = "sk-rm-test-S3CRET-0a1b2c3d4e5f"
CHAT = ChatOptions(shuffle_labels=True, absent_label_rate=1.0, max_labels_per_instruction=4, seed=13)
TINY = TinyModelConfig(
    vocab_size=1200,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    max_position_embeddings=2048,
    seed=7,
)
IE = ("resume", "conll04", "fewfc")


# ------------------------------------------------------------------------------ shared project setup


def fixture_records(copies: int = 4) -> dict[str, dict[str, list[Record]]]:
    """The raw fixtures converted; IE train records repeated under new ids (held-out slices need a few)."""
    converted = convert_all(FIXTURES / "raw", PrepareConfig(webqa_test_size=1))
    for dataset in IE:
        train = converted[dataset]["train"]
        converted[dataset]["train"] = [
            dataclasses.replace(r, id=f"{r.id}-c{i}") for i in range(copies) for r in train
        ]
    return converted


def build_project(root: Path, copies: int = 4) -> Path:
    """data/records and an (untrained) tiny chat model at models/sft: what the RL stages read."""
    converted = fixture_records(copies)
    write_records(converted, root / "data" / "records")
    samples = [
        s
        for splits in converted.values()
        for rs in splits.values()
        for r in rs
        for s in build_samples(r, CHAT, train=True)
    ]
    tokenizer = train_tokenizer(chat_texts(samples), TINY.vocab_size)
    model = build_tiny_model(TINY, tokenizer)
    save_model(model, tokenizer, root / "models" / "sft")
    return root


def base_params(**sections: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "samples": {"chat": dataclasses.asdict(CHAT), "decontaminate": True},
        "sft": {"heldout": {"fraction": 0.5, "seed": 13}},
    }
    params.update(sections)
    return params


def write_params(root: Path, params: dict[str, Any]) -> None:
    (root / "params.yaml").write_text(
        yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8"
    )


def run_stage(
    root: Path, stage: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m tasks.<stage>`` in the project ``root`` (a temp folder): it must succeed."""
    proc = stage_process(stage, root, *args, env=env or dict(os.environ))
    assert proc.returncode == 0, f"{stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc
