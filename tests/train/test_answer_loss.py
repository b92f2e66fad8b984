"""The answer-token loss (chatuie.train.answer_loss): the same loss and gradients as TRL's chunked loss,
and a model that trains under it. CPU, tiny sizes."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from chatuie.config import ConfigError
from chatuie.models.modeling import build_tiny_model, chat_texts, generate, train_tokenizer
from chatuie.train import answer_loss
from chatuie.train.answer_loss import answer_token_loss
from chatuie.train.trainer import sft_trainer, teach_to_answer
from tests.helpers.tiny_chat import CORPUS_EXTRA, SAMPLES, TINY, chat, settings


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(list(chat_texts(SAMPLES)) + CORPUS_EXTRA * 3, vocab_size=TINY.vocab_size, seed=1)


def _lora_tiny(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = build_tiny_model(TINY, tokenizer)
    config = LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"
    )
    peft_model = get_peft_model(model, config)
    for name, parameter in peft_model.named_parameters():  # non-zero B: the adapters change the output
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05, generator=torch.Generator().manual_seed(1))
    return peft_model


def _loss_and_grads(model, tokenizer, loss_type, tmp_path):
    trainer = sft_trainer(model, tokenizer, SAMPLES, settings(loss_type=loss_type), tmp_path / loss_type)
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    del target.__dict__["forward"]
    return out, grads, batch


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_same_loss_and_gradients_as_trls_chunked_loss(tokenizer, tmp_path, adapter):
    model = _lora_tiny(tokenizer) if adapter == "lora" else build_tiny_model(TINY, tokenizer)
    chunked, chunked_grads, batch = _loss_and_grads(model, tokenizer, "chunked_nll", tmp_path)
    answer, answer_grads, batch2 = _loss_and_grads(model, tokenizer, "answer_nll", tmp_path)
    assert torch.equal(batch["input_ids"], batch2["input_ids"])
    answer_tokens = int((batch["labels"][:, 1:] != -100).sum())
    assert answer.logits is None and int(answer.num_valid_tokens) == answer_tokens
    torch.testing.assert_close(answer.loss, chunked.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(answer.num_correct_tokens, chunked.num_correct_tokens)
    torch.testing.assert_close(answer.entropy_sum, chunked.entropy_sum, rtol=1e-4, atol=1e-4)
    assert answer_grads.keys() == chunked_grads.keys()
    assert any(("lora_A" if adapter == "lora" else "embed_tokens") in n for n in answer_grads)
    for name, grad in chunked_grads.items():
        torch.testing.assert_close(answer_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_loss_and_gradients_match_autograd_on_a_linear_head(monkeypatch, softcap):
    """Every input's gradient (hidden, weight, bias) as autograd gives it for the plain cross-entropy,
    across chunk boundaries (3 tokens a chunk here), prompt positions left out."""
    monkeypatch.setattr(answer_loss, "CHUNK_TOKENS", 3)
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(4, 11)
    hidden = torch.randn(2, 6, 4, generator=generator, requires_grad=True)
    labels = torch.tensor([[-100, -100, 3, 5, 7, -100], [-100, 1, 2, 10, 0, 4]])
    out = answer_token_loss(hidden, head, labels, final_logit_softcapping=softcap)
    (out.loss * 2).backward()  # a scaled loss: backward multiplies the kept gradients
    grads = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    hidden.grad, head.weight.grad, head.bias.grad = None, None, None

    logits = head(hidden[:, :-1]).reshape(-1, 11)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    (expected * 2).backward()
    torch.testing.assert_close(out.loss, expected)
    for got, want in zip(grads, [hidden.grad, head.weight.grad, head.bias.grad], strict=True):
        torch.testing.assert_close(got, want)
    valid = labels[:, 1:].reshape(-1) != -100
    assert int(out.num_valid_tokens) == int(valid.sum()) == 8
    predicted = logits.argmax(-1)[valid]
    assert int(out.num_correct_tokens) == int((predicted == labels[:, 1:].reshape(-1)[valid]).sum())
    halved = answer_token_loss(
        hidden.detach(), head, labels, num_items_in_batch=16, final_logit_softcapping=softcap
    )
    torch.testing.assert_close(halved.loss, expected.detach() / 2)
    with pytest.raises(ValueError, match="labels"):
        answer_token_loss(hidden, head)


def test_a_model_learns_under_the_answer_loss(tokenizer, tmp_path):
    model = build_tiny_model(TINY, tokenizer)
    result = teach_to_answer(
        model, tokenizer, SAMPLES * 4, settings(max_steps=80, loss_type="answer_nll"), tmp_path / "run"
    )
    losses = [entry["loss"] for entry in result.loss_log]
    assert losses[-1] < 0.5 * losses[0], losses
    assert generate(result.model, tokenizer, [chat("中国的首都是哪里？")], max_new_tokens=8) == ["北京"]
    assert "forward" not in result.model.__dict__  # the patch is gone: labelled forwards give logits again
    probe = tokenizer.apply_chat_template(chat("hi", "there"), return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert result.model(**probe, labels=probe["input_ids"]).logits is not None


def test_an_unknown_loss_type_names_the_field():
    with pytest.raises(ConfigError, match=r"train\.loss_type: expected one of answer_nll, .* got 'ce'"):
        settings(loss_type="ce")
