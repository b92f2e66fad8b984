"""Continuous batching: rows joining a running batch decode as they would in one batch.

The stacked KV cache is checked against one left-padded prefill of all the rows (a small random
Gemma 3 whose sliding window is shorter than the prompts), step by step; whole answers against
each prompt decoded alone, with rows ending and joining at different steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from chatuie.decoding import constrained_generate, free_generate
from chatuie.decoding.continuous import decode_continuous
from chatuie.decoding.kv_cache import stack_rows
from chatuie.decoding.loop import Sampler, prefill
from chatuie.models.modeling import load_saved
from tests.helpers.tiny_extractor import ie_jobs, tiny_model_dir, with_random_head


def _gemma(window: int) -> Gemma3ForCausalLM:
    config = Gemma3TextConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=window,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=512,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


def _padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize(
    "running_lengths, joining_lengths",
    [([5, 14, 21], [3, 9]), ([4, 6], [19, 11, 2])],  # joining rows shorter, then longer than the running
    ids=["shorter", "longer"],
)
@torch.inference_mode()
def test_stacked_rows_step_as_one_left_padded_batch(running_lengths, joining_lengths) -> None:
    model = _gemma(window=8)
    decoder = model.get_decoder()
    generator = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(1, 300, (n,), generator=generator).tolist() for n in running_lengths + joining_lengths
    ]
    running, joining = prompts[: len(running_lengths)], prompts[len(running_lengths) :]

    # The running rows take two steps alone (their own rows drop none), then the others join.
    cache, hidden, position = prefill(decoder, model.config, *_padded(running))
    mask = _padded(running)[1]
    steps = torch.randint(1, 300, (len(running), 2), generator=generator)
    for step in range(2):
        mask = torch.cat([mask, mask.new_ones((len(running), 1))], dim=1)
        decoder(
            input_ids=steps[:, step : step + 1],
            attention_mask=mask,
            position_ids=position,
            past_key_values=cache,
            use_cache=True,
        )
        position = position + 1
    joined_ids, joined_mask = _padded(joining)
    joined_cache, _, joined_position = prefill(decoder, model.config, joined_ids, joined_mask)
    mask = stack_rows(cache, mask, joined_cache, joined_mask)
    position = torch.cat([position, joined_position])

    # The same rows as one batch: running prompts with their two steps, then the joining ones.
    together = [p + s for p, s in zip(running, steps.tolist(), strict=True)] + joining
    ids, together_mask = _padded(together)
    together_cache, _, together_position = prefill(decoder, model.config, ids, together_mask)
    assert torch.equal(mask, together_mask)
    assert torch.equal(position, together_position)
    assert cache.get_seq_length() == together_cache.get_seq_length()

    more = torch.randint(1, 300, (len(together), 12), generator=generator)  # past the window
    for step in range(more.shape[1]):
        outputs = []
        for layers, layer_mask in ((cache, mask), (together_cache, together_mask)):
            outputs.append(
                decoder(
                    input_ids=more[:, step : step + 1],
                    attention_mask=layer_mask,
                    position_ids=position,
                    past_key_values=layers,
                    use_cache=True,
                ).last_hidden_state
            )
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
        mask = torch.cat([mask, mask.new_ones((len(together), 1))], dim=1)
        together_mask = mask
        position = position + 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    model, tokenizer = load_saved(tiny_model_dir(tmp_path_factory.mktemp("tiny")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield model.eval(), tokenizer
    torch.set_num_threads(threads)


def test_free_answers_joining_a_running_batch_are_those_decoded_alone(tiny) -> None:
    model, tokenizer = tiny
    model = with_random_head(model, seed=3)
    prompts, _ = ie_jobs(tokenizer)
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    settings = {"max_new_tokens": 24, "pad_id": 0, "sampler": Sampler()}
    # EOS: the token the first prompt's answer reaches at step 8, where answers part.
    eos = [decode_continuous(model, ids[:1], batch_size=1, eos_ids=[], **settings)[0][7]]
    alone = [decode_continuous(model, [p], batch_size=1, eos_ids=eos, **settings)[0] for p in ids]
    finished: list[int] = []
    joined = decode_continuous(
        model, ids, batch_size=3, refill=1, eos_ids=eos, on_finished=finished.append, **settings
    )
    assert joined == alone
    assert sum(finished) == len(prompts)
    assert len({len(answer) for answer in alone}) > 1  # rows end, and others join, at different steps


def test_constrained_answers_do_not_depend_on_the_batch(tiny) -> None:
    model, tokenizer = tiny
    prompts, requests = ie_jobs(tokenizer)
    answers = {
        batch: constrained_generate(
            model, tokenizer, prompts, requests, max_new_tokens=64, batch_size=batch, repetition_penalty=1.3
        )
        for batch in (1, 4, 16)
    }
    assert answers[4] == answers[1] and answers[16] == answers[1]


def test_free_generate_through_the_continuous_loop_matches_generate(tiny) -> None:
    model, tokenizer = tiny
    model = with_random_head(model, seed=3)
    prompts, _ = ie_jobs(tokenizer)
    reference = free_generate(model, tokenizer, prompts, 20, batch_size=1, engine="transformers")
    assert free_generate(model, tokenizer, prompts, 20, batch_size=4) == reference


def test_a_zero_batch_is_refused(tiny, tmp_path: Path) -> None:
    model, _ = tiny
    with pytest.raises(ValueError, match="batch_size"):
        decode_continuous(
            model, [[1, 2]], batch_size=0, max_new_tokens=4, eos_ids=[1], pad_id=0, sampler=Sampler()
        )
