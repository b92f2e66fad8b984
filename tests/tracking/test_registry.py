"""The model registry and its promotion gate.

The gate's arithmetic is tested alone; the rest reads the registry the smoke `dvc repro` filled
(test_tracking's shared run): version 1 is production and extracts; a worse run (`dvc exp run -S
register.model=base`) only becomes candidate; promotion by hand and rollback move production.
A LoRA adapter round trip runs on its own store.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatuie import tracking
from chatuie.eval.gate import PromotionPolicy, decide
from tests.helpers.smoke_pipeline import VENV_BIN, clone, env, params, sh

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the hub

POLICY = PromotionPolicy(
    min_f1_gain=0.5,
    max_chat_drop=0.05,
    floor_mean_ie_f1=10.0,
    floor_chat={"webqa_rouge1": 5.0, "ceval_accuracy": 25.0},
)
PROD = {"mean_ie_f1": 40.0, "webqa_rouge1": 20.0, "ceval_accuracy": 50.0}


@pytest.mark.parametrize(
    ("candidate", "production", "promoted", "why"),
    [
        ({"mean_ie_f1": 12.0, "webqa_rouge1": 6.0, "ceval_accuracy": 30.0}, None, True, "first production"),
        (
            {"mean_ie_f1": 9.0, "webqa_rouge1": 6.0, "ceval_accuracy": 30.0},
            None,
            False,
            "mean_ie_f1 9 < floor 10",
        ),
        ({"mean_ie_f1": 12.0, "webqa_rouge1": 6.0}, None, False, "ceval_accuracy missing < floor 25"),
        ({**PROD, "mean_ie_f1": 40.5}, PROD, True, "gain +0.50 >= 0.5"),
        ({**PROD, "mean_ie_f1": 40.4}, PROD, False, "gain +0.40 < 0.5"),
        ({**PROD, "mean_ie_f1": 45.0, "ceval_accuracy": 47.5}, PROD, True, "within 5.0%"),  # -5 % exactly
        ({**PROD, "mean_ie_f1": 45.0, "webqa_rouge1": 18.9}, PROD, False, "webqa_rouge1 drops 5.5% > 5.0%"),
        ({"webqa_rouge1": 30.0}, PROD, False, "no mean_ie_f1"),
    ],
)
def test_gate(candidate: dict, production: dict | None, promoted: bool, why: str) -> None:
    ok, reason = decide(candidate, production, POLICY)
    assert ok is promoted and why in reason, reason


def test_gate_compares_only_scores_of_the_same_evaluation_protocol() -> None:
    better = {**PROD, "mean_ie_f1": 45.0}
    assert decide(better, PROD, POLICY, protocols=("abc", "abc"))[0]
    ok, reason = decide(better, PROD, POLICY, protocols=("abc", "def"))
    assert not ok and "not comparable: evaluated under protocol abc, production under def" in reason
    ok, reason = decide(better, PROD, POLICY, protocols=("abc", None))  # production from before digests
    assert not ok and "production under unrecorded" in reason
    assert decide(better, None, POLICY, protocols=("abc", None))[0]  # a first model has nothing to match
    lenient = dataclasses.replace(POLICY, allow_protocol_change=True)
    ok, reason = decide(better, PROD, lenient, protocols=("abc", "def"))
    assert ok and reason.endswith("evaluation protocol changed (allowed)")


def test_protocol_digest_follows_what_decides_the_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    from chatuie.eval import evaluation
    from chatuie.eval.evaluation import EvalSettings, protocol_digest

    base = protocol_digest(["resume"], ["constrained"], EvalSettings())
    assert base == protocol_digest(["resume"], ["constrained"], EvalSettings())
    assert base != protocol_digest(["resume"], ["constrained"], EvalSettings(repetition_penalty=1.3))
    assert base != protocol_digest(["resume"], ["constrained"], EvalSettings(span_boundaries="char"))
    assert base != protocol_digest(["resume", "fewfc"], ["constrained"], EvalSettings())
    monkeypatch.setattr(evaluation, "PROTOCOL_VERSION", evaluation.PROTOCOL_VERSION + 1)
    assert base != protocol_digest(["resume"], ["constrained"], EvalSettings())  # new decoding code


# ------------------------------------------------------------------------------------ smoke registry


def _client(repo: Path):
    from mlflow.tracking import MlflowClient

    uri = tracking.tracking_uri(repo)
    return MlflowClient(uri, registry_uri=uri)


def _alias(client, alias: str) -> int:
    return int(client.get_model_version_by_alias("chatuie", alias).version)


def _history(client) -> list[int]:
    return json.loads(client.get_registered_model("chatuie").tags[tracking.HISTORY_TAG])


@pytest.mark.slow
def test_smoke_repro_registers_version_1_as_production(smoke_run) -> None:
    client = _client(smoke_run.repo)
    version = client.get_model_version("chatuie", "1")
    model = params(smoke_run.snapshot)["register"]["model"]
    summary = json.loads((smoke_run.snapshot / "metrics" / f"{model}.json").read_text())["summary"]
    assert float(version.tags["mean_ie_f1"]) == summary["mean_ie_f1"]
    assert float(version.tags["ceval_accuracy"]) == summary["ceval_accuracy"]
    assert version.tags["chatuie.model"] == model and version.tags["promotion.decision"] == "production"
    # A first version is gated against the model it was trained from (register.baseline: sft).
    assert "first production model" in version.tags["promotion.reason"]
    assert "vs sft: 95% CI" in version.tags["promotion.reason"], version.tags["promotion.reason"]
    assert _alias(client, "production") == 1 and _history(client) == [1]
    register = json.loads((smoke_run.snapshot / "metrics" / "register.json").read_text())
    assert register["version"] == 1 and register["production"] is True
    run = client.get_run(version.run_id)
    assert run.info.run_name == "register" and run.data.tags[tracking.TAG_KIND] == "stage"


@pytest.mark.slow
def test_production_model_extracts(smoke_run, tmp_path: Path) -> None:
    import torch

    from chatuie.data.prompts import ie_user_prompt, messages_for
    from chatuie.data.records import load_records
    from chatuie.decoding import IERequest, constrained_generate
    from chatuie.models.modeling import load_saved

    torch.set_num_threads(1)
    model_dir = tracking.download_model("models:/chatuie@production", tmp_path / "dl", root=smoke_run.repo)
    requirements = (model_dir.parent / "requirements.txt").read_text().split()
    assert any(r.startswith("transformers==") for r in requirements)
    assert not any(r.startswith("torchvision") for r in requirements)
    # How the model was taught to be asked travels with it (prompt_options_for reads it).
    assert json.loads((model_dir / "chatuie_prompt.json").read_text()) == json.loads(
        (smoke_run.repo / "models" / "rl" / "chatuie_prompt.json").read_text()
    )
    model, tokenizer = load_saved(model_dir)
    records = load_records(smoke_run.snapshot / "data" / "records" / "resume" / "test.jsonl")[:2]
    prompts = [
        tokenizer.apply_chat_template(
            messages_for(ie_user_prompt(r.task, r.text, r.schema), None),
            tokenize=False,
            add_generation_prompt=True,
        )
        for r in records
    ]
    requests = [IERequest(task=r.task, text=r.text, schema=r.schema) for r in records]
    answers = constrained_generate(model, tokenizer, prompts, requests, max_new_tokens=48)
    for record, answer in zip(records, answers, strict=True):
        parsed = json.loads(answer)  # the constraint guarantees valid JSON...
        assert set(parsed) <= set(record.schema.entities)
        for spans in parsed.values():
            assert all(span in record.text for span in spans)  # ...and spans copied from the text


@pytest.fixture(scope="session")
def worse_run(smoke_run, tmp_path_factory) -> Path:
    """A copy of the smoke repo with its own store: the final model registered again (version 1,
    production), then `dvc exp run -S register.model=base`: the base model, no better on IE F1."""
    repo = clone(smoke_run.snapshot, tmp_path_factory.mktemp("worse") / "repo")
    sh(["dvc", "repro", "--force", "--single-item", "register"], repo)
    out = sh(["dvc", "exp", "run", "-S", "register.model=base"], repo)
    assert "Running stage 'register'" in out and "Running stage 'sft'" not in out
    return repo


@pytest.mark.slow
def test_worse_run_becomes_candidate_not_production(worse_run: Path) -> None:
    client = _client(worse_run)
    version = client.get_model_version("chatuie", "2")
    assert version.tags["chatuie.model"] == "base"
    assert _alias(client, "candidate") == 2 and _alias(client, "production") == 1
    assert version.tags["promotion.decision"] == "candidate"
    reason = version.tags["promotion.reason"]
    assert "mean_ie_f1 gain" in reason and "95% CI" in reason and "not above 0 (noise)" in reason, reason
    low, high = json.loads(version.tags["promotion.mean_ie_f1_gain_ci95"])
    assert low <= 0.0 <= high or high <= 0.0  # base is no better than the production model
    assert json.loads((worse_run / "metrics" / "register.json").read_text())["production"] is False
    # `dvc exp run` is a dvc process too: its stage runs group as an execution of their own.
    run = client.get_run(version.run_id)
    assert run.data.tags[tracking.TAG_EXECUTION].startswith("dvc-")
    first = client.get_run(client.get_model_version("chatuie", "1").run_id)
    assert run.data.tags[tracking.TAG_EXECUTION] != first.data.tags[tracking.TAG_EXECUTION]


def _promote_cli(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "chatuie"), "promote", *args],
        cwd=repo,
        env=env(),
        capture_output=True,
        text=True,
    )


@pytest.mark.slow
def test_promote_by_hand_then_roll_back(worse_run: Path, tmp_path: Path) -> None:
    lenient = tmp_path / "params.yaml"
    lenient.write_text("promote:\n  min_f1_gain: -100.0\n  max_chat_drop: 1.0\n  floor_mean_ie_f1: 0.0\n")
    proc = _promote_cli(worse_run, "--version", "2", "--params", str(lenient))
    assert proc.returncode == 0, proc.stderr
    decision = json.loads(proc.stdout.strip().splitlines()[-1])
    assert decision == {
        "version": 2,
        "promoted": True,
        "alias": "production",
        "reason": decision["reason"],
        "compared_to": 1,
    }
    client = _client(worse_run)
    assert _alias(client, "production") == 2 and _history(client) == [1, 2]
    with pytest.raises(Exception, match="not found|RESOURCE_DOES_NOT_EXIST|alias"):
        client.get_model_version_by_alias("chatuie", "candidate")  # the promoted candidate left the alias

    proc = _promote_cli(worse_run, "--rollback")
    assert proc.returncode == 0, proc.stderr
    assert _alias(client, "production") == 1 and _history(client) == [1]
    assert client.get_model_version("chatuie", "2").tags["promotion.rolled_back_at"]

    proc = _promote_cli(worse_run, "--rollback")  # nothing before version 1
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: version 1 is the first production version of 'chatuie': nothing to roll back to"
    )


# ------------------------------------------------------------------------------------- LoRA adapter


def test_lora_adapter_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An adapter registers as files + its bundled base and comes back loadable anywhere."""
    import shutil

    import torch

    from chatuie.models.modeling import (
        LoraSettings,
        ModelConfig,
        TinyModelConfig,
        build_tiny_model,
        is_peft,
        load_model,
        load_saved,
        save_model,
        train_tokenizer,
    )

    for name in ("MLFLOW_TRACKING_URI", tracking.ENV_EXECUTION_ID, tracking.ENV_TRACKING):
        monkeypatch.delenv(name, raising=False)
    torch.manual_seed(0)
    tokenizer = train_tokenizer(
        ["system\nuser\nassistant\n", "高勇：男，中国国籍。", "Paris is in France."] * 5, 300
    )
    tiny = TinyModelConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        max_position_embeddings=128,
    )
    save_model(build_tiny_model(tiny, tokenizer), tokenizer, tmp_path / "base")
    adapter, tokenizer = load_model(ModelConfig(lora=LoraSettings(r=2, alpha=4)), str(tmp_path / "base"))
    save_model(adapter, tokenizer, tmp_path / "adapter")
    store = tmp_path / "repo"
    store.mkdir()
    (store / "dvc.yaml").write_text("stages: {}\n")

    version = tracking.register_model(tmp_path / "adapter", {"mean_ie_f1": 3.0}, name="lora-test", root=store)
    shutil.rmtree(tmp_path / "base")  # the registered model must not need the original base
    model_dir = tracking.download_model(f"models:/lora-test/{version}", tmp_path / "dl", root=store)
    note = json.loads((model_dir / "chatuie_model.json").read_text())
    assert note["kind"] == "lora" and Path(note["base"]) == (model_dir / "base").resolve()
    model, _ = load_saved(model_dir)
    assert is_peft(model)
    assert sys.modules.get("torchvision") is None
