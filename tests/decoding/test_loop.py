"""The decoding loop (head over the allowed tokens, KV cache, shared prefix) against ``generate``.

The same tiny saved chat model the extract tests use (a random Llama and its byte-level BPE), the
same requests, both engines: greedy answers must be identical, token for token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, TopKLogitsWarper, TopPLogitsWarper

from chatuie.data.answers import ground
from chatuie.decoding import constrained_generate, free_generate, loop
from chatuie.decoding.loop import PrefixCache, Sampler, shared_prefix_length, supports_allowed_head
from chatuie.models.modeling import load_saved
from tests.helpers.tiny_extractor import ie_jobs, tiny_model_dir, with_random_head


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    model, tokenizer = load_saved(tiny_model_dir(tmp_path_factory.mktemp("tiny")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield model.eval(), tokenizer
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "settings",
    [
        {"batch_size": 1},
        {"batch_size": 4},
        {"batch_size": 16, "repetition_penalty": 1.3},
        {"batch_size": 6, "max_new_tokens": 12},  # the budget closes answers early
    ],
    ids=["batch1", "batch4", "penalty", "budget"],
)
def test_engines_give_identical_greedy_answers(tiny, settings: dict) -> None:
    model, tokenizer = tiny
    assert supports_allowed_head(model)
    prompts, requests = ie_jobs(tokenizer)
    kwargs = {"max_new_tokens": 96, **settings}
    reference = constrained_generate(model, tokenizer, prompts, requests, engine="transformers", **kwargs)
    fast = constrained_generate(model, tokenizer, prompts, requests, engine="chatuie", **kwargs)
    assert fast == reference
    for answer, request in zip(fast, requests, strict=True):
        ground(request.task, json.loads(answer), request.text, request.schema)  # valid and grounded


@pytest.fixture(scope="module")
def talkative(tiny):
    """The tiny model with a random head (it continues each prompt its own way); its EOS is the
    token the first prompt's greedy continuation reaches at step 8, where continuations part, so
    rows end at different steps."""
    model, tokenizer = tiny
    model = with_random_head(model)
    prompts, _ = ie_jobs(tokenizer)
    first = tokenizer(prompts[:1], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        start = model.generate(
            **first, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    model.generation_config.eos_token_id = [int(start[0, -1])]
    return model, tokenizer, prompts


@pytest.mark.parametrize(
    "settings",
    [{"batch_size": 1}, {"batch_size": 5, "repetition_penalty": 1.3}],
    ids=["batch1", "penalty"],
)
def test_free_decoding_through_the_loop_gives_generates_answers(talkative, settings: dict) -> None:
    model, tokenizer, prompts = talkative
    reference = free_generate(model, tokenizer, prompts, 32, engine="transformers", **settings)
    fast = free_generate(model, tokenizer, prompts, 32, engine="chatuie", **settings)
    assert fast == reference
    assert len(set(reference)) > 1  # real continuations, not one repeated token
    assert len({len(tokenizer(answer)["input_ids"]) for answer in reference}) > 1  # EOS at different steps


def test_the_shared_prefix_changes_no_answer(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = tiny
    prompts, requests = ie_jobs(tokenizer)
    ner = [i for i, r in enumerate(requests) if r.task == "ner"]
    prompts, requests = [prompts[i] for i in ner], [requests[i] for i in ner]
    shared = constrained_generate(model, tokenizer, prompts, requests, max_new_tokens=64, batch_size=2)
    monkeypatch.setattr(PrefixCache, "prefix_length", lambda self, prompts: 0)
    alone = constrained_generate(model, tokenizer, prompts, requests, max_new_tokens=64, batch_size=2)
    assert shared == alone


def test_shared_prefix_length_leaves_each_prompt_a_token() -> None:
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 4, 6]]) == 3
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # the last position scores the answer
    assert shared_prefix_length([[7, 2], [1, 2]]) == 0
    assert shared_prefix_length([[5]]) == 0


def test_prefix_cache_is_prefilled_once_for_batches_that_share_it(
    tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = tiny
    prompts, requests = ie_jobs(tokenizer)
    ee = [i for i, r in enumerate(requests) if r.task == "ee"]
    prefills: list[int] = []
    original = PrefixCache.for_rows

    def counting(self, decoder, config, prefix, pads):
        if tuple(prefix.tolist()) != self.ids:
            prefills.append(len(prefix))
        return original(self, decoder, config, prefix, pads)

    monkeypatch.setattr(PrefixCache, "for_rows", counting)
    constrained_generate(
        model, tokenizer, [prompts[i] for i in ee], [requests[i] for i in ee], max_new_tokens=8, batch_size=2
    )
    assert len(prefills) == 1 and prefills[0] > 20  # system prompt, task and schema: once for 3 batches


def test_sampling_is_seeded_valid_and_grounded(tiny) -> None:
    model, tokenizer = tiny
    prompts, requests = ie_jobs(tokenizer)
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append(
            constrained_generate(
                model,
                tokenizer,
                prompts,
                requests,
                max_new_tokens=64,
                do_sample=True,
                temperature=3.0,
                top_k=50,
            )
        )
    assert draws[0] == draws[1]
    for answer, request in zip(draws[0], requests, strict=True):
        ground(request.task, json.loads(answer), request.text, request.schema)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 1.0), (0, 0.7), (5, 0.5)])
def test_sampler_filters_as_transformers_warpers_do(top_k: int, top_p: float) -> None:
    torch.manual_seed(0)
    scores = torch.randn(4, 40) * 3
    scores[:, :5] = float("-inf")  # masked tokens stay masked
    expected = scores.clone()
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    got = loop._select_top(scores, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert Sampler()(scores).tolist() == scores.argmax(dim=-1).tolist()


def test_a_model_outside_the_plain_head_family_falls_back_to_generate(tmp_path: Path) -> None:
    from tests.helpers.tiny_extractor import tiny_model_dir as build

    _, tokenizer = load_saved(build(tmp_path))
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, eos_token_id=tokenizer.eos_token_id
        )
    ).eval()
    assert not supports_allowed_head(gpt2)
    prompts, requests = ie_jobs(tokenizer)
    answers = constrained_generate(gpt2, tokenizer, prompts[:3], requests[:3], max_new_tokens=24)
    assert answers == constrained_generate(
        gpt2, tokenizer, prompts[:3], requests[:3], max_new_tokens=24, engine="transformers"
    )


def test_unknown_engine_is_refused(tiny) -> None:
    model, tokenizer = tiny
    prompts, requests = ie_jobs(tokenizer)
    with pytest.raises(ValueError, match="engine must be one of"):
        constrained_generate(model, tokenizer, prompts[:1], requests[:1], max_new_tokens=4, engine="vllm")
