"""Chat-ability evaluation (WebQA answers, C-Eval choices) on the tiny saved chat model with a random
head (answers that differ by question): batches of about one prompt length give each question the
result it gets asked alone, and rows come back in the records' order."""

from __future__ import annotations

import pytest
import torch

from chatuie.data.prompts import ChatOptions
from chatuie.data.records import Record
from chatuie.eval.evaluation import EvalSettings, evaluate_ceval, evaluate_webqa
from chatuie.models.modeling import load_saved
from tests.helpers.tiny_extractor import tiny_model_dir, with_random_head

PASSAGE = "Steve Jobs founded Apple in California. 乔布斯在加利福尼亚创立了苹果公司。"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    model, tokenizer = load_saved(tiny_model_dir(tmp_path_factory.mktemp("tiny")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # seed 5: a head under which the seven questions' C-Eval choices differ (most seeds pick one letter)
    yield with_random_head(model.eval(), seed=5), tokenizer
    torch.set_num_threads(threads)


def _records(task: str) -> list[Record]:
    """Seven questions whose prompts differ in length, out of length order."""
    records = []
    for i, repeat in enumerate((1, 5, 2, 7, 1, 3, 4)):
        records.append(
            Record(
                id=f"{task}-{i}",
                dataset="webqa" if task == "qa" else "ceval",
                split="test",
                task=task,
                text=PASSAGE * repeat,
                question=f"Who founded Apple? ({i}) " + "Think. " * repeat,
                options={"A": "Jobs", "B": "Gates", "C": "Musk", "D": "Cook " * repeat}
                if task == "mcq"
                else None,
                answer="A" if task == "mcq" else "Steve Jobs",
                meta={"category": "business" if i % 2 else "history"},
            )
        )
    return records


def _settings(batch_size: int) -> EvalSettings:
    return EvalSettings(batch_size=batch_size, webqa_max_new_tokens=12)


def test_webqa_answers_do_not_depend_on_the_batching(tiny) -> None:
    model, tokenizer = tiny
    records = _records("qa")
    alone = [evaluate_webqa(model, tokenizer, [r], ChatOptions(), _settings(1))[1][0] for r in records]
    metrics, batched = evaluate_webqa(model, tokenizer, records, ChatOptions(), _settings(3))
    assert [row["id"] for row in batched] == [r.id for r in records]
    assert batched == alone
    assert len({row["answer"] for row in alone}) > 1  # the questions' answers differ
    assert metrics["examples"] == len(records)


def test_ceval_choices_do_not_depend_on_the_batching(tiny) -> None:
    model, tokenizer = tiny
    records = _records("mcq")
    alone = [evaluate_ceval(model, tokenizer, [r], ChatOptions(), _settings(1))[1][0] for r in records]
    metrics, batched = evaluate_ceval(model, tokenizer, records, ChatOptions(), _settings(3))
    assert [row["id"] for row in batched] == [r.id for r in records]
    assert batched == alone
    assert len({row["choice"] for row in alone}) > 1  # the records' choices differ: a mix-up would show
    assert metrics["examples"] == len(records)
    assert set(metrics["per_category"]) == {"business", "history"}
