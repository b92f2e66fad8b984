"""The in-place KV cache against ``transformers``' ``DynamicCache``: the same tensors reach attention.

Layer by layer (a prefill, steps past the buffer's room, rows dropped, rows written from outside
as the shared-prefix cache does), and end to end: a small random Gemma 3 with a sliding window of
8 tokens decodes the same answers through the loop as ``generate`` does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from chatuie.decoding import constrained_generate
from chatuie.decoding.kv_cache import (
    MIN_HEADROOM,
    InPlaceLayer,
    InPlaceSlidingWindowLayer,
    in_place_cache,
)
from chatuie.models.modeling import load_saved
from tests.helpers.tiny_extractor import ie_jobs, tiny_model_dir


def _states(generator: torch.Generator, batch: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (batch, 2, tokens, 4)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


@pytest.mark.parametrize("window", [None, 8])
def test_layers_return_what_dynamic_layers_return(window: int | None) -> None:
    reference = DynamicLayer() if window is None else DynamicSlidingWindowLayer(sliding_window=window)
    in_place = InPlaceLayer() if window is None else InPlaceSlidingWindowLayer(sliding_window=window)
    generator = torch.Generator().manual_seed(0)
    batch = 5
    steps = [7, *([1] * (MIN_HEADROOM + 40))]  # a prefill, then steps that outgrow the first buffer
    for step, tokens in enumerate(steps):
        keys, values = _states(generator, batch, tokens)
        expected = reference.update(keys, values)
        got = in_place.update(keys, values)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), step
        assert torch.equal(in_place.keys, reference.keys) and torch.equal(in_place.values, reference.values)
        assert in_place.get_seq_length() == reference.get_seq_length()
        assert in_place.get_mask_sizes(1) == reference.get_mask_sizes(1)
        if step in (3, 60):  # rows reach EOS and leave
            kept = torch.tensor([i for i in range(batch) if i != 1])
            reference.batch_select_indices(kept)
            in_place.batch_select_indices(kept)
            batch -= 1
        if step == 90:  # a caller replaces the cached rows (as PrefixCache.for_rows does)
            for layer in (reference, in_place):
                layer.keys, layer.values = layer.keys.flip(0).contiguous(), layer.values.flip(0).contiguous()
    if window is not None:  # a sliding layer's buffer stays near its window, whatever the length
        assert in_place._key_buffer.shape[-2] <= window + 1 + MIN_HEADROOM


def _tiny_gemma(tokenizer, sliding_window: int) -> Gemma3ForCausalLM:
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


def test_in_place_cache_keeps_the_layer_kinds(tmp_path: Path) -> None:
    _, tokenizer = load_saved(tiny_model_dir(tmp_path))
    cache = in_place_cache(_tiny_gemma(tokenizer, 8).config)
    assert [type(layer) for layer in cache.layers] == [InPlaceSlidingWindowLayer] * 3 + [InPlaceLayer]


def test_a_sliding_window_model_decodes_as_generate_does(tmp_path: Path) -> None:
    """Prompts ten times the window: sliding layers drop most of what they saw, in both paths."""
    _, tokenizer = load_saved(tiny_model_dir(tmp_path))
    model = _tiny_gemma(tokenizer, 8)
    prompts, requests = ie_jobs(tokenizer)
    prompts, requests = prompts[:6], requests[:6]
    answers = {
        engine: constrained_generate(
            model, tokenizer, prompts, requests, max_new_tokens=32, batch_size=3, engine=engine
        )
        for engine in ("transformers", "chatuie")
    }
    assert answers["chatuie"] == answers["transformers"]
    assert all(answer.startswith("{") for answer in answers["chatuie"])
