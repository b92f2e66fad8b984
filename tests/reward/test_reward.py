"""Reward data (negatives + judge-scored SFT answers) and the reward model. CPU, tiny sizes.

The `reward_data` stage runs for real (a subprocess in a temp project) against the local
chat-completions server of tests/helpers/judge_server.py through the real ``openai`` client; a rerun must
make no judge call, and the API key must appear in no file the stages write.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the hub

import pytest
import torch

from chatuie.data.prompts import ChatOptions, build_samples
from chatuie.data.records import Record
from chatuie.data.splits import HeldoutSplit, heldout_record_ids, is_heldout
from chatuie.io import read_json, read_jsonl, write_jsonl
from chatuie.models.precision import resolve_dtype
from chatuie.reward.judge_types import JudgeResult
from chatuie.reward.model import (
    RewardTrainSettings,
    load_reward_base,
    load_reward_model,
    pairwise_accuracy,
    reward_config,
    save_reward_model,
    score_sequences,
    tokenize_pairs,
    train_reward_model,
)
from chatuie.reward.negatives import NegativeSettings
from chatuie.reward.pairs import JudgedSettings, instructions, judged_pairs, negative_pairs, pair_split
from tests.helpers.judge_server import JudgeServer
from tests.helpers.reward_project import (
    CHAT,
    IE,
    KEY_ENV,
    SECRET,
    base_params,
    build_project,
    fixture_records,
    run_stage,
    write_params,
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # other work shares the 2 cores
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------- pure pieces


def test_heldout_slice_is_pinned_and_stable() -> None:
    """sft and reward_data agree through this function: its output must never change."""
    split = HeldoutSplit(fraction=0.1, seed=13)
    ids = [f"resume-train-{i:05d}" for i in range(2000)]
    picked = [i for i in ids if is_heldout(i, split)]
    assert picked[:5] == PINNED_HELDOUT
    assert 0.07 < len(picked) / len(ids) < 0.13
    records = [Record(id=i, dataset="resume", split="train", task="ner", text="x") for i in ids]
    assert heldout_record_ids(reversed(records), 0.1, 13) == set(picked)  # order does not matter
    assert not heldout_record_ids(records, 0.0, 13)
    with pytest.raises(ValueError):
        HeldoutSplit(fraction=1.0)


PINNED_HELDOUT = [
    "resume-train-00025",
    "resume-train-00028",
    "resume-train-00031",
    "resume-train-00042",
    "resume-train-00043",
]


@pytest.mark.parametrize(
    "chat",
    [
        CHAT,
        ChatOptions(
            shuffle_labels=True, system_prompt=False, format_hint=False, max_labels_per_instruction=0
        ),
    ],
)
def test_instruction_prompts_are_the_sft_samples_prompts(chat: ChatOptions) -> None:
    converted = fixture_records(copies=1)
    for dataset in IE:
        for record in converted[dataset]["train"]:
            samples = build_samples(record, chat, train=True)
            found = list(instructions([record], chat))
            assert [s["messages"][:-1] for s in samples] == [inst.messages() for inst in found]
            assert [s["messages"][-1]["content"] for s in samples] == [inst.gold() for inst in found]


def test_pairs_of_a_record_share_their_split() -> None:
    converted = fixture_records(copies=6)
    records = [r for d in IE for r in converted[d]["train"]]
    pairs = negative_pairs(records, CHAT, NegativeSettings(per_instruction=3), eval_fraction=0.3, seed=1)
    by_record: dict[str, set[str]] = {}
    for pair in pairs:
        by_record.setdefault(pair["record_id"], set()).add(pair["split"])
        assert pair["split"] == pair_split(pair["record_id"], 0.3, 1)
        assert pair["prompt"][-1]["role"] == "user" and pair["chosen"] != pair["rejected"]
    assert all(len(s) == 1 for s in by_record.values())
    assert {"train", "eval"} == {s for splits in by_record.values() for s in splits}


def test_judged_pairs_best_vs_worst_with_margin() -> None:
    converted = fixture_records(copies=1)
    jobs = list(instructions(converted["resume"]["train"], CHAT))[:2]
    answers = [["a", "b", "c"], ["x", "y", "z"]]

    def result(score: float | None) -> JudgeResult:
        return JudgeResult("", score, "", False, "scored" if score is not None else "failed")

    results = [result(2.0), result(9.0), result(5.0), result(4.0), result(None), result(5.0)]
    pairs = judged_pairs(jobs, answers, results, margin=2.0)
    assert len(pairs) == 1  # the second gap is 1 < 2 (the failed answer is ignored)
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("b", "a")
    assert (pairs[0]["chosen_score"], pairs[0]["rejected_score"]) == (9.0, 2.0)
    assert pairs[0]["source"] == "judge" and pairs[0]["type"] == "judge"
    with pytest.raises(ValueError):
        JudgedSettings(samples_per_prompt=1)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return build_project(tmp_path_factory.mktemp("rm-project"))


def test_pair_tokens_end_on_the_end_of_turn_token(project: Path) -> None:
    model, tokenizer = load_reward_base(project / "models" / "sft")
    assert model.config.pad_token_id == tokenizer.pad_token_id
    pair = {
        "prompt": [{"role": "user", "content": "Text: 张三"}],
        "chosen": '{"NAME":["张三"]}',
        "rejected": "{}",
    }
    (row,), kept = tokenize_pairs(tokenizer, [pair], max_length=None)
    assert kept == [0]
    prompt = tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(row["chosen_ids"]) == prompt + pair["chosen"] + "<|im_end|>"
    assert row["chosen_ids"][-1] == tokenizer.eos_token_id
    assert tokenize_pairs(tokenizer, [pair], max_length=5) == ([], [])
    # Right padding does not change a sequence's score (read at its last real token).
    short, long = row["rejected_ids"], row["chosen_ids"]
    alone = score_sequences(model, [short], tokenizer.pad_token_id)
    batched = score_sequences(model, [long, short], tokenizer.pad_token_id)
    assert abs(alone[0] - batched[1]) < 1e-4


def test_reward_model_trains_and_reports_accuracy(project: Path, tmp_path: Path) -> None:
    converted = fixture_records(copies=3)
    records = [r for d in IE for r in converted[d]["train"]]
    pairs = negative_pairs(records, CHAT, NegativeSettings(per_instruction=2), eval_fraction=0.3, seed=3)
    train = [p for p in pairs if p["split"] == "train"]
    held = [p for p in pairs if p["split"] == "eval"]
    model, tokenizer = load_reward_base(project / "models" / "sft")
    settings = RewardTrainSettings(
        max_steps=3, per_device_batch_size=4, learning_rate=1e-3, logging_steps=1, max_length=1024
    )
    result = train_reward_model(model, tokenizer, train, settings)
    assert result.global_step == 3 and len(result.loss_log) >= 3
    accuracy = pairwise_accuracy(result.model, tokenizer, held, batch_size=8, max_length=1024)
    assert accuracy["pairs"] == len(held) - accuracy["too_long"] > 0
    assert 0 <= accuracy["accuracy"] <= 100
    assert set(accuracy["by_type"]) == {p["type"] for p in held}
    assert set(accuracy["by_dataset"]) <= set(IE)
    assert sum(v["pairs"] for v in accuracy["by_type"].values()) == accuracy["pairs"]
    out = save_reward_model(result.model, tokenizer, tmp_path / "rm")
    again, tok = load_reward_model(out)
    ids = [tokenize_pairs(tok, held[:2], None)[0][0]["chosen_ids"]]
    assert score_sequences(again, ids, tok.pad_token_id) == pytest.approx(
        score_sequences(result.model, ids, tokenizer.pad_token_id), abs=1e-5
    )


def test_frozen_embeddings_stay_while_the_rest_trains(project: Path) -> None:
    records = [r for d in IE for r in fixture_records(copies=2)[d]["train"]]
    pairs = negative_pairs(records, CHAT, NegativeSettings(per_instruction=2), eval_fraction=0.0, seed=3)
    model, tokenizer = load_reward_base(project / "models" / "sft")
    embedding = model.get_input_embeddings().weight.detach().clone()
    score = model.score.weight.detach().clone()
    assert not score.any()  # a zero head: every pair a tie before training, which counts half
    assert pairwise_accuracy(model, tokenizer, pairs[:6], batch_size=6, max_length=1024)["accuracy"] == 50.0
    settings = RewardTrainSettings(
        max_steps=2, per_device_batch_size=4, learning_rate=1e-3, max_length=1024, freeze_embeddings=True
    )
    trained = train_reward_model(model, tokenizer, pairs, settings).model
    assert torch.equal(trained.get_input_embeddings().weight, embedding)
    assert not torch.equal(trained.score.weight, score)


def test_bf16_mixed_precision_keeps_fp32_weights(project: Path) -> None:
    """rm.train.bf16: the Trainer's autocast runs the matmuls in bf16, the weights stay float32."""
    records = [r for d in IE for r in fixture_records(copies=2)[d]["train"]]
    pairs = negative_pairs(records, CHAT, NegativeSettings(per_instruction=2), eval_fraction=0.0, seed=3)
    assert reward_config(RewardTrainSettings(bf16=True), "unused").bf16
    assert not reward_config(RewardTrainSettings(), "unused").bf16
    native = resolve_dtype("auto") == "bfloat16"  # auto: autocast only where bfloat16 is native
    assert reward_config(RewardTrainSettings(bf16="auto"), "unused").bf16 is native
    with pytest.raises(ValueError, match="rm.train.bf16: expected true, false or auto"):
        RewardTrainSettings(bf16="sometimes")
    heads = {}
    for bf16 in (False, True):
        model, tokenizer = load_reward_base(project / "models" / "sft")
        settings = RewardTrainSettings(
            max_steps=2, per_device_batch_size=4, learning_rate=1e-3, max_length=1024, bf16=bf16
        )
        trained = train_reward_model(model, tokenizer, pairs, settings).model
        assert {p.dtype for p in trained.parameters()} == {torch.float32}
        heads[bf16] = trained.score.weight.detach().clone()
    # Same seed and data: only the bf16 rounding of the matmuls tells the runs apart.
    assert not torch.equal(heads[True], heads[False])
    cosine = torch.nn.functional.cosine_similarity(heads[True].flatten(), heads[False].flatten(), dim=0)
    assert cosine > 0.8  # the same direction learnt (0.93 when written)


def test_frozen_layers_keep_the_lowest_layers_and_train_the_rest(project: Path) -> None:
    records = [r for d in IE for r in fixture_records(copies=2)[d]["train"]]
    pairs = negative_pairs(records, CHAT, NegativeSettings(per_instruction=2), eval_fraction=0.0, seed=3)
    model, tokenizer = load_reward_base(project / "models" / "sft")
    layers = model.base_model.layers
    before = [{k: v.detach().clone() for k, v in layer.state_dict().items()} for layer in layers]
    settings = RewardTrainSettings(
        max_steps=3,
        per_device_batch_size=4,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        max_length=1024,
        frozen_layers=1,
    )  # the score head starts at zero: the backbone gets a gradient from the second step on
    trained = train_reward_model(model, tokenizer, pairs, settings).model
    after = [layer.state_dict() for layer in trained.base_model.layers]
    assert all(torch.equal(before[0][k], v) for k, v in after[0].items())  # frozen
    assert any(not torch.equal(before[-1][k], v) for k, v in after[-1].items())  # trained
    with pytest.raises(ValueError, match="cannot freeze"):
        train_reward_model(
            model, tokenizer, pairs, RewardTrainSettings(max_steps=1, frozen_layers=len(layers) + 1)
        )
    with pytest.raises(ValueError, match="frozen_layers"):
        RewardTrainSettings(frozen_layers=-1)


def test_head_learning_rate_moves_the_head_faster(project: Path) -> None:
    records = [r for d in IE for r in fixture_records(copies=2)[d]["train"]]
    pairs = negative_pairs(records, CHAT, NegativeSettings(per_instruction=2), eval_fraction=0.0, seed=3)
    moved = {}
    for head_rate in (None, 1e-2):
        model, tokenizer = load_reward_base(project / "models" / "sft")
        layer = next(p for n, p in model.named_parameters() if "layers.0." in n and p.ndim == 2)
        before = layer.detach().clone()
        settings = RewardTrainSettings(
            max_steps=2,
            per_device_batch_size=4,
            learning_rate=1e-4,
            head_learning_rate=head_rate,
            warmup_ratio=0.0,
            max_length=1024,
        )
        trained = train_reward_model(model, tokenizer, pairs, settings).model
        moved[head_rate] = (trained.score.weight.abs().max().item(), (layer - before).abs().max().item())
    # Adam steps each weight by about its rate: the head ~100x further, the backbone alike.
    assert moved[1e-2][0] > 20 * moved[None][0] > 0
    assert moved[1e-2][1] == pytest.approx(moved[None][1], rel=0.5)
    with pytest.raises(ValueError, match="head_learning_rate"):
        RewardTrainSettings(head_learning_rate=0.0)


# --------------------------------------------------------------------- the stages, against a server


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """reward_data twice (the second must be all cache hits), then rm, in a temp project."""
    root = build_project(tmp_path_factory.mktemp("reward-stage"))
    # SFT predictions with one confusion, so label swaps are weighted by them.
    write_jsonl(
        root / "reports" / "eval" / "sft" / "predictions.resume.constrained.jsonl",
        [
            {
                "gold": {"entities": [{"type": "NAME", "start": 0, "end": 3, "text": "常建良"}]},
                "pred": {"entities": [{"type": "TITLE", "start": 0, "end": 3, "text": "常建良"}]},
            }
        ],
    )
    env = {**os.environ, KEY_ENV: SECRET, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with JudgeServer() as server:
        params = base_params(
            judge={
                "provider": "openai",
                "base_url": server.url,
                "model": "judge-test",
                "api_key_env": KEY_ENV,
                "max_concurrency": 2,
                "timeout_s": 10.0,
                "backoff_base_s": 0.01,
                "backoff_max_s": 0.05,
                "cache_path": "data/judge_cache.jsonl",
            },
            reward_data={
                "datasets": list(IE),
                "max_records_per_dataset": 0,
                "negatives": {"per_instruction": 2, "seed": 13},
                "judged": {
                    "max_prompts_per_dataset": 2,
                    "samples_per_prompt": 3,
                    "max_new_tokens": 24,
                    "batch_size": 6,
                    "margin": 1.0,
                    "seed": 13,
                },
                "eval_fraction": 0.3,
                "threads": 1,
            },
            rm={
                "train": {
                    "max_steps": 2,
                    "per_device_batch_size": 4,
                    "max_length": 1024,
                    "logging_steps": 1,
                    "eval_batch_size": 8,
                },
                "train_accuracy_pairs": 8,
                "threads": 1,
            },
        )
        write_params(root, params)
        first = run_stage(root, "reward_data", env=env)
        after_first = server.stats()
        pairs_first = (root / "data" / "reward" / "pairs.jsonl").read_bytes()
        metrics_first = read_json(root / "metrics" / "reward_data.json")
        second = run_stage(root, "reward_data", env=env)
        after_second = server.stats()
        auth = list(server.auth_headers)
    rm = run_stage(root, "rm", env=env)
    yield {
        "root": root,
        "after_first": after_first,
        "after_second": after_second,
        "metrics_first": metrics_first,
        "metrics_second": read_json(root / "metrics" / "reward_data.json"),
        "pairs_first": pairs_first,
        "outputs": [first, second, rm],
        "auth": auth,
    }


def test_reward_data_scores_sft_answers_through_the_server(stage_runs: dict[str, Any]) -> None:
    root, metrics = stage_runs["root"], stage_runs["metrics_first"]
    judge = metrics["judged"]["judge"]
    assert judge["provider"] == "openai" and judge["failures"] == 0 and judge["retries"] == 0
    assert judge["items"] == metrics["judged"]["prompts"] * 3 == metrics["judged"]["answers"]
    assert judge["calls_made"] == stage_runs["after_first"]["completion_requests"] > 0
    assert judge["calls_made"] + judge["cache_hits"] == judge["items"]  # duplicates share one call
    assert judge["mean_score"] is not None
    assert all(h == f"Bearer {SECRET}" for h in stage_runs["auth"])  # the key was really sent
    pairs = list(read_jsonl(root / "data" / "reward" / "pairs.jsonl"))
    sources = {p["source"] for p in pairs}
    assert sources == {"negative", "judge"}
    assert metrics["negatives"]["pairs"] == sum(p["source"] == "negative" for p in pairs)
    assert sum(metrics["negatives"]["by_type"].values()) == metrics["negatives"]["pairs"]
    assert {"label_swap", "invented", "relation_direction"} <= set(metrics["negatives"]["by_type"])
    assert set(metrics["negatives"]["by_dataset"]) == set(IE)
    assert metrics["confusions"]["pairs_observed"] == 1
    for pair in pairs:
        if pair["source"] == "judge":
            assert pair["chosen_score"] - pair["rejected_score"] >= 1.0
    judged = list(read_jsonl(root / "data" / "reward" / "judged.jsonl"))
    assert len(judged) == judge["items"] and all(row["score"] is not None for row in judged)
    # Held-out records only (sft.heldout): the SFT model never trained on them.
    split = HeldoutSplit(0.5, 13)
    assert all(is_heldout(row["id"].split("#")[0], split) for row in judged)


def test_rerun_makes_zero_judge_calls(stage_runs: dict[str, Any]) -> None:
    first, second = stage_runs["after_first"], stage_runs["after_second"]
    assert second["completion_requests"] == first["completion_requests"]  # counted at the server
    assert second["requests_total"] == first["requests_total"]
    judge = stage_runs["metrics_second"]["judged"]["judge"]
    assert judge["calls_made"] == 0 and judge["cache_hits"] == judge["items"]
    root = stage_runs["root"]
    assert (root / "data" / "reward" / "pairs.jsonl").read_bytes() == stage_runs[
        "pairs_first"
    ]  # deterministic
    cache_lines = (root / "data" / "judge_cache.jsonl").read_text().splitlines()
    assert len(cache_lines) == stage_runs["metrics_first"]["judged"]["judge"]["calls_made"]


def test_api_key_appears_in_no_written_file(stage_runs: dict[str, Any]) -> None:
    root = stage_runs["root"]
    secret = SECRET.encode()
    scanned = 0
    for path in root.rglob("*"):
        if path.is_file():
            scanned += 1
            assert secret not in path.read_bytes(), f"API key leaked into {path.relative_to(root)}"
    assert scanned > 10
    for proc in stage_runs["outputs"]:
        assert SECRET not in proc.stdout and SECRET not in proc.stderr


def test_rm_stage_writes_model_and_accuracy(stage_runs: dict[str, Any]) -> None:
    root = stage_runs["root"]
    metrics = read_json(root / "metrics" / "rm.json")
    assert metrics["steps"] == 2 and metrics["pairs"]["train"] > 0 and metrics["pairs"]["eval"] > 0
    assert 0 <= metrics["accuracy"] <= 100 and 0 <= metrics["accuracy_before"] <= 100
    assert "judge" in metrics["eval"]["by_type"] or "invented" in metrics["eval"]["by_type"]
    assert (root / "metrics" / "train" / "rm_loss.csv").read_text().startswith("step,loss\n")
    model, tokenizer = load_reward_model(root / "models" / "rm")
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
