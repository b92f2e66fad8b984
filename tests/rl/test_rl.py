"""RL: PPO and GRPO on a tiny model (CPU, a few steps each), the rewards, and the whole smoke
pipeline through `rl_compare` (slow). The comparison itself: test_comparison.py."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the hub

import pytest
import torch
from transformers import TrainerCallback

from chatuie.data.answers import flatten_answer
from chatuie.data.records import Schema
from chatuie.models.modeling import LoraSettings, _wrap_lora, generate, load_saved, save_model
from chatuie.reward.model import PairTokenizer, load_reward_base, load_reward_model, save_reward_model
from chatuie.rl.config import GRPOSettings, PPOSettings, RLConfig
from chatuie.rl.grpo import train_grpo
from chatuie.rl.ppo import train_ppo
from chatuie.rl.prompts import rl_prompts
from chatuie.rl.rewards import F1Reward, RewardModelWithF1, f1_reward, validity, validity_reward
from chatuie.rl.rollouts import ConstrainedPPOGeneration
from chatuie.rl.trainer import RLResult, summarize
from tests.helpers.reward_project import CHAT, IE, build_project, fixture_records


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # other work shares the 2 cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """models/sft (tiny, untrained) and models/rm (its weights + a fresh score head)."""
    root = build_project(tmp_path_factory.mktemp("rl-project"), copies=2)
    rm, tokenizer = load_reward_base(root / "models" / "sft")
    save_reward_model(rm, tokenizer, root / "models" / "rm")
    return root


@pytest.fixture(scope="module")
def prompts() -> list[dict[str, Any]]:
    converted = fixture_records(copies=2)
    records = [r for d in IE for r in converted[d]["train"]]
    rows = rl_prompts(records, CHAT, max_prompts_per_dataset=4, seed=13)
    assert {r["dataset"] for r in rows} == set(IE)
    return rows


# ------------------------------------------------------------------------------------------- rewards


def test_rl_prompts_carry_gold_and_schema(prompts: list[dict[str, Any]]) -> None:
    for row in prompts:
        assert row["prompt"][-1]["role"] == "user" and row["text"] in row["prompt"][-1]["content"]
        schema = Schema.from_dict(json.loads(row["schema"]))
        assert validity(row["task"], row["gold"], row["text"], schema) == 1.0
    again = rl_prompts([r for d in IE for r in fixture_records(copies=2)[d]["train"]], CHAT, 4, 13)
    assert [r["id"] for r in again] == [r["id"] for r in prompts]  # seeded


def test_f1_and_validity_rewards(prompts: list[dict[str, Any]]) -> None:
    row = next(r for r in prompts if r["task"] == "re" and flatten_answer("re", r["gold"]))
    gold = json.loads(row["gold"])
    invented = json.loads(row["gold"])
    label = next(iter(invented["entities"]))
    invented["entities"][label] = [*invented["entities"][label], "NOT IN THE TEXT"]
    unknown = {**gold, "entities": {**gold["entities"], "Bogus": []}}
    completions = [
        [{"role": "assistant", "content": row["gold"]}],
        [{"role": "assistant", "content": json.dumps(invented)}],
        [{"role": "assistant", "content": json.dumps(unknown)}],
        [{"role": "assistant", "content": '{"entities": '}],  # cut off
    ]
    n = len(completions)
    kwargs = {"task": [row["task"]] * n, "text": [row["text"]] * n, "schema": [row["schema"]] * n}
    f1 = f1_reward(completions, gold=[row["gold"]] * n, **kwargs)
    assert f1[0] == 1.0 and 0 < f1[1] < 1 and f1[3] == 0.0
    valid = validity_reward(completions, **kwargs)
    assert valid[0] == 1.0 and 0.5 < valid[1] < 1.0 and 0.5 < valid[2] < 1.0 and valid[3] == 0.0
    assert f1_reward(["{}"], task=["ner"], text=["x"], gold=['{"PER":[]}']) == [1.0]  # plain strings too


def test_f1_by_part_keeps_a_few_right_relations_worth_more_than_none() -> None:
    """rl.grpo.f1_reward: parts. Over all items, dropping relations (mostly wrong ones) can raise
    F1; the mean of the parts' F1 makes an answer without relations lose half its reward."""
    gold = {
        "entities": {"Peop": ["Ann", "Bob"], "Loc": ["Rome", "Oslo"], "Org": ["IBM", "ACME"]},
        "relations": {"Live_In": [{"head": "Ann", "tail": "Rome"}, {"head": "Bob", "tail": "Oslo"}]},
    }
    no_relations = {**gold, "relations": {"Live_In": []}}
    wrong = [{"head": "Ann", "tail": "Oslo"}, {"head": "Bob", "tail": "Rome"}, {"head": "Ann", "tail": "IBM"}]
    one_right = {**gold, "relations": {"Live_In": [gold["relations"]["Live_In"][0], *wrong]}}
    answers = [json.dumps(a) for a in (gold, no_relations, one_right)]
    kwargs = {
        "task": ["re"] * 3,
        "text": ["Ann, Bob, Rome, Oslo, IBM, ACME"] * 3,
        "gold": [json.dumps(gold)] * 3,
    }
    items = f1_reward(answers, **kwargs)
    parts = F1Reward(by_part=True)(answers, **kwargs)
    assert items[0] == parts[0] == 1.0
    assert items[1] > items[2]  # over all items, no relations beats one right of four
    assert parts[1] == 0.5 < parts[2]  # by part, the right relation counts
    assert F1Reward(by_part=True)(["{}"], task=["ner"], text=["x"], gold=['{"PER":[]}']) == [1.0]
    assert F1Reward(by_part=True)(['{"PER": ['], task=["ner"], text=["x"], gold=['{"PER":[]}']) == [0.0]
    with pytest.raises(ValueError, match="f1_reward"):
        GRPOSettings(f1_reward="macro")


# ----------------------------------------------------------------------------------------------- PPO


def ppo_models(project: Path) -> tuple[Any, Any, Any, Any, Any]:
    """Policy (trainable), its tokenizer, a separate reference, the reward and the value model."""
    sft = project / "models" / "sft"
    policy, tokenizer = load_saved(sft, trainable=True)
    ref, _ = load_saved(sft)
    reward_model, _ = load_reward_model(project / "models" / "rm")
    value_model, _ = load_reward_model(project / "models" / "rm")
    return policy, tokenizer, ref, reward_model, value_model


def tiny_ppo(**overrides: Any) -> PPOSettings:
    """PPO settings a tiny-model test runs in seconds: updates of 2 rollouts, one epoch, a high rate."""
    settings = {
        "per_device_batch_size": 2,
        "local_rollout_forward_batch_size": 2,
        "num_ppo_epochs": 1,
        "learning_rate": 1e-3,
        **overrides,
    }
    return PPOSettings(**settings)


def test_ppo_few_episodes_saves_a_reloadable_model_that_generates(
    project: Path, prompts: list[dict[str, Any]], tmp_path: Path
) -> None:
    policy, tokenizer, ref, reward_model, value_model = ppo_models(project)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    config = RLConfig(
        algorithm="ppo",
        kl_coef=0.1,
        ppo=tiny_ppo(total_episodes=4, response_length=12),
    )
    started = time.monotonic()
    result = train_ppo(policy, ref, reward_model, value_model, tokenizer, prompts, config)
    assert time.monotonic() - started < 60
    assert result.steps == 2 and len(result.log) == 2
    assert all(math.isfinite(row["reward"]) and math.isfinite(row["kl"]) for row in result.log)
    assert any(not torch.equal(before[k], v) for k, v in result.model.state_dict().items())  # it learned
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())  # the reference did not
    summary = summarize(result, config)
    assert summary["algorithm"] == "ppo" and summary["steps"] == 2
    assert summary["reward_start"] is not None and summary["reward_end"] is not None

    out = save_model(result.model, tokenizer, tmp_path / "rl")
    model, tok = load_saved(out)
    assert model.generation_config.eos_token_id[0] == tok.convert_tokens_to_ids("<|im_end|>")
    answers = generate(model, tok, [prompts[0]["prompt"]], max_new_tokens=8)
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_ppo_with_frozen_embeddings_trains_the_rest(project: Path, prompts: list[dict[str, Any]]) -> None:
    policy, tokenizer, ref, reward_model, value_model = ppo_models(project)
    embeddings = [m.get_input_embeddings().weight.detach().clone() for m in (policy, value_model)]
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    config = RLConfig(
        kl_coef=0.1,
        freeze_embeddings=True,
        ppo=tiny_ppo(total_episodes=2, response_length=8),
    )
    result = train_ppo(policy, ref, reward_model, value_model, tokenizer, prompts, config)
    for model, embedding in zip((result.model, value_model), embeddings, strict=True):
        assert torch.equal(model.get_input_embeddings().weight, embedding)
    assert any(not torch.equal(before[k], v) for k, v in result.model.state_dict().items())


def test_constrained_ppo_rollouts_are_valid_and_keep_the_policys_log_probs(
    project: Path, prompts: list[dict[str, Any]]
) -> None:
    """Through TRL's own rollout function: every sampled answer is grounded, and the scores PPO takes
    its rollout log-probs from are the unconstrained policy's logits / temperature (as in its loss)."""
    from transformers import GenerationConfig
    from trl.experimental.ppo.ppo_trainer import batch_generation

    policy, tokenizer = load_saved(project / "models" / "sft")
    policy.generation_config.eos_token_id = tokenizer.eos_token_id  # what PPOTrainer sets: <|im_end|>
    encode, pad = PairTokenizer(tokenizer), tokenizer.pad_token_id
    rows = [encode.prompt_ids(p["prompt"]) for p in prompts[:4]]
    width = max(map(len, rows))
    queries = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # left-padded, as TRL does
    temperature = 0.7
    config = GenerationConfig(max_new_tokens=48, temperature=temperature, top_k=0, top_p=1.0, do_sample=True)
    torch.manual_seed(0)
    with ConstrainedPPOGeneration(policy, tokenizer, prompts, max_new_tokens=48) as constrained:
        responses, logits = batch_generation(policy, queries, 2, pad, config)
    assert constrained.calls == 2 and "generate" not in vars(policy)  # unwrapped again
    stop = tokenizer.eos_token_id
    for prompt, response in zip(prompts[:4], responses[:, width:].tolist(), strict=True):
        assert stop in response  # closed within the 48 tokens
        answer = tokenizer.decode(response[: response.index(stop)])
        assert (
            validity(prompt["task"], answer, prompt["text"], Schema.from_dict(json.loads(prompt["schema"])))
            == 1.0
        )
    with torch.no_grad():
        mask = (responses != pad).long()
        forward = policy(input_ids=responses.masked_fill(responses == pad, 0), attention_mask=mask).logits
    expected = forward[:, width - 1 : -1] / temperature
    first = logits[:, :4]  # the first tokens: sampled by every row, no padding yet
    assert torch.allclose(first, expected[:, :4], atol=1e-3)
    # Free sampling would leave the schema on some rows; the constraint sets disallowed tokens to
    # -inf, which the returned scores must not show.
    assert torch.isfinite(first).all()


def test_ppo_with_constrained_rollouts_trains(project: Path, prompts: list[dict[str, Any]]) -> None:
    policy, tokenizer, ref, reward_model, value_model = ppo_models(project)
    settings = tiny_ppo(total_episodes=2, response_length=48, constrained_rollouts=True)
    result = train_ppo(
        policy, ref, reward_model, value_model, tokenizer, prompts, RLConfig(kl_coef=0.1, ppo=settings)
    )
    assert result.steps == 1 and math.isfinite(result.log[0]["reward"]) and math.isfinite(result.log[0]["kl"])
    assert result.log[0]["eos_tokens"] == 2  # the constraint closes every answer within the budget
    assert "generate" not in vars(result.model)


def test_ppo_reward_with_f1_adds_the_answers_f1_to_the_reward_models_score(
    project: Path, prompts: list[dict[str, Any]]
) -> None:
    """Through TRL's own get_reward on left-padded, right-padded rollouts: gold earns the reward
    model's score + weight, an empty answer the score + weight x its F1 (0 unless gold is empty)."""
    from trl.experimental.utils import get_reward

    _, tokenizer, _, reward_model, _ = ppo_models(project)
    encode, pad = PairTokenizer(tokenizer), tokenizer.pad_token_id
    chosen = [p for p in prompts if flatten_answer(p["task"], p["gold"])][:2]
    queries = [encode.prompt_ids(p["prompt"]) for p in chosen]
    answers = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in (chosen[0]["gold"], "{}")]
    width, long = max(map(len, queries)), max(map(len, answers)) + 1
    rows = [
        [pad] * (width - len(q)) + q + a + [tokenizer.eos_token_id] + [pad] * (long - len(a) - 1)
        for q, a in zip(queries, answers, strict=True)
    ]
    batch = torch.tensor(rows)
    weight = 2.0
    scored = RewardModelWithF1(reward_model, tokenizer, prompts, weight, F1Reward())
    with torch.no_grad():
        _, plain, _ = get_reward(reward_model, batch, pad, width)
        _, with_f1, _ = get_reward(scored, batch, pad, width)
    assert scored.f1 == [1.0, 0.0]
    assert torch.allclose(with_f1, plain + weight * torch.tensor([1.0, 0.0]), atol=1e-5)
    stranger = torch.tensor([[pad] * 3 + [5, 6, 7] + [tokenizer.eos_token_id]])
    with pytest.raises(ValueError, match="RL prompts"), torch.no_grad():
        get_reward(scored, stranger, pad, 6)


def test_ppo_with_an_f1_term_trains_and_logs_it(project: Path, prompts: list[dict[str, Any]]) -> None:
    policy, tokenizer, ref, reward_model, value_model = ppo_models(project)
    settings = tiny_ppo(total_episodes=4, response_length=12, f1_weight=1.0, f1_reward="parts")
    result = train_ppo(
        policy, ref, reward_model, value_model, tokenizer, prompts, RLConfig(kl_coef=0.1, ppo=settings)
    )
    assert result.steps == 2 and all(0.0 <= row["f1"] <= 1.0 for row in result.log)
    with pytest.raises(ValueError, match="f1_reward"):
        PPOSettings(f1_reward="spans")
    with pytest.raises(ValueError, match="f1_weight"):
        PPOSettings(f1_weight=-1.0)


class Killed(Exception):
    """Stands in for a kill right after an update's checkpoint (tests/rl/test_rl.py's stage test kills -9)."""


class KillAfter(TrainerCallback):
    """Raises once update ``update`` is checkpointed: at its step end for PPO (chatuie's checkpoints
    are written there, before the caller's callbacks run), at its save for GRPO (a Trainer's)."""

    def __init__(self, update: int, event: str = "on_step_end") -> None:
        self.update, self.event = update, event

    def _kill(self, event: str, state: Any) -> None:
        if event == self.event and state.global_step == self.update:
            raise Killed

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._kill("on_step_end", state)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._kill("on_save", state)


class CountUpdates(TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps.append(state.global_step)


def test_killed_ppo_resumes_as_if_never_stopped(
    project: Path, prompts: list[dict[str, Any]], tmp_path: Path
) -> None:
    # 12 prompts in batches of 4: 3 updates an epoch. Killed after update 2, the resumed run replays
    # epoch 1's order for update 3, then update 4 starts epoch 2: both ways on are covered.
    ppo = tiny_ppo(total_episodes=16, per_device_batch_size=4, response_length=8, f1_weight=1.0)
    config = RLConfig(kl_coef=0.1, ppo=ppo, save_steps=1)
    straight = train_ppo(*_ppo_args(project), prompts, config, tmp_path / "straight")
    assert straight.steps == 4 and straight.resumed_from is None
    assert [p.name for p in (tmp_path / "straight").glob("checkpoint-*")] == ["checkpoint-4"]  # newest kept

    run_dir = tmp_path / "killed"
    with pytest.raises(Killed):
        train_ppo(*_ppo_args(project), prompts, config, run_dir, callbacks=[KillAfter(2)])
    (run_dir / "checkpoint-3").mkdir()  # a write the kill interrupted: no trainer_state.json
    counted = CountUpdates()
    resumed = train_ppo(*_ppo_args(project), prompts, config, run_dir, callbacks=[counted])
    assert resumed.resumed_from == str(run_dir / "checkpoint-2") and resumed.steps == 4
    assert counted.steps == [3, 4]  # updates 1-2 were not made again
    assert [row["step"] for row in resumed.log] == [1, 2, 3, 4]
    # The same rollouts, rewards, F1 terms and losses, update by update, and the same weights; up to
    # float noise: two uninterrupted runs in one process differ by ~1e-7 from update 2 on here.
    for got, want in zip(resumed.log, straight.log, strict=True):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    worst = largest_difference(resumed.model, straight.model)
    print(f"resumed vs uninterrupted PPO: largest weight difference {worst:.1e}")
    assert worst < 1e-5

    # A rerun of the finished run trains nothing and hands back its weights; resume=False starts over.
    counted = CountUpdates()
    again = train_ppo(*_ppo_args(project), prompts, config, run_dir, callbacks=[counted])
    assert counted.steps == []
    assert again.resumed_from == str(run_dir / "checkpoint-4") and again.log == resumed.log
    assert largest_difference(again.model, resumed.model) == 0
    fresh = train_ppo(*_ppo_args(project), prompts, config, run_dir, resume=False, total_episodes=4)
    assert fresh.resumed_from is None and fresh.steps == 1


def largest_difference(a: Any, b: Any) -> float:
    """The largest absolute difference between two models' weights (same architecture)."""
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return max((x - y).abs().max().item() for x, y in pairs)


def _ppo_args(project: Path) -> tuple[Any, ...]:
    policy, tokenizer, ref, reward_model, value_model = ppo_models(project)
    return policy, ref, reward_model, value_model, tokenizer


def test_ppo_rejects_a_shared_reference(project: Path, prompts: list[dict[str, Any]]) -> None:
    policy, tokenizer = load_saved(project / "models" / "sft", trainable=True)
    with pytest.raises(ValueError, match="separate copy"):
        train_ppo(policy, policy, None, None, tokenizer, prompts, RLConfig())


# ---------------------------------------------------------------------------------------------- GRPO


def grpo_run(project: Path, prompts: list[dict[str, Any]], **grpo: Any) -> tuple[RLResult, Any]:
    policy, tokenizer = load_saved(project / "models" / "sft", trainable=True)
    reward_model, _ = load_reward_model(project / "models" / "rm")
    settings = {
        "max_steps": 2,
        "per_device_batch_size": 4,
        "num_generations": 2,
        "max_completion_length": 12,
        "learning_rate": 1e-3,
        **grpo,
    }
    config = RLConfig(algorithm="grpo", kl_coef=0.05, grpo=GRPOSettings(**settings))
    started = time.monotonic()
    result = train_grpo(policy, tokenizer, reward_model, prompts, config)
    assert time.monotonic() - started < 60
    return result, tokenizer


def test_grpo_few_steps_with_three_rewards(
    project: Path, prompts: list[dict[str, Any]], tmp_path: Path
) -> None:
    result, tokenizer = grpo_run(project, prompts)
    assert result.steps == 2 and len(result.log) == 2
    for row in result.log:
        assert math.isfinite(row["reward"]) and row["kl"] is not None
        assert row["reward_model"] is not None and 0 <= row["f1"] <= 1 and 0 <= row["validity"] <= 1
    out = save_model(result.model, tokenizer, tmp_path / "rl")
    model, tok = load_saved(out)
    assert generate(model, tok, [prompts[0]["prompt"]], max_new_tokens=4)


def test_grpo_on_a_lora_sft_model_keeps_the_sft_adapter_as_reference(
    project: Path, prompts: list[dict[str, Any]], tmp_path: Path
) -> None:
    # A LoRA SFT model (the Gemma default's shape): an adapter with non-zero weights on the tiny base.
    base, tokenizer = load_saved(project / "models" / "sft")
    sft = _wrap_lora(base, LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, param in sft.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    adapter = save_model(sft, tokenizer, tmp_path / "sft", base=str(project / "models" / "sft"))
    assert (adapter / "adapter_config.json").exists()
    policy, tokenizer = load_saved(adapter, trainable=True)
    reward_model, _ = load_reward_model(project / "models" / "rm")
    settings = GRPOSettings(
        max_steps=1, per_device_batch_size=4, num_generations=2, max_completion_length=12, learning_rate=1e-3
    )
    config = RLConfig(algorithm="grpo", kl_coef=0.05, grpo=settings)
    result = train_grpo(policy, tokenizer, reward_model, prompts, config)
    # The first batch is scored before any update: against the SFT adapter the KL is 0; against
    # the base (adapters disabled) it would not be, with these adapter weights.
    assert result.log[0]["kl"] == pytest.approx(0.0, abs=1e-6), result.log
    assert "ref" not in result.model.peft_config  # TRL's reference copy is not saved with the policy
    out = save_model(result.model, tokenizer, tmp_path / "rl")
    assert not (out / "ref").exists()
    model, tok = load_saved(out)
    assert generate(model, tok, [prompts[0]["prompt"]], max_new_tokens=4)


def test_killed_grpo_resumes_from_its_last_checkpoint(
    project: Path, prompts: list[dict[str, Any]], tmp_path: Path
) -> None:
    settings = GRPOSettings(
        max_steps=3, per_device_batch_size=4, num_generations=2, max_completion_length=12, learning_rate=1e-3
    )
    config = RLConfig(algorithm="grpo", kl_coef=0.05, grpo=settings, save_steps=1)
    # The fixture's reward model scores 0 (a zero head), and so every completion of a group alike:
    # no advantage, nothing learnt. A seeded random head makes the rewards, and the updates, differ.
    rm, tokenizer = load_reward_model(project / "models" / "rm")
    with torch.no_grad():
        rm.score.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(5))
    scoring = save_reward_model(rm, tokenizer, tmp_path / "rm")

    def run(out: Path, **kwargs: Any) -> RLResult:
        policy, tokenizer = load_saved(project / "models" / "sft", trainable=True)
        reward_model, _ = load_reward_model(scoring)
        return train_grpo(policy, tokenizer, reward_model, prompts, config, out, **kwargs)

    straight = run(tmp_path / "straight")
    assert all(row["loss"] != 0 for row in straight.log)  # it learns: the comparison below can fail
    with pytest.raises(Killed):
        run(tmp_path / "killed", callbacks=[KillAfter(1, "on_save")])
    counted = CountUpdates()
    resumed = run(tmp_path / "killed", callbacks=[counted])
    assert resumed.resumed_from == str(tmp_path / "killed" / "checkpoint-1") and resumed.steps == 3
    assert counted.steps == [2, 3]
    assert [row["step"] for row in resumed.log] == [1, 2, 3]
    for got, want in zip(resumed.log, straight.log, strict=True):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    worst = largest_difference(resumed.model, straight.model)
    assert worst < 1e-5
    again = run(tmp_path / "killed")  # finished: no training, the last checkpoint's weights
    assert again.resumed_from == str(tmp_path / "killed" / "checkpoint-3") and again.log == resumed.log


def test_grpo_constrained_rollouts_are_always_valid(project: Path, prompts: list[dict[str, Any]]) -> None:
    # Room for the answer skeleton (every schema label is listed) within the token budget.
    result, _ = grpo_run(project, prompts, max_steps=1, constrained_rollouts=True, max_completion_length=48)
    assert result.steps == 1
    assert result.log[0]["validity"] == 1.0  # every rollout parses and is grounded


def test_grpo_batch_must_hold_whole_groups(project: Path, prompts: list[dict[str, Any]]) -> None:
    with pytest.raises(ValueError, match="multiple of"):
        grpo_run(project, prompts, per_device_batch_size=3)


# ------------------------------------------------------------------------------------ the whole pipeline


@pytest.mark.slow
def test_smoke_pipeline_through_rl_compare(smoke_run, tmp_path: Path) -> None:
    from tests.helpers.pipeline_repo import run, tool_env, up_to_date
    from tests.helpers.smoke_pipeline import clone

    repo = smoke_run.repo  # read only: the shared smoke `dvc repro` went through rl_compare
    seconds = smoke_run.seconds
    metrics = {p.stem: json.loads(p.read_text()) for p in (repo / "metrics").glob("*.json")}
    assert metrics["reward_data"]["pairs"]["train"] > 0 and metrics["reward_data"]["judged"]["prompts"] > 0
    assert metrics["rm"]["accuracy"] is not None
    assert metrics["rl_train"]["algorithm"] == "ppo" and metrics["rl_train"]["steps"] > 0
    from tests.helpers.smoke_pipeline import params

    evaluated = set(params(repo)["evaluate"]["datasets"])  # IE plus the profile's declared smoke_ner
    assert evaluated >= set(IE) and set(metrics["rl"]["ie"]) == evaluated
    compare = metrics["rl_vs_sft"]
    assert set(compare["ie"]) == evaluated and "mean_ie_f1_gain" in compare["summary"]
    # Paired intervals from the evaluate stage's per-record predictions, the gain inside its interval.
    low, high = compare["summary"]["mean_ie_f1_gain_low"], compare["summary"]["mean_ie_f1_gain_high"]
    assert low <= compare["summary"]["mean_ie_f1_gain"] <= high
    assert (
        "relative_change_ci95" in compare["chat"]["ceval_accuracy"]
        or metrics["sft"]["chat"]["ceval"]["accuracy"] == 0
    )
    for stage in ("reward_data", "rm", "rl_train"):
        print(f"{stage}: {metrics[stage].get('seconds_total', metrics[stage]['seconds'])} s in-stage")
    print(f"dvc repro (whole smoke pipeline): {seconds:.0f} s")
    repo = clone(smoke_run.snapshot, tmp_path / "repo")
    env = {**tool_env(), "CHATUIE_JUDGE_API_KEY": "sk-rl-smoke-not-a-real-key"}
    # A second repro: nothing to do, and the judge cache survived (persist: true).
    cache = (repo / "data" / "judge_cache.jsonl").read_text()
    again = run(["dvc", "repro", "rl_compare"], repo, env=env)
    assert up_to_date(again.stdout), again.stdout
    assert (repo / "data" / "judge_cache.jsonl").read_text() == cache
    # Forcing reward_data reruns it against the kept cache: no new judge call.
    run(["dvc", "repro", "--force", "--single-item", "reward_data"], repo, env=env)
    judge = json.loads((repo / "metrics" / "reward_data.json").read_text())["judged"]["judge"]
    assert judge["calls_made"] == 0 and judge["cache_hits"] == judge["items"]


@pytest.mark.slow
def test_rl_stage_killed_mid_run_resumes_from_its_checkpoint(smoke_run, tmp_path: Path) -> None:
    import signal

    from flows.pipeline import apply_overrides
    from tests.helpers.smoke_pipeline import clone, sh, stage_running_until

    repo = clone(smoke_run.snapshot, tmp_path / "repo")
    apply_overrides(repo / "params.yaml", {"rl.ppo.total_episodes": 16})  # 4 updates of 4 rollouts
    checkpoints = repo / "models" / "checkpoints" / "rl"
    first = checkpoints / "checkpoint-1" / "trainer_state.json"
    with stage_running_until(repo, "rl", first, own_group=True) as dvc:  # dvc and the stage die together
        os.killpg(dvc.pid, signal.SIGKILL)
        output = dvc.stdout.read() if dvc.stdout else ""
    assert dvc.returncode == -signal.SIGKILL, f"rl finished before the kill:\n{output[-2000:]}"

    sh(["dvc", "repro", "--single-item", "rl"], repo)
    metrics = json.loads((repo / "metrics" / "rl_train.json").read_text())
    assert 1 <= metrics["resumed_from_step"] < 4 == metrics["steps"]
    assert [row["step"] for row in metrics["log"]] == [1, 2, 3, 4]  # the killed run's updates kept
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-4"]
    assert (repo / "models" / "rl" / "config.json").exists()
